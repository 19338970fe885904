//! Glue between the launcher's API and the migration engine: the source side
//! (`PUT /v1/migrate`, progress, limits, cancel) and the destination side
//! (`launcher run --incoming URI`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration::policy::MigrationLimits;
use migration::protocol::MigrationMode;
use migration::report::Progress;
use migration::sender::{self, SendOptions};
use migration::transport::{self, Listener, MigrationUri, RateLimit};
use serde_json::{json, Value};

use crate::launch::api::MigrationHandler;
use crate::launch::runtime::{Phase, Runtime};
use crate::launch::{LaunchError, EXIT_MIGRATED, VERSION};

/// How long to wait for the destination to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

struct Active {
    cancel: Arc<AtomicBool>,
    rate: Arc<RateLimit>,
    downtime_ms: Arc<AtomicU64>,
    progress: Arc<Mutex<Option<Progress>>>,
}

/// The API's migration handler: at most one migration at a time.
#[derive(Default)]
pub struct Handler {
    active: Mutex<Option<Active>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn err(status: u16, msg: impl std::fmt::Display) -> (u16, Value) {
    (
        status,
        json!({"status": "failed", "error": msg.to_string(), "source_running": true}),
    )
}

/// The migration parameters of a `PUT /v1/migrate` body (camelCase, as the API).
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    /// Destination URI.
    pub to: MigrationUri,
    /// Hand memory over as fds.
    pub local: bool,
    /// Limits.
    pub limits: MigrationLimits,
}

fn u64_field(body: &Value, name: &str) -> Result<Option<u64>, String> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{name} must be a non-negative integer")),
    }
}

/// Parse and check a request body.
pub fn parse_request(body: &Value) -> Result<MigrateRequest, String> {
    let to = body
        .get("to")
        .and_then(Value::as_str)
        .ok_or("body needs \"to\": \"unix:PATH\" or \"tcp:HOST:PORT\"")?;
    let to: MigrationUri = to.parse().map_err(|e| format!("{e}"))?;
    let local = body.get("local").and_then(Value::as_bool).unwrap_or(false);
    if local && !matches!(to, MigrationUri::Unix(_)) {
        return Err(
            "local mode hands memory over as file descriptors and needs a unix: destination".into(),
        );
    }
    let mut limits = MigrationLimits::default();
    if let Some(v) = u64_field(body, "downtimeMs")? {
        limits.downtime_target = Duration::from_millis(v);
    }
    if let Some(v) = u64_field(body, "maxBandwidth")? {
        limits.max_bandwidth = v;
    }
    if let Some(v) = u64_field(body, "completionTimeoutPerGib")? {
        limits.completion_timeout_per_gib = Duration::from_secs(v);
    }
    if let Some(v) = u64_field(body, "progressTimeout")? {
        limits.progress_timeout = Duration::from_secs(v);
    }
    limits.auto_converge = body
        .get("autoConverge")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    limits.validate().map_err(|e| e.to_string())?;
    Ok(MigrateRequest { to, local, limits })
}

impl MigrationHandler for Handler {
    fn migrate(&self, runtime: &Arc<Runtime>, body: &Value) -> (u16, Value) {
        let req = match parse_request(body) {
            Ok(r) => r,
            Err(e) => return err(400, e),
        };
        let Some(vm) = runtime.vm() else {
            return err(409, "no VM runs here");
        };
        let before = runtime.phase();
        if !matches!(before, Phase::Running | Phase::Paused) {
            return err(
                409,
                format!("VM is {}; cannot migrate now", before.as_str()),
            );
        }
        let opts = {
            let mut active = lock(&self.active);
            if active.is_some() {
                return err(409, "a migration of this VM is already in progress");
            }
            let a = Active {
                cancel: Arc::new(AtomicBool::new(false)),
                rate: RateLimit::new(req.limits.max_bandwidth),
                downtime_ms: Arc::new(
                    AtomicU64::new(req.limits.downtime_target.as_millis() as u64),
                ),
                progress: Arc::new(Mutex::new(None)),
            };
            let progress = a.progress.clone();
            let opts = SendOptions {
                mode: if req.local {
                    MigrationMode::Local
                } else {
                    MigrationMode::Copy
                },
                limits: req.limits,
                rate: a.rate.clone(),
                cancel: a.cancel.clone(),
                launcher_version: VERSION.to_string(),
                downtime_ms: a.downtime_ms.clone(),
                progress: Some(Arc::new(move |p: &Progress| {
                    *lock(&progress) = Some(*p);
                })),
            };
            *active = Some(a);
            opts
        };
        runtime.set_phase(Phase::Migrating);
        let result = transport::connect(&req.to, Some(CONNECT_TIMEOUT))
            .map_err(|e| format!("cannot reach the destination {}: {e}", req.to))
            .map(|stream| sender::send(&vm, stream, &opts));
        *lock(&self.active) = None;
        match result {
            Err(e) => {
                runtime.set_phase(before);
                err(502, e)
            }
            Ok(report) => {
                let completed = report.status == migration::report::Outcome::Completed;
                if completed {
                    // The VM runs elsewhere now; this process must never run it again.
                    runtime.request_exit(EXIT_MIGRATED);
                } else if report.source_running {
                    runtime.set_phase(before);
                } else {
                    runtime.set_phase(Phase::Paused);
                }
                let v = serde_json::to_value(&report).unwrap_or(Value::Null);
                (if completed { 200 } else { 500 }, v)
            }
        }
    }

    fn cancel(&self) -> (u16, Value) {
        match &*lock(&self.active) {
            Some(a) => {
                a.cancel.store(true, Ordering::SeqCst);
                a.rate.set(0);
                (200, json!({}))
            }
            None => (409, json!({"error": "no migration in progress"})),
        }
    }

    fn progress(&self) -> (u16, Value) {
        match &*lock(&self.active) {
            Some(a) => {
                let p = *lock(&a.progress);
                let v = match p {
                    Some(p) => json!({
                        "active": true,
                        "iteration": p.iteration,
                        "transferredBytes": p.transferred_bytes,
                        "remainingBytes": p.remaining_bytes,
                        "bandwidthBytesPerS": p.bandwidth_bytes_per_s,
                        "expectedDowntimeMs": if p.expected_downtime_ms.is_finite() { json!(p.expected_downtime_ms) } else { Value::Null },
                        "throttlePercent": p.throttle_percent,
                    }),
                    None => json!({"active": true}),
                };
                (200, v)
            }
            None => (200, json!({"active": false})),
        }
    }

    fn set_limits(&self, body: &Value) -> (u16, Value) {
        let guard = lock(&self.active);
        let Some(a) = &*guard else {
            return (409, json!({"error": "no migration in progress"}));
        };
        match (
            u64_field(body, "maxBandwidth"),
            u64_field(body, "downtimeMs"),
        ) {
            (Ok(bw), Ok(dt)) => {
                if let Some(bw) = bw {
                    a.rate.set(bw);
                }
                if let Some(dt) = dt {
                    a.downtime_ms.store(dt, Ordering::Relaxed);
                }
                (200, json!({}))
            }
            (Err(e), _) | (_, Err(e)) => (400, json!({"error": e})),
        }
    }
}

/// Listen on `uri` and receive one VM in the background; the runtime gets the VM
/// once it runs, or the process exits 1 if the migration fails.
pub fn start_incoming(uri: &str, rt: Arc<Runtime>) -> Result<(), LaunchError> {
    let parsed: MigrationUri = uri
        .parse()
        .map_err(|e| LaunchError::Usage(format!("--incoming {uri}: {e}")))?;
    let listener = Listener::bind(&parsed)
        .map_err(|e| LaunchError::Usage(format!("--incoming {uri}: {e}")))?;
    let serial = rt.serial().open()?;
    std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("launcher: incoming migration: {e}");
                    rt.request_exit(1);
                    return;
                }
            };
            // One migration per process: stop listening (removes the socket file).
            drop(listener);
            match migration::receiver::receive(stream, serial) {
                Ok((vm, stats)) => {
                    tracing::info!(
                        bytes = stats.bytes,
                        local = stats.local,
                        go_to_resume_us = stats.go_to_resume_us,
                        "incoming migration completed; the VM runs here"
                    );
                    rt.set_vm(Arc::new(vm));
                }
                Err(e) => {
                    eprintln!("launcher: incoming migration failed: {e}");
                    rt.request_exit(1);
                }
            }
        })
        .map_err(|e| LaunchError::Migration(format!("cannot start the incoming thread: {e}")))?;
    Ok(())
}

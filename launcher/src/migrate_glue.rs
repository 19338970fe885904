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
use migration::tls::TlsConfig;
use migration::transport::{self, Listener, MigrationUri, RateLimit, TcpSecurity, TransportError};
use serde_json::{json, Value};
use vmm::sync::lock;

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
    /// TLS or plain for a `tcp:` destination (`tlsDir`, `tlsServerName`, `insecure`).
    pub security: TcpSecurity,
}

/// How `tcp:` is secured, from the `--tls-dir`, `--insecure` and
/// `--tls-server-name` options (or the API's `tlsDir`, `insecure`, `tlsServerName`).
/// Reads the TLS directory now, so that a bad one is reported at once.
pub fn tcp_security(
    tls_dir: Option<&std::path::Path>,
    insecure: bool,
    server_name: Option<&str>,
) -> Result<TcpSecurity, String> {
    match (tls_dir, insecure) {
        (Some(_), true) => {
            Err("--tls-dir and --insecure exclude each other: TLS, or plain TCP".into())
        }
        (Some(dir), false) => Ok(TcpSecurity::Tls {
            config: TlsConfig::load(dir).map_err(|e| e.to_string())?,
            server_name: server_name.map(str::to_string),
        }),
        (None, _) if server_name.is_some() => Err("--tls-server-name needs --tls-dir".into()),
        (None, true) => Ok(TcpSecurity::Insecure),
        (None, false) => Ok(TcpSecurity::Unset),
    }
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
    let str_field = |name: &str| match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{name} must be a string")),
    };
    let tls_dir = str_field("tlsDir")?;
    let server_name = str_field("tlsServerName")?;
    let insecure = match body.get("insecure") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or("insecure must be true or false")?,
    };
    let security = tcp_security(
        tls_dir.as_deref().map(std::path::Path::new),
        insecure,
        server_name.as_deref(),
    )?;
    if matches!(to, MigrationUri::Tcp { .. }) && matches!(security, TcpSecurity::Unset) {
        return Err(TransportError::InsecureTcp {
            uri: to.to_string(),
        }
        .to_string());
    }
    Ok(MigrateRequest {
        to,
        local,
        limits,
        security,
    })
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
        let result = transport::connect_with(&req.to, Some(CONNECT_TIMEOUT), &req.security)
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
/// once it runs, or the process exits 1 if the migration fails. A `tcp:` URI is
/// refused (it needs [`start_incoming_with`] and a [`TcpSecurity`]).
pub fn start_incoming(uri: &str, rt: Arc<Runtime>) -> Result<(), LaunchError> {
    start_incoming_with(uri, rt, &TcpSecurity::Unset)
}

/// [`start_incoming`] with TLS or plain TCP as `security` says. A peer refused in
/// the TLS handshake (no, or an untrusted, certificate) is reported on stderr and
/// the listener waits for the next connection: a stray or hostile client cannot
/// use up the one migration this process accepts.
pub fn start_incoming_with(
    uri: &str,
    rt: Arc<Runtime>,
    security: &TcpSecurity,
) -> Result<(), LaunchError> {
    let parsed: MigrationUri = uri
        .parse()
        .map_err(|e| LaunchError::Usage(format!("--incoming {uri}: {e}")))?;
    let listener = Listener::bind_with(&parsed, security)
        .map_err(|e| LaunchError::Usage(format!("--incoming {uri}: {e}")))?;
    let serial = rt.serial().open()?;
    std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            let stream = loop {
                match listener.accept() {
                    Ok(s) => break s,
                    Err(e @ TransportError::Tls(_)) => {
                        eprintln!("launcher: incoming migration: connection refused: {e}");
                    }
                    Err(e) => {
                        eprintln!("launcher: incoming migration: {e}");
                        rt.request_exit(1);
                        return;
                    }
                }
            };
            // One migration per process: stop listening (removes the socket file).
            drop(listener);
            let opts = migration::receiver::ReceiveOptions {
                nets: rt.incoming_nets(),
            };
            match migration::receiver::receive_with(stream, serial, &opts) {
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

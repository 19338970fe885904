//! Glue between the launcher's API and the migration engine: the source side
//! (`PUT /v1/migrate`, progress, limits, cancel) and the destination side
//! (`launcher run --incoming URI`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use contracts::launcher::{Empty, LimitsPatch, MigrateRequest as WireRequest, MigrationProgress};
use migration::policy::MigrationLimits;
use migration::protocol::MigrationMode;
use migration::report::{Outcome, Progress, Report};
use migration::sender::{self, SendOptions};
use migration::tls::TlsConfig;
use migration::transport::{self, Listener, MigrationUri, RateLimit, TcpSecurity, TransportError};
use vmm::sync::lock;

use crate::launch::api::MigrationHandler;
use crate::launch::runtime::{MigrationEnd, Runtime};
use crate::launch::{LaunchError, VERSION};

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

/// A refusal before the migration started: a report saying so (the source runs on).
fn refused(
    status: u16,
    mode: &str,
    memory_bytes: u64,
    msg: impl std::fmt::Display,
) -> (u16, Report) {
    (status, Report::refused(mode, memory_bytes, msg.to_string()))
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

/// Check a request and turn it into what the sender needs.
pub fn parse_request(body: &WireRequest) -> Result<MigrateRequest, String> {
    let to: MigrationUri = body.to.parse().map_err(|e| format!("to: {e}"))?;
    if body.local && !matches!(to, MigrationUri::Unix(_)) {
        return Err(
            "local mode hands memory over as file descriptors and needs a unix: destination".into(),
        );
    }
    let limits = MigrationLimits {
        downtime_target: body.downtime(),
        max_bandwidth: body.max_bandwidth.unwrap_or(0),
        completion_timeout_per_gib: body.completion_timeout_per_gib(),
        progress_timeout: body.progress_timeout(),
        auto_converge: body.auto_converge,
    };
    limits.validate().map_err(|e| e.to_string())?;
    let security = tcp_security(
        body.tls_dir.as_deref().map(std::path::Path::new),
        body.insecure,
        body.tls_server_name.as_deref(),
    )?;
    if matches!(to, MigrationUri::Tcp { .. }) && matches!(security, TcpSecurity::Unset) {
        return Err(TransportError::InsecureTcp {
            uri: to.to_string(),
        }
        .to_string());
    }
    Ok(MigrateRequest {
        to,
        local: body.local,
        limits,
        security,
    })
}

impl Handler {
    /// Register the migration about to start (refused if one is in progress) and build
    /// the sender's options, wired to this handler's cancel, limits and progress.
    fn begin(&self, req: &MigrateRequest) -> Option<SendOptions> {
        let mut active = lock(&self.active);
        if active.is_some() {
            return None;
        }
        let a = Active {
            cancel: Arc::new(AtomicBool::new(false)),
            rate: RateLimit::new(req.limits.max_bandwidth),
            downtime_ms: Arc::new(AtomicU64::new(req.limits.downtime_target.as_millis() as u64)),
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
        Some(opts)
    }
}

impl MigrationHandler for Handler {
    fn migrate(&self, runtime: &Arc<Runtime>, body: &WireRequest) -> (u16, Report) {
        let mode = if body.local { "local" } else { "copy" };
        let Some(vm) = runtime.vm() else {
            return refused(409, mode, 0, runtime.no_vm());
        };
        let memory = vm.config().memory_bytes;
        let req = match parse_request(body) {
            Ok(r) => r,
            Err(e) => return refused(400, mode, memory, e),
        };
        let Some(opts) = self.begin(&req) else {
            return refused(
                409,
                mode,
                memory,
                "a migration of this VM is already in progress",
            );
        };
        let ticket = match runtime.begin_migration(opts.cancel.clone()) {
            Ok(t) => t,
            Err(e) => {
                *lock(&self.active) = None;
                return refused(e.status(), mode, memory, e);
            }
        };
        let result = transport::connect_with(&req.to, Some(CONNECT_TIMEOUT), &req.security)
            .map_err(|e| format!("cannot reach the destination {}: {e}", req.to))
            .map(|stream| sender::send(&vm, stream, &opts));
        *lock(&self.active) = None;
        match result {
            Err(e) => {
                let _ = runtime.end_migration(ticket, MigrationEnd::SourceRuns);
                refused(502, mode, memory, e)
            }
            Ok(report) => {
                let completed = report.status == Outcome::Completed;
                let end = if completed {
                    // The VM runs elsewhere now; this process must never run it again.
                    MigrationEnd::MigratedAway
                } else if report.source_running {
                    MigrationEnd::SourceRuns
                } else {
                    MigrationEnd::OutcomeUnknown
                };
                let mut report = report;
                if runtime.end_migration(ticket, end) && !completed {
                    report.status = Outcome::Failed;
                    report.error = Some(
                        "the guest reset itself during the migration: the migration was abandoned \
                         and the source reboots the VM; migrate again once it runs"
                            .into(),
                    );
                }
                (if completed { 200 } else { 500 }, report)
            }
        }
    }

    fn cancel(&self) -> Result<Empty, String> {
        match &*lock(&self.active) {
            Some(a) => {
                a.cancel.store(true, Ordering::SeqCst);
                a.rate.set(0);
                Ok(Empty {})
            }
            None => Err("no migration in progress".into()),
        }
    }

    fn progress(&self) -> MigrationProgress {
        match &*lock(&self.active) {
            Some(a) => MigrationProgress::active(lock(&a.progress).as_ref()),
            None => MigrationProgress::default(),
        }
    }

    fn set_limits(&self, patch: &LimitsPatch) -> Result<Empty, String> {
        let guard = lock(&self.active);
        let Some(a) = &*guard else {
            return Err("no migration in progress".into());
        };
        if let Some(bw) = patch.max_bandwidth {
            a.rate.set(bw);
        }
        if let Some(dt) = patch.downtime_ms {
            a.downtime_ms.store(dt, Ordering::Relaxed);
        }
        Ok(Empty {})
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
            let opts = crate::receive_options(rt.incoming_nets());
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

//! Launcher processes: starting them in their own session, watching them end, talking to
//! their API, and the multi-step jobs (migration, shutdown) that the reconciliation loop
//! hands to tasks so that it never blocks.
//!
//! Launchers are started with `setsid()`, so that noded's death (or a Ctrl-C in its
//! terminal) does not reach them: a restarted noded adopts them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use contracts::launch::{BootOptions, LaunchOptions, VmSource};
use contracts::launcher::{to_json, ErrorReply, MigrateRequest, Phase, Status};
use contracts::report::{Report, Verdict};

use super::coordinator::ExitKind;
use super::settings::LiveMigrationConfig;
use super::spec::VmSpec;
use contracts::http;

/// Process and API failures.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Could not start a launcher.
    #[error("cannot start {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: String,
        /// Why.
        source: std::io::Error,
    },
    /// A launcher's API call failed.
    #[error("launcher API {what}: {source}")]
    Api {
        /// Which call.
        what: String,
        /// Why.
        source: http::HttpError,
    },
    /// The API answered with an error status.
    #[error("launcher API {what} answered {status}: {message}")]
    ApiStatus {
        /// Which call.
        what: String,
        /// HTTP status.
        status: u16,
        /// Error message.
        message: String,
    },
    /// A blocking task was cancelled.
    #[error("internal task failed: {0}")]
    Join(String),
}

/// Events from process watchers and jobs to the reconciliation loop.
#[derive(Debug)]
pub enum Event {
    /// A launcher process ended.
    Exited {
        /// VM name.
        vm: String,
        /// Its pid.
        pid: u32,
        /// How.
        kind: ExitKind,
    },
    /// A cross-node migration job (`nodectl vm receive` / `vm migrate`) finished.
    RemoteDone {
        /// VM name.
        vm: String,
        /// Migration record id.
        record: i64,
        /// Result.
        result: MigrationResult,
    },
    /// A migration job finished.
    MigrationDone {
        /// VM name.
        vm: String,
        /// Migration record id.
        record: i64,
        /// Result.
        result: MigrationResult,
    },
}

/// The outcome of one migration attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationResult {
    /// The VM now runs in the target launcher.
    Completed {
        /// The launcher's report.
        report: Value,
    },
    /// The VM still runs in the source launcher (or the source died: see the exit event).
    Failed {
        /// `Failed` or `Cancelled`.
        outcome: String,
        /// What went wrong.
        error: String,
        /// The launcher's report, if there was one.
        report: Value,
    },
    /// The source lost the handover's answer after `Go` and stays paused: the VM runs
    /// in the target launcher or in neither. Only cross-node migrations end so (a local
    /// one asks both launchers, see [`migrate`]).
    Unknown {
        /// What went wrong.
        error: String,
        /// The launcher's report, if there was one.
        report: Value,
    },
}

/// A report with the failure's error folded in.
fn with_error(report: &Value, error: &str) -> Value {
    let mut r = if report.is_object() {
        report.clone()
    } else {
        Value::Object(Default::default())
    };
    r["error"] = Value::from(error);
    r
}

impl MigrationResult {
    /// The record's outcome (`Succeeded`, `Failed`, `Cancelled`) and the report to keep
    /// (a failure's error folded into it), as both the local and the cross-node
    /// migration paths record them.
    pub fn record(&self) -> (String, Value) {
        match self {
            MigrationResult::Completed { report } => ("Succeeded".to_string(), report.clone()),
            MigrationResult::Failed {
                outcome,
                error,
                report,
            } => (outcome.clone(), with_error(report, error)),
            // This node's attempt did not conclude; a cluster's record tells the end.
            MigrationResult::Unknown { error, report } => {
                ("Failed".to_string(), with_error(report, error))
            }
        }
    }
}

/// `launcher run` options for a fresh boot.
pub fn run_options(spec: &VmSpec, serial: &Path, api_socket: &Path) -> LaunchOptions {
    LaunchOptions {
        source: VmSource::Boot(BootOptions {
            kernel: spec.kernel.clone(),
            initrd: None,
            cmdline: spec.cmdline.clone(),
            memory_bytes: spec.memory_bytes,
            vcpus: spec.vcpus,
            machine_type: Some(spec.machine_type.clone()),
            // Disks go to a fresh boot only: an incoming launcher gets them from the
            // migration stream's state, with their locks handed over at the switch-over.
            disks: spec.disks.iter().map(|d| d.launcher_arg()).collect(),
        }),
        // One `--net tap=NAME,mac=MAC` per interface; the MAC is always in a stored spec,
        // so the guest has the same one in every launcher.
        nets: spec.interfaces.iter().map(|n| n.launcher_arg()).collect(),
        serial: Some(serial.display().to_string()),
        api_socket: Some(api_socket.display().to_string()),
        watchdog_file: None,
        watchdog_timeout_ms: None,
        migration_stall_timeout_ms: None,
    }
}

/// `launcher run --incoming` options for a migration target.
///
/// No `--net`: noded's migrations are local handovers (`"local": true`), in which the
/// source launcher passes its TAP file descriptors along with the guest memory and the
/// target uses those (its `--net` would be ignored). Giving `--net tap=NAME` here would
/// even be harmful: the target opens named TAPs at start, before the VM arrives, and a
/// single-queue TAP that the source still holds cannot be attached twice.
pub fn incoming_options(incoming: &Path, serial: &Path, api_socket: &Path) -> LaunchOptions {
    LaunchOptions {
        source: VmSource::Incoming {
            uri: format!("unix:{}", incoming.display()),
            tls_dir: None,
            insecure: false,
        },
        nets: Vec::new(),
        serial: Some(serial.display().to_string()),
        api_socket: Some(api_socket.display().to_string()),
        watchdog_file: None,
        watchdog_timeout_ms: None,
        migration_stall_timeout_ms: None,
    }
}

/// Starts a launcher in its own session, stdout/stderr appended to `log`.
pub fn spawn(
    bin: &Path,
    args: &[String],
    log: &Path,
) -> Result<tokio::process::Child, SupervisorError> {
    let err = |source| SupervisorError::Spawn {
        bin: bin.display().to_string(),
        source,
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(err)?;
    let out2 = out.try_clone().map_err(err)?;
    let mut tries = 0;
    loop {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().map_err(err)?)
            .stderr(out2.try_clone().map_err(err)?)
            .kill_on_drop(false);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // setsid(2), which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(c) => return Ok(c),
            // A just-installed binary may briefly be "text file busy" (see launchers.rs).
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(err(e)),
        }
    }
}

/// Whether a process exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(p, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Whether `pid` is alive and its command line contains `needle` (guards against pid
/// reuse: our launchers carry their API socket path on their command line).
pub fn pid_runs(pid: u32, needle: &str) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
        .unwrap_or(false)
}

/// A live process that has `arg` as one of its arguments (the highest pid, if several).
pub fn find_pid_with_arg(arg: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| pid_runs(*pid, arg))
        .max()
}

/// Sends a signal; a process that is already gone is not an error.
pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(p) = libc::pid_t::try_from(pid) {
        if p > 0 {
            // SAFETY: plain kill(2) on a positive pid we recorded for our launcher.
            unsafe {
                libc::kill(p, sig);
            }
        }
    }
}

/// Calls a launcher API without blocking the runtime; any HTTP status is returned.
pub async fn api_raw(
    socket: &Path,
    method: &'static str,
    path: &'static str,
    body: Option<Value>,
    timeout: Option<Duration>,
) -> Result<(u16, Value), SupervisorError> {
    let socket = socket.to_path_buf();
    let what = format!("{method} {path}");
    tokio::task::spawn_blocking(move || {
        http::request_with_timeout(&socket, method, path, body.as_ref(), timeout)
    })
    .await
    .map_err(|e| SupervisorError::Join(e.to_string()))?
    .map_err(|source| SupervisorError::Api { what, source })
}

/// Calls a launcher API without blocking the runtime.
pub async fn api(
    socket: &Path,
    method: &'static str,
    path: &'static str,
    body: Option<Value>,
    timeout: Option<Duration>,
) -> Result<Value, SupervisorError> {
    let socket = socket.to_path_buf();
    let what = format!("{method} {path}");
    let r = tokio::task::spawn_blocking(move || {
        http::request_with_timeout(&socket, method, path, body.as_ref(), timeout)
    })
    .await
    .map_err(|e| SupervisorError::Join(e.to_string()))?;
    match r {
        Ok((status, v)) if (200..300).contains(&status) => Ok(v),
        Ok((status, v)) => Err(SupervisorError::ApiStatus {
            what,
            status,
            message: v["error"].as_str().unwrap_or("").to_string(),
        }),
        Err(source) => Err(SupervisorError::Api { what, source }),
    }
}

/// `GET /v1/status` with a short timeout; `None` when nobody answers (or the answer is
/// not a status).
pub async fn status(socket: &Path) -> Option<Status> {
    let v = api(
        socket,
        "GET",
        "/v1/status",
        None,
        Some(Duration::from_secs(2)),
    )
    .await
    .ok()?;
    match serde_json::from_value(v) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(socket = %socket.display(), error = %e, "launcher status not understood");
            None
        }
    }
}

/// The phase a launcher reports, if it answers.
pub async fn phase(socket: &Path) -> Option<Phase> {
    status(socket).await.map(|s| s.state)
}

/// Watches a child: sends `Exited` when it ends.
pub fn watch_child(
    mut child: tokio::process::Child,
    vm: String,
    pid: u32,
    tx: mpsc::UnboundedSender<Event>,
) {
    tokio::spawn(async move {
        use std::os::unix::process::ExitStatusExt;
        let kind = match child.wait().await {
            Ok(st) => ExitKind::from_status(st.code(), st.signal()),
            Err(e) => ExitKind::Failure(format!("wait failed: {e}")),
        };
        let _ = tx.send(Event::Exited { vm, pid, kind });
    });
}

/// Watches an adopted launcher (not our child) by polling; its exit status is unknown.
pub fn watch_pid(vm: String, pid: u32, tx: mpsc::UnboundedSender<Event>) {
    tokio::spawn(async move {
        while pid_alive(pid) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = tx.send(Event::Exited {
            vm,
            pid,
            kind: ExitKind::from_status(None, None),
        });
    });
}

/// Waits until `pid` is gone, up to `timeout`; true if it is gone.
pub async fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pid_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Graceful stop: `PUT /v1/shutdown`, then SIGTERM, then SIGKILL after `grace`.
/// The exit itself is reported by the process watcher.
pub fn shutdown(socket: PathBuf, pid: u32, grace: Duration) {
    tokio::spawn(async move {
        let asked = api(
            &socket,
            "PUT",
            "/v1/shutdown",
            None,
            Some(Duration::from_secs(5)),
        )
        .await;
        if let Err(e) = asked {
            tracing::warn!(pid, error = %e, "shutdown request failed; sending SIGTERM");
            signal(pid, libc::SIGTERM);
        }
        if !wait_gone(pid, grace).await {
            tracing::warn!(
                pid,
                "launcher still running after the grace period; SIGKILL"
            );
            signal(pid, libc::SIGKILL);
        }
    });
}

/// Everything a migration job needs.
#[derive(Debug, Clone)]
pub struct MigrationJob {
    /// VM name.
    pub vm: String,
    /// Record id.
    pub record: i64,
    /// Source launcher API socket and pid.
    pub source_socket: PathBuf,
    /// Source pid.
    pub source_pid: u32,
    /// Target launcher API socket.
    pub target_socket: PathBuf,
    /// Target pid.
    pub target_pid: u32,
    /// Incoming migration socket.
    pub incoming: PathBuf,
    /// Guest memory, for the completion timeout.
    pub memory_bytes: u64,
    /// Limits.
    pub config: LiveMigrationConfig,
    /// Resume after a noded restart: do not send the migrate request, only resolve.
    pub resume: bool,
}

/// The `PUT /v1/migrate` request for the node's live-migration settings: the one place
/// noded builds it (local handovers here, cross-node migrations in `remote.rs`).
pub fn migrate_request(c: &LiveMigrationConfig, to: String, local: bool) -> MigrateRequest {
    MigrateRequest {
        to,
        local,
        downtime_ms: Some(c.downtime_target_ms),
        max_bandwidth: Some(c.bandwidth_per_migration),
        auto_converge: c.allow_auto_converge,
        completion_timeout_per_gib: Some(c.completion_timeout_per_gib),
        progress_timeout: Some(c.progress_timeout),
        ..MigrateRequest::default()
    }
}

/// What the answer to `PUT /v1/migrate` says, read in one place for every migration
/// noded drives.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The destination runs the VM.
    Completed(Value),
    /// Failed or cancelled before the point of no return: the source runs on.
    Failed {
        /// `Failed` or `Cancelled`.
        outcome: &'static str,
        /// Why.
        error: String,
        /// The report.
        report: Value,
    },
    /// The source does not know where the VM runs: ask the destination.
    Unknown {
        /// Why.
        error: String,
        /// The report.
        report: Value,
    },
    /// No report: the request itself was refused (bad body); the source runs on.
    Refused(String),
}

/// Reads the answer to `PUT /v1/migrate` (HTTP status and body).
pub fn read_answer(code: u16, body: Value) -> Answer {
    let report: Report = match serde_json::from_value(body.clone()) {
        Ok(r) => r,
        Err(e) => {
            let why = serde_json::from_value::<ErrorReply>(body.clone())
                .map(|r| r.error)
                .unwrap_or_else(|_| format!("not a migration report ({e}): {body}"));
            return Answer::Refused(format!("HTTP {code}: {why}"));
        }
    };
    match report.verdict(code) {
        Verdict::Completed => Answer::Completed(body),
        Verdict::Failed(error) => Answer::Failed {
            outcome: "Failed",
            error,
            report: body,
        },
        Verdict::Cancelled(error) => Answer::Failed {
            outcome: "Cancelled",
            error,
            report: body,
        },
        Verdict::Unknown(error) => Answer::Unknown {
            error,
            report: body,
        },
    }
}

/// Runs a migration job and reports `MigrationDone`.
pub fn migrate(job: MigrationJob, tx: mpsc::UnboundedSender<Event>) {
    tokio::spawn(async move {
        let result = run_migration(&job).await;
        let _ = tx.send(Event::MigrationDone {
            vm: job.vm.clone(),
            record: job.record,
            result,
        });
    });
}

fn failed(error: impl Into<String>, report: Value) -> MigrationResult {
    MigrationResult::Failed {
        outcome: "Failed".into(),
        error: error.into(),
        report,
    }
}

async fn run_migration(job: &MigrationJob) -> MigrationResult {
    if job.resume {
        return resolve(job, "interrupted by a noded restart").await;
    }
    // 1. The target must be listening on the incoming socket in time.
    let ready_timeout = Duration::from_secs(job.config.target_ready_timeout_seconds);
    let deadline = Instant::now() + ready_timeout;
    loop {
        if job.incoming.exists() {
            break;
        }
        if !pid_alive(job.target_pid) {
            cleanup_target(job).await;
            return failed("target launcher exited before it was ready", Value::Null);
        }
        if Instant::now() >= deadline {
            cleanup_target(job).await;
            return failed(
                format!(
                    "target launcher not ready within {} s",
                    ready_timeout.as_secs()
                ),
                Value::Null,
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 2. Ask the source to migrate; this blocks until the migration ends.
    let req = migrate_request(
        &job.config,
        format!("unix:{}", job.incoming.display()),
        true,
    );
    let timeout = req.reply_timeout(job.memory_bytes);
    let answer = api_raw(
        &job.source_socket,
        "PUT",
        "/v1/migrate",
        Some(to_json(&req)),
        timeout,
    )
    .await;
    let (code, body) = match answer {
        Ok(a) => a,
        // The connection broke: the outcome is unknown, ask both sides.
        Err(e) => return resolve(job, &e.to_string()).await,
    };
    match read_answer(code, body) {
        Answer::Completed(report) => {
            // The source exits 64 by itself; make sure it does.
            if !wait_gone(job.source_pid, Duration::from_secs(10)).await {
                tracing::warn!(vm = %job.vm, "source still running after a completed migration; SIGKILL");
                signal(job.source_pid, libc::SIGKILL);
            }
            MigrationResult::Completed { report }
        }
        // After Go the source may not know where the VM runs: find out.
        Answer::Unknown { error, report } => match resolve(job, &error).await {
            MigrationResult::Failed { error, .. } => MigrationResult::Failed {
                outcome: "Failed".into(),
                error,
                report,
            },
            done => done,
        },
        Answer::Failed {
            outcome,
            error,
            report,
        } => {
            cleanup_target(job).await;
            MigrationResult::Failed {
                outcome: outcome.into(),
                error,
                report,
            }
        }
        // A refusal without a report (bad request): the source keeps running.
        Answer::Refused(error) => {
            cleanup_target(job).await;
            failed(
                format!("source refused the migration: {error}"),
                Value::Null,
            )
        }
    }
}

/// Decides the outcome of a migration whose answer was lost: the target owns the VM only
/// if it answers and runs; otherwise the target is removed and the source resumed.
async fn resolve(job: &MigrationJob, why: &str) -> MigrationResult {
    // Let a migration still in progress finish (the source says "migrating").
    let req = migrate_request(&job.config, String::new(), true);
    let budget = req
        .budget(job.memory_bytes)
        .unwrap_or_else(|| req.progress_timeout());
    let deadline = Instant::now() + budget;
    loop {
        let src = if pid_alive(job.source_pid) {
            phase(&job.source_socket).await
        } else {
            None
        };
        if src != Some(Phase::Migrating) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let target = if pid_alive(job.target_pid) {
        phase(&job.target_socket).await
    } else {
        None
    };
    if target == Some(Phase::Running) {
        // The target runs the VM: the source must not (it exits 64, or stays paused).
        if !wait_gone(job.source_pid, Duration::from_secs(5)).await {
            let _ = api(
                &job.source_socket,
                "PUT",
                "/v1/shutdown",
                None,
                Some(Duration::from_secs(5)),
            )
            .await;
            if !wait_gone(job.source_pid, Duration::from_secs(5)).await {
                signal(job.source_pid, libc::SIGKILL);
            }
        }
        return MigrationResult::Completed {
            report: json!({"status": "completed", "note": format!("outcome resolved after: {why}")}),
        };
    }
    cleanup_target(job).await;
    if pid_alive(job.source_pid) {
        // If the source was left paused, resume it; it owns the VM.
        if let Some(s) = phase(&job.source_socket).await {
            if s == Phase::Paused {
                let _ = api(
                    &job.source_socket,
                    "PUT",
                    "/v1/resume",
                    None,
                    Some(Duration::from_secs(5)),
                )
                .await;
            }
        }
    }
    failed(why.to_string(), Value::Null)
}

/// Kills the target launcher if it is still there and removes its sockets.
async fn cleanup_target(job: &MigrationJob) {
    if pid_runs(job.target_pid, &job.target_socket.display().to_string()) {
        signal(job.target_pid, libc::SIGKILL);
        wait_gone(job.target_pid, Duration::from_secs(5)).await;
    }
    let _ = std::fs::remove_file(&job.incoming);
    let _ = std::fs::remove_file(&job.target_socket);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_and_memory() {
        let spec =
            crate::spec::parse_spec_text("name: a\nkernel: /k\nmemory: 64Mi\ncmdline: every=5")
                .unwrap();
        let a = run_options(
            &spec,
            Path::new("/s/console.log"),
            Path::new("/s/api-1.sock"),
        )
        .to_argv();
        assert_eq!(a[0], "run");
        assert!(a.windows(2).any(|w| w == ["--cmdline", "every=5"]));
        assert!(a.windows(2).any(|w| w == ["--api-socket", "/s/api-1.sock"]));
        let i = incoming_options(
            Path::new("/s/m.sock"),
            Path::new("/s/c.log"),
            Path::new("/s/a.sock"),
        )
        .to_argv();
        assert!(i.windows(2).any(|w| w == ["--incoming", "unix:/s/m.sock"]));
        assert!(!i.contains(&"--net".to_string()));
        assert!(!a.contains(&"--net".to_string()));
        let spec = crate::spec::parse_spec_text(
            "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: tap0, mac: \"52:54:00:00:00:07\"}, {tap: tap1, mac: \"52:54:00:00:00:08\"}]",
        )
        .unwrap();
        let a = run_options(&spec, Path::new("/s/c.log"), Path::new("/s/a.sock")).to_argv();
        let nets: Vec<&[String]> = a.windows(2).filter(|w| w[0] == "--net").collect();
        assert_eq!(
            nets,
            [
                ["--net", "tap=tap0,mac=52:54:00:00:00:07"],
                ["--net", "tap=tap1,mac=52:54:00:00:00:08"]
            ]
        );
    }

    #[test]
    fn the_migrate_request_follows_the_settings_and_answers_are_read_once() {
        let c = crate::settings::NodeSettings::default().live_migration_config;
        let r = migrate_request(&c, "unix:/s/m.sock".into(), true);
        let v = to_json(&r);
        assert_eq!(v["to"], "unix:/s/m.sock");
        assert_eq!(v["local"], true);
        assert_eq!(v["completionTimeoutPerGib"], c.completion_timeout_per_gib);
        // The launcher's side parses exactly this type: no field is unknown to it.
        let back: MigrateRequest =
            contracts::launcher::parse_body(v.to_string().as_bytes()).unwrap();
        assert_eq!(back, r);
        let mut report = Report::new("local", 64 << 20);
        assert!(matches!(
            read_answer(500, to_json(&report)),
            Answer::Failed {
                outcome: "Failed",
                ..
            }
        ));
        report.source_running = false;
        assert!(matches!(
            read_answer(500, to_json(&report)),
            Answer::Unknown { .. }
        ));
        report.status = contracts::report::Outcome::Completed;
        assert!(matches!(
            read_answer(200, to_json(&report)),
            Answer::Completed(_)
        ));
        let refused = read_answer(400, serde_json::json!({"error": "bad request body"}));
        assert_eq!(
            refused,
            Answer::Refused("HTTP 400: bad request body".into())
        );
    }

    #[test]
    fn pid_checks() {
        assert!(pid_alive(std::process::id()));
        assert_eq!(find_pid_with_arg("--no-process-has-this-argument"), None);
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
        assert!(!pid_runs(std::process::id(), "--definitely-not-an-arg"));
    }
}

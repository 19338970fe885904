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
}

/// Arguments of `launcher run` for a fresh boot.
pub fn run_args(spec: &VmSpec, serial: &Path, api_socket: &Path) -> Vec<String> {
    let mut a = vec!["run".to_string(), "--kernel".into(), spec.kernel.clone()];
    if !spec.cmdline.is_empty() {
        a.push("--cmdline".into());
        a.push(spec.cmdline.clone());
    }
    a.extend([
        "--memory".into(),
        memory_arg(spec.memory_bytes),
        "--vcpus".into(),
        spec.vcpus.to_string(),
        "--machine-type".into(),
        spec.machine_type.clone(),
        "--serial".into(),
        serial.display().to_string(),
        "--api-socket".into(),
        api_socket.display().to_string(),
    ]);
    // Disks go to a fresh boot only: an incoming launcher gets them from the migration
    // stream's state, with their locks handed over at the switch-over.
    for d in &spec.disks {
        a.push("--disk".into());
        a.push(d.launcher_arg());
    }
    // One `--net tap=NAME,mac=MAC` per interface; the MAC is always in a stored spec, so
    // the guest has the same one in every launcher.
    for n in &spec.interfaces {
        a.push("--net".into());
        a.push(n.launcher_arg());
    }
    a
}

/// Arguments of `launcher run --incoming` for a migration target.
///
/// No `--net`: noded's migrations are local handovers (`"local": true`), in which the
/// source launcher passes its TAP file descriptors along with the guest memory and the
/// target uses those (its `--net` would be ignored). Giving `--net tap=NAME` here would
/// even be harmful: the target opens named TAPs at start, before the VM arrives, and a
/// single-queue TAP that the source still holds cannot be attached twice.
pub fn incoming_args(incoming: &Path, serial: &Path, api_socket: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "--incoming".into(),
        format!("unix:{}", incoming.display()),
        "--serial".into(),
        serial.display().to_string(),
        "--api-socket".into(),
        api_socket.display().to_string(),
    ]
}

/// The `--memory` value: whole MiB as `<n>M` when possible, else bytes.
pub fn memory_arg(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else {
        bytes.to_string()
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

/// `GET /v1/status` with a short timeout; `None` when nobody answers.
pub async fn status(socket: &Path) -> Option<Value> {
    api(
        socket,
        "GET",
        "/v1/status",
        None,
        Some(Duration::from_secs(2)),
    )
    .await
    .ok()
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

/// The body of `PUT /v1/migrate`.
pub fn migrate_body(incoming: &Path, c: &LiveMigrationConfig) -> Value {
    json!({
        "to": format!("unix:{}", incoming.display()),
        "local": true,
        "downtimeMs": c.downtime_target_ms,
        "maxBandwidth": c.bandwidth_per_migration,
        "autoConverge": c.allow_auto_converge,
        "completionTimeoutPerGib": c.completion_timeout_per_gib,
        "progressTimeout": c.progress_timeout,
    })
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
    let c = &job.config;
    let gib = job.memory_bytes.div_ceil(1 << 30).max(1);
    let timeout = Duration::from_secs(c.completion_timeout_per_gib * gib + c.progress_timeout + 60);
    let body = migrate_body(&job.incoming, c);
    let answer = api_raw(
        &job.source_socket,
        "PUT",
        "/v1/migrate",
        Some(body),
        Some(timeout),
    )
    .await;
    let (code, report) = match answer {
        Ok(a) => a,
        // The connection broke: the outcome is unknown, ask both sides.
        Err(e) => return resolve(job, &e.to_string()).await,
    };
    let status = report["status"].as_str().map(str::to_string);
    let error = report["error"].as_str().map(str::to_string);
    match status.as_deref() {
        Some("completed") if (200..300).contains(&code) => {
            // The source exits 64 by itself; make sure it does.
            if !wait_gone(job.source_pid, Duration::from_secs(10)).await {
                tracing::warn!(vm = %job.vm, "source still running after a completed migration; SIGKILL");
                signal(job.source_pid, libc::SIGKILL);
            }
            MigrationResult::Completed { report }
        }
        // After Go the source may not know where the VM runs: find out.
        Some(_) if report["source_running"] == Value::Bool(false) => {
            let why = error.unwrap_or_else(|| "handover outcome unknown".into());
            match resolve(job, &why).await {
                MigrationResult::Failed { error, .. } => MigrationResult::Failed {
                    outcome: "Failed".into(),
                    error,
                    report,
                },
                done => done,
            }
        }
        Some(st) => {
            cleanup_target(job).await;
            MigrationResult::Failed {
                outcome: if st == "cancelled" {
                    "Cancelled"
                } else {
                    "Failed"
                }
                .into(),
                error: error.unwrap_or_else(|| format!("migration {st}")),
                report,
            }
        }
        // A refusal without a report (bad request, wrong state): the source keeps running.
        None => {
            cleanup_target(job).await;
            failed(
                format!(
                    "source refused the migration ({code}): {}",
                    error.unwrap_or_else(|| report.to_string())
                ),
                Value::Null,
            )
        }
    }
}

/// Decides the outcome of a migration whose answer was lost: the target owns the VM only
/// if it answers and runs; otherwise the target is removed and the source resumed.
async fn resolve(job: &MigrationJob, why: &str) -> MigrationResult {
    // Let a migration still in progress finish (the source says "migrating").
    let c = &job.config;
    let gib = job.memory_bytes.div_ceil(1 << 30).max(1);
    let deadline = Instant::now()
        + Duration::from_secs(c.completion_timeout_per_gib * gib + c.progress_timeout);
    loop {
        let src = if pid_alive(job.source_pid) {
            status(&job.source_socket).await
        } else {
            None
        };
        let migrating = src.as_ref().and_then(|s| s["state"].as_str()) == Some("migrating");
        if !migrating || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let target = if pid_alive(job.target_pid) {
        status(&job.target_socket).await
    } else {
        None
    };
    if target.as_ref().and_then(|t| t["state"].as_str()) == Some("running") {
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
        if let Some(s) = status(&job.source_socket).await {
            if s["state"].as_str() == Some("paused") {
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
        assert_eq!(memory_arg(64 << 20), "64M");
        assert_eq!(memory_arg(4096 * 3), "12288");
        let spec =
            crate::spec::parse_spec_text("name: a\nkernel: /k\nmemory: 64Mi\ncmdline: every=5")
                .unwrap();
        let a = run_args(
            &spec,
            Path::new("/s/console.log"),
            Path::new("/s/api-1.sock"),
        );
        assert_eq!(a[0], "run");
        assert!(a.windows(2).any(|w| w == ["--cmdline", "every=5"]));
        assert!(a.windows(2).any(|w| w == ["--api-socket", "/s/api-1.sock"]));
        let i = incoming_args(
            Path::new("/s/m.sock"),
            Path::new("/s/c.log"),
            Path::new("/s/a.sock"),
        );
        assert!(i.windows(2).any(|w| w == ["--incoming", "unix:/s/m.sock"]));
        assert!(!i.contains(&"--net".to_string()));
        assert!(!a.contains(&"--net".to_string()));
        let spec = crate::spec::parse_spec_text(
            "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: tap0, mac: \"52:54:00:00:00:07\"}, {tap: tap1, mac: \"52:54:00:00:00:08\"}]",
        )
        .unwrap();
        let a = run_args(&spec, Path::new("/s/c.log"), Path::new("/s/a.sock"));
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
    fn pid_checks() {
        assert!(pid_alive(std::process::id()));
        assert_eq!(find_pid_with_arg("--no-process-has-this-argument"), None);
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
        assert!(!pid_runs(std::process::id(), "--definitely-not-an-arg"));
    }
}

//! The launcher's control API: HTTP/1.1 + JSON on a Unix socket (mode 0600).
//!
//! Each connection is served on its own thread, so that a cancel can arrive
//! while a migration request is still being answered.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use super::runtime::{Phase, Runtime};
use super::{LaunchError, VERSION};
use contracts::http;

/// Handles `PUT /v1/migrate` and `PUT /v1/migrate/cancel`; provided by the
/// migration glue so that this module does not depend on it.
pub trait MigrationHandler: Send + Sync {
    /// Run a migration described by `body`; return the report (HTTP 200) or an
    /// error report (HTTP 500 with the same JSON shape).
    fn migrate(&self, runtime: &Arc<Runtime>, body: &Value) -> (u16, Value);
    /// Cancel the migration in progress, if any.
    fn cancel(&self) -> (u16, Value);
    /// Progress of the migration in progress (`{"active": false}` when none).
    fn progress(&self) -> (u16, Value);
    /// Change the bandwidth cap or downtime target of the migration in progress.
    fn set_limits(&self, body: &Value) -> (u16, Value);
}

/// Bind the API socket with mode 0600, replacing a stale socket file.
pub fn bind(path: &Path) -> Result<UnixListener, LaunchError> {
    let err = |why: String| LaunchError::Api {
        path: path.display().to_string(),
        why,
    };
    if path.exists() {
        // A socket nobody answers on is stale; a live one belongs to another launcher.
        if UnixStream::connect(path).is_ok() {
            return Err(err(
                "another process is already serving this socket; choose another path".into(),
            ));
        }
        std::fs::remove_file(path).map_err(|e| err(format!("cannot remove stale socket: {e}")))?;
    }
    // SAFETY: umask only changes this process's file-creation mask; we restore it at once.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l.map_err(|e| err(format!("cannot bind: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(format!("cannot set mode 0600: {e}")))?;
    Ok(l)
}

/// Serve the API until the process exits.
pub fn serve(listener: UnixListener, runtime: Arc<Runtime>, migration: Arc<dyn MigrationHandler>) {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if !peer_allowed(&conn) {
                    let _ = http::write_response(
                        &mut conn,
                        403,
                        &http::error_body(
                            "peer not allowed: only the launcher's own user may use this socket",
                        ),
                    );
                    continue;
                }
                let runtime = runtime.clone();
                let migration = migration.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || handle(&mut conn, &runtime, migration.as_ref()));
            }
        })
        .ok();
}

/// Only this process's user (or root) may drive the VM.
fn peer_allowed(conn: &UnixStream) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    match getsockopt(conn, PeerCredentials) {
        Ok(c) => {
            let me = nix::unistd::geteuid().as_raw();
            c.uid() == me || c.uid() == 0
        }
        Err(_) => false,
    }
}

fn handle(conn: &mut UnixStream, runtime: &Arc<Runtime>, migration: &dyn MigrationHandler) {
    let req = match http::read_request(conn) {
        Ok(r) => r,
        Err(e) => {
            let _ = http::write_response(conn, e.status(), &http::error_body(e));
            return;
        }
    };
    let (status, body) = route(&req, runtime, migration);
    let _ = http::write_response(conn, status, &body);
}

fn bad(status: u16, msg: impl std::fmt::Display) -> (u16, Value) {
    (status, http::error_body(msg))
}

fn route(
    req: &http::Request,
    runtime: &Arc<Runtime>,
    migration: &dyn MigrationHandler,
) -> (u16, Value) {
    let body = if req.body.is_empty() {
        Value::Null
    } else {
        match req.json() {
            Ok(v) => v,
            Err(e) => return bad(400, e),
        }
    };
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/status") => (200, status(runtime)),
        ("PUT", "/v1/pause") => {
            let Some(vm) = runtime.vm() else {
                return bad(409, "no VM runs here yet");
            };
            if runtime.phase() != Phase::Running {
                return bad(
                    409,
                    format!("VM is {}, not running", runtime.phase().as_str()),
                );
            }
            match vm.hold_pause() {
                Ok(()) => {
                    runtime.set_phase(Phase::Paused);
                    (200, json!({}))
                }
                Err(e) => bad(500, e),
            }
        }
        ("PUT", "/v1/resume") => {
            let Some(vm) = runtime.vm() else {
                return bad(409, "no VM runs here yet");
            };
            if runtime.phase() != Phase::Paused {
                return bad(
                    409,
                    format!("VM is {}, not paused", runtime.phase().as_str()),
                );
            }
            match vm.resume() {
                Ok(()) => {
                    runtime.set_phase(Phase::Running);
                    (200, json!({}))
                }
                Err(e) => bad(500, e),
            }
        }
        ("PUT", "/v1/snapshot") => snapshot(runtime, &body),
        ("PUT", "/v1/migrate") => migration.migrate(runtime, &body),
        ("PUT", "/v1/migrate/cancel") => migration.cancel(),
        ("GET", "/v1/migrate") => migration.progress(),
        ("PUT", "/v1/migrate/limits") => migration.set_limits(&body),
        ("PUT", "/v1/shutdown") => {
            runtime.request_exit(0);
            (200, json!({}))
        }
        (
            _,
            "/v1/status" | "/v1/pause" | "/v1/resume" | "/v1/snapshot" | "/v1/migrate"
            | "/v1/migrate/cancel" | "/v1/shutdown",
        ) => bad(
            405,
            format!("method {} not allowed on {}", req.method, req.path),
        ),
        _ => bad(404, format!("no such endpoint {}", req.path)),
    }
}

fn status(runtime: &Runtime) -> Value {
    let mut v = json!({
        "state": runtime.phase().as_str(),
        "version": VERSION,
        "pid": std::process::id(),
    });
    if let Some(vm) = runtime.vm() {
        let c = vm.config();
        v["machineType"] = json!(c.machine_type);
        v["memoryBytes"] = json!(c.memory_bytes);
        v["vcpus"] = json!(c.vcpus);
    }
    v
}

fn snapshot(runtime: &Runtime, body: &Value) -> (u16, Value) {
    let Some(path) = body.get("path").and_then(Value::as_str) else {
        return bad(400, "body must be {\"path\": \"FILE\", \"stop\": false}");
    };
    let stop = body.get("stop").and_then(Value::as_bool).unwrap_or(false);
    let Some(vm) = runtime.vm() else {
        return bad(409, "no VM runs here yet");
    };
    match write_snapshot(&vm, Path::new(path), stop) {
        Ok(stats) => {
            if stop {
                runtime.request_exit(0);
            }
            (
                200,
                json!({"path": path, "memoryBytes": stats.memory_bytes, "stateBytes": stats.state_bytes}),
            )
        }
        Err(e) => bad(500, e),
    }
}

/// Pause, write the snapshot to a temporary file, rename it into place, and resume
/// unless `stop` (then the VM stays paused for good: its continuation is the file).
pub fn write_snapshot(
    vm: &vmm::Vm,
    path: &Path,
    stop: bool,
) -> Result<vmm::snapshot::SnapshotStats, LaunchError> {
    let tmp: PathBuf = {
        let mut t = path.as_os_str().to_owned();
        t.push(".tmp");
        t.into()
    };
    let file_err = |what, source| LaunchError::File {
        what,
        path: path.display().to_string(),
        source,
    };
    let guard = vm.pause()?;
    let state = vm.save_state(&guard)?;
    let f = std::fs::File::create(&tmp).map_err(|e| file_err("cannot create snapshot", e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let stats = vmm::snapshot::write(&mut w, &state, vm.ram());
    let stats = match stats {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    let f = w
        .into_inner()
        .map_err(|e| file_err("cannot write snapshot", e.into_error()))?;
    f.sync_all()
        .map_err(|e| file_err("cannot sync snapshot", e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err("cannot rename snapshot into place", e))?;
    if stop {
        guard.keep_paused();
    }
    Ok(stats)
}

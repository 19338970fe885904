//! The launcher's control API: HTTP/1.1 + JSON on a Unix socket (mode 0600).
//!
//! Each connection is served on its own thread, so that a cancel can arrive
//! while a migration request is still being answered.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::runtime::{Runtime, RuntimeError};
use super::{LaunchError, VERSION};
use contracts::http;
use contracts::launcher::{
    parse_body, to_json, Empty, LimitsPatch, MigrateRequest, MigrationProgress, SnapshotReply,
    SnapshotRequest, Status,
};
use contracts::report::Report;

/// Handles the `/v1/migrate` endpoints; provided by the migration glue so that this
/// module does not depend on it.
pub trait MigrationHandler: Send + Sync {
    /// Run a migration; return the report: HTTP 200 when it completed, else an error
    /// status with the same shape (a refusal is a report too, with `error`).
    fn migrate(&self, runtime: &Arc<Runtime>, req: &MigrateRequest) -> (u16, Report);
    /// Cancel the migration in progress, if any.
    fn cancel(&self) -> Result<Empty, String>;
    /// Progress of the migration in progress (`{"active": false}` when none).
    fn progress(&self) -> MigrationProgress;
    /// Change the bandwidth cap or downtime target of the migration in progress.
    fn set_limits(&self, patch: &LimitsPatch) -> Result<Empty, String>;
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

/// Parses a request body into its contract type; an unknown field, a wrong type or a
/// missing field is a 400 that names it.
fn body<T: DeserializeOwned>(req: &http::Request) -> Result<T, (u16, Value)> {
    parse_body(&req.body).map_err(|e| {
        bad(
            400,
            format!("bad request body for {} {}: {e}", req.method, req.path),
        )
    })
}

fn reply<T: serde::Serialize>(r: Result<T, RuntimeError>) -> (u16, Value) {
    match r {
        Ok(v) => (200, to_json(&v)),
        Err(e) => bad(e.status(), e),
    }
}

fn conflict<T: serde::Serialize>(r: Result<T, String>) -> (u16, Value) {
    match r {
        Ok(v) => (200, to_json(&v)),
        Err(e) => bad(409, e),
    }
}

fn route(
    req: &http::Request,
    runtime: &Arc<Runtime>,
    migration: &dyn MigrationHandler,
) -> (u16, Value) {
    let r = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/status") => return (200, to_json(&status(runtime))),
        ("GET", "/v1/migrate") => return (200, to_json(&migration.progress())),
        ("PUT", "/v1/pause") => {
            body::<Empty>(req).map(|_| reply(runtime.pause().map(|()| Empty {})))
        }
        ("PUT", "/v1/resume") => {
            body::<Empty>(req).map(|_| reply(runtime.resume().map(|()| Empty {})))
        }
        ("PUT", "/v1/snapshot") => body::<SnapshotRequest>(req).map(|b| snapshot(runtime, &b)),
        ("PUT", "/v1/migrate") => body::<MigrateRequest>(req).map(|b| {
            let (status, report) = migration.migrate(runtime, &b);
            (status, to_json(&report))
        }),
        ("PUT", "/v1/migrate/cancel") => body::<Empty>(req).map(|_| conflict(migration.cancel())),
        ("PUT", "/v1/migrate/limits") => {
            body::<LimitsPatch>(req).map(|b| conflict(migration.set_limits(&b)))
        }
        ("PUT", "/v1/shutdown") => body::<Empty>(req).map(|_| {
            runtime.request_exit(0);
            (200, to_json(&Empty {}))
        }),
        (
            _,
            "/v1/status" | "/v1/pause" | "/v1/resume" | "/v1/snapshot" | "/v1/migrate"
            | "/v1/migrate/cancel" | "/v1/migrate/limits" | "/v1/shutdown",
        ) => Err(bad(
            405,
            format!("method {} not allowed on {}", req.method, req.path),
        )),
        _ => Err(bad(404, format!("no such endpoint {}", req.path))),
    };
    r.unwrap_or_else(|e| e)
}

fn status(runtime: &Runtime) -> Status {
    let vm = runtime.vm();
    let c = vm.as_ref().map(|vm| vm.config());
    Status {
        state: runtime.phase(),
        version: VERSION.to_string(),
        pid: std::process::id(),
        machine_type: c.map(|c| c.machine_type.clone()),
        memory_bytes: c.map(|c| c.memory_bytes),
        vcpus: c.map(|c| c.vcpus),
    }
}

fn snapshot(runtime: &Runtime, req: &SnapshotRequest) -> (u16, Value) {
    let vm = match runtime.snapshot_vm() {
        Ok(vm) => vm,
        Err(e) => return bad(e.status(), e),
    };
    match write_snapshot(&vm, Path::new(&req.path), req.stop) {
        Ok(stats) => {
            if req.stop {
                runtime.request_exit(0);
            }
            let r = SnapshotReply {
                path: req.path.clone(),
                memory_bytes: stats.memory_bytes,
                state_bytes: stats.state_bytes,
            };
            (200, to_json(&r))
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
    let stats = vm.write_snapshot(&mut w, &state, &guard);
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

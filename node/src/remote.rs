//! Live migration between two nodes, driven by the operator (docs/update-flow.md, "Moving
//! a VM to another node"):
//!
//! - on the target node, `nodectl vm receive -f SPEC --listen tcp:IP:PORT --tls-dir DIR`
//!   (`POST /v1/vms/receive`) records the VM as `Receiving` (write-ahead), starts
//!   `launcher run --incoming tcp:IP:PORT --tls-dir DIR` on the node's target launcher
//!   and adopts the VM as `Running` once that launcher's `/v1/status` says `running`. An
//!   incoming launcher that ends before then (a failed migration) leaves the VM stopped
//!   (`ReceiveFailed`), never started here: it still runs on the source node.
//! - on the source node, `nodectl vm migrate NAME --to tcp:IP:PORT --tls-dir DIR`
//!   (`PUT /v1/vms/{name}/migrate`) records the VM as `MigratingOut` (write-ahead) and
//!   sends `PUT /v1/migrate` (TCP with mutual TLS, no local handover) to its launcher.
//!   When the migration completes (the launcher exits 64) the VM is recorded as
//!   `MovedAway` and never restarted here; when it fails the VM keeps running here with
//!   the error shown. A launcher that ends in any other way during the migration leaves
//!   the VM stopped (`Failed`), not restarted: where it runs must be checked on the
//!   destination node first, so that it never runs twice.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::coordinator::{ExitKind, Millis, StopCause, VmState, VmStatus};
use super::daemon::{Daemon, Vm};
use super::requests::{err, only_fields, Reply};
use super::store::VmRow;
use super::supervisor::{self, Answer, Event, MigrationResult};
use super::views::now_ms;
use contracts::launch::{LaunchOptions, VmSource};
use contracts::launcher::{to_json, MigrateRequest, Phase};

/// A `tcp:HOST:PORT` address.
fn tcp_address(field: &str, v: Option<&Value>) -> Result<String, Reply> {
    match v.and_then(Value::as_str) {
        Some(s) if s.strip_prefix("tcp:").is_some_and(|a| a.contains(':')) => Ok(s.to_string()),
        Some(s) => Err(err(400, format!("{field}: {s:?} is not tcp:HOST:PORT"))),
        None => Err(err(400, format!("{field}: required (tcp:HOST:PORT)"))),
    }
}

/// An absolute TLS directory (mutual TLS is mandatory between nodes).
fn tls_dir(v: Option<&Value>) -> Result<String, Reply> {
    match v.and_then(Value::as_str) {
        Some(s) if Path::new(s).is_absolute() => Ok(s.to_string()),
        Some(s) => Err(err(400, format!("tlsDir: {s:?} must be an absolute path"))),
        None => Err(err(
            400,
            "tlsDir: required (ca.pem, cert.pem, key.pem; migrations between nodes use mutual TLS)",
        )),
    }
}

/// `launcher run --incoming` options for a VM coming from another node. Unlike a local
/// handover, no TAP descriptor travels with the guest: the target opens its own TAPs
/// (`--net`, same MACs); disks come with the migration stream's state.
pub fn remote_incoming_options(
    listen: &str,
    tls_dir: &str,
    serial: &Path,
    api_socket: &Path,
    spec: &super::spec::VmSpec,
) -> LaunchOptions {
    LaunchOptions {
        source: VmSource::Incoming {
            uri: listen.to_string(),
            tls_dir: Some(tls_dir.to_string()),
            insecure: false,
        },
        nets: spec.interfaces.iter().map(|n| n.launcher_arg()).collect(),
        serial: Some(serial.display().to_string()),
        api_socket: Some(api_socket.display().to_string()),
        watchdog_file: None,
        watchdog_timeout_ms: None,
        migration_stall_timeout_ms: None,
    }
}

impl Daemon {
    /// `POST /v1/vms/receive` `{"spec": {...}, "listen": "tcp:IP:PORT", "tlsDir": DIR}`.
    pub(crate) fn receive_request(&mut self, body: &Value) -> Reply {
        if let Err(r) = only_fields(body, &["spec", "listen", "tlsDir"]) {
            return r;
        }
        let listen = match tcp_address("listen", body.get("listen")) {
            Ok(l) => l,
            Err(r) => return r,
        };
        let tls = match tls_dir(body.get("tlsDir")) {
            Ok(t) => t,
            Err(r) => return r,
        };
        let (spec, launcher) = match self.admit_new_vm(body.get("spec").unwrap_or(&Value::Null)) {
            Ok(admitted) => admitted,
            Err(reply) => return reply,
        };
        let name = spec.name.clone();
        let dir = self.vm_dir(&name);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return err(500, format!("{}: {e}", dir.display()));
        }
        let now = now_ms();
        let record = match self.store.migration_started(
            &name,
            &format!("remote {listen}"),
            &launcher.version,
            now,
        ) {
            Ok(r) => r,
            Err(e) => return err(500, e),
        };
        let api_socket = dir.join("api-1.sock");
        let _ = std::fs::remove_file(&api_socket);
        let mut status = VmStatus::new(&spec, now);
        status.state = VmState::Receiving {
            since: now,
            listen: listen.clone(),
            record,
        };
        status.generation = 1;
        status.api_socket = Some(api_socket.display().to_string());
        status.launcher_version = Some(launcher.version.clone());
        let serial = dir.join("console.log");
        let row = VmRow {
            status,
            serial_log: serial.display().to_string(),
            created_at: now,
            spec,
        };
        // Write-ahead: the record exists before the launcher does.
        if let Err(e) = self.store.insert_vm(&row) {
            return err(500, e);
        }
        let args = self.launch_argv(remote_incoming_options(
            &listen,
            &tls,
            &serial,
            &api_socket,
            &row.spec,
        ));
        self.vms.insert(
            name.clone(),
            Vm {
                spec: row.spec,
                status: row.status,
                serial_log: serial,
                created_at: now,
                launched_at: now,
                source_exit: None,
                target_exit: None,
            },
        );
        tracing::info!(vm = %name, listen = %listen, version = %launcher.version, "receiving a VM from another node");
        let spawned = supervisor::spawn(
            Path::new(&launcher.path),
            &args,
            &dir.join("launcher-1.log"),
        );
        let Some(vm) = self.vms.get_mut(&name) else {
            return err(500, "VM vanished");
        };
        match spawned {
            Ok(child) => {
                let pid = child.id().unwrap_or(0);
                vm.status.pid = Some(pid);
                self.persist(&name);
                supervisor::watch_child(child, name.clone(), pid, self.events.clone());
                watch_receive(
                    name.clone(),
                    record,
                    pid,
                    api_socket,
                    None,
                    self.events.clone(),
                );
            }
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "cannot start the incoming launcher");
                vm.status.state = VmState::Stopped {
                    cause: StopCause::ReceiveFailed(e.to_string()),
                };
                vm.status.last_error = Some(e.to_string());
                vm.status.api_socket = None;
                vm.status.launcher_version = None;
                self.persist(&name);
                let _ = self.store.migration_finished(
                    record,
                    now_ms(),
                    "Failed",
                    &json!({ "error": e.to_string() }),
                );
                return err(500, e);
            }
        }
        self.vm_reply(&name, 202)
    }

    /// `PUT /v1/vms/{name}/migrate` `{"to": "tcp:IP:PORT", "tlsDir": DIR,
    /// "tlsServerName": NAME}`.
    pub(crate) fn migrate_out_request(&mut self, name: &str, body: &Value) -> Reply {
        if let Err(r) = only_fields(body, &["to", "tlsDir", "tlsServerName"]) {
            return r;
        }
        let to = match tcp_address("to", body.get("to")) {
            Ok(t) => t,
            Err(r) => return r,
        };
        let tls = match tls_dir(body.get("tlsDir")) {
            Ok(t) => t,
            Err(r) => return r,
        };
        let server_name = match body.get("tlsServerName") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => return err(400, format!("tlsServerName: {other} must be a string")),
        };
        let now = now_ms();
        let Some(vm) = self.vms.get(name) else {
            return err(404, format!("VM {name} not found"));
        };
        if !matches!(
            vm.status.state,
            VmState::Running { .. } | VmState::Backoff { .. }
        ) {
            return err(
                409,
                format!(
                    "VM {name} is {}; only a running VM can migrate to another node",
                    vm.status.state.phase(now)
                ),
            );
        }
        if let Some(why) = vm.spec.migratability().cross_host_reason {
            return err(409, format!("VM {name} cannot move to another node: {why}"));
        }
        let (Some(pid), Some(socket)) = (vm.status.pid, vm.status.api_socket.clone()) else {
            return err(409, format!("VM {name} has no launcher"));
        };
        let source_version = vm.status.launcher_version.clone().unwrap_or_default();
        let memory_bytes = vm.spec.memory_bytes;
        let record = match self
            .store
            .migration_started(name, &source_version, &to, now)
        {
            Ok(r) => r,
            Err(e) => return err(500, e),
        };
        let c = self.settings.live_migration_config.clone();
        let Some(vm) = self.vms.get_mut(name) else {
            return err(404, format!("VM {name} not found"));
        };
        vm.status.state = VmState::MigratingOut {
            since: now,
            to: to.clone(),
            record,
            outcome_unknown: None,
        };
        vm.source_exit = None;
        if !self.persist(name) {
            return err(500, "cannot record the state");
        }
        let req = MigrateRequest {
            tls_dir: Some(tls),
            tls_server_name: server_name,
            ..supervisor::migrate_request(&c, to.clone(), false)
        };
        tracing::info!(vm = name, to = %to, "migrating to another node");
        let (vm, tx) = (name.to_string(), self.events.clone());
        tokio::spawn(async move {
            let result = migrate_out(&PathBuf::from(socket), pid, &req, memory_bytes, true).await;
            let _ = tx.send(Event::RemoteDone { vm, record, result });
        });
        self.vm_reply(name, 202)
    }

    /// The end of a cross-node migration job.
    pub(crate) fn on_remote_done(&mut self, name: &str, record: i64, result: MigrationResult) {
        let now = now_ms();
        let (outcome, report) = result.record();
        let error = match &result {
            MigrationResult::Completed { .. } => None,
            MigrationResult::Failed { error, .. } | MigrationResult::Unknown { error, .. } => {
                Some(error.clone())
            }
        };
        let unknown = matches!(result, MigrationResult::Unknown { .. });
        if let Err(e) = self
            .store
            .migration_finished(record, now, &outcome, &report)
        {
            tracing::error!(vm = name, error = %e, "cannot record migration outcome");
        }
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        match vm.status.state.clone() {
            VmState::Receiving { record: r, .. } if r == record => {
                // A failure is decided by the incoming launcher's exit (after_exit).
                if error.is_none() {
                    tracing::info!(vm = name, "VM received from another node; running");
                    vm.status.state = VmState::Running { since: now };
                    vm.status.last_error = None;
                    vm.launched_at = now;
                }
            }
            VmState::MigratingOut { record: r, to, .. } if r == record => match error {
                None => {
                    tracing::info!(vm = name, to = %to, "VM moved to another node");
                    if let Some(s) = vm.status.api_socket.take() {
                        let _ = std::fs::remove_file(s);
                    }
                    vm.status.pid = None;
                    vm.status.launcher_version = None;
                    vm.status.last_error = None;
                    vm.source_exit = None;
                    vm.status.state = VmState::Stopped {
                        cause: StopCause::MovedAway(to),
                    };
                }
                Some(error) if unknown && vm.source_exit.is_none() => {
                    tracing::warn!(vm = name, to = %to, error = %error, "handover outcome unknown: the VM stays paused here");
                    vm.status.last_error = Some(format!(
                        "handover to {to}: outcome unknown ({error}); the VM is paused here. In a cluster the target node decides; otherwise check the destination (nodectl vm get {name} there): if it runs the VM, nodectl vm resolve {name} --moved-away here; if not, nodectl vm resolve {name} --resume"
                    ));
                    vm.status.state = VmState::MigratingOut {
                        since: vm.launched_at,
                        to,
                        record,
                        outcome_unknown: Some(error),
                    };
                }
                Some(error) => {
                    tracing::warn!(vm = name, to = %to, error = %error, "migration to another node failed");
                    vm.status.last_error = Some(format!("migration to {to} failed: {error}"));
                    match vm.source_exit.take() {
                        // The launcher ended too: where the VM runs is unknown here, so it
                        // is not restarted (it may run on the destination).
                        Some(kind) => {
                            let why = format!(
                                "launcher ended ({kind:?}) during the migration to {to}: {error}; check the destination node before starting it here"
                            );
                            vm.status.pid = None;
                            vm.status.api_socket = None;
                            vm.status.launcher_version = None;
                            vm.status.state = VmState::Stopped {
                                cause: StopCause::Failed(why),
                            };
                        }
                        None => {
                            vm.status.state = VmState::Running {
                                since: vm.launched_at,
                            }
                        }
                    }
                }
            },
            _ => return,
        }
        self.persist(name);
    }

    /// After a noded restart, a VM that was `Receiving` or `MigratingOut`.
    pub(crate) fn adopt_remote(&mut self, name: &str, pid: Option<u32>) {
        let now = now_ms();
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let state = vm.status.state.clone();
        let socket = PathBuf::from(vm.status.api_socket.clone().unwrap_or_default());
        match (state, pid) {
            (VmState::Receiving { record, .. }, Some(pid)) => {
                vm.status.pid = Some(pid);
                self.persist(name);
                supervisor::watch_pid(name.to_string(), pid, self.events.clone());
                watch_receive(
                    name.to_string(),
                    record,
                    pid,
                    socket,
                    None,
                    self.events.clone(),
                );
            }
            (VmState::Receiving { .. }, None) => {
                self.apply_exit(name, &ExitKind::from_status(None, None), now)
            }
            (VmState::MigratingOut { record, to, .. }, Some(pid)) => {
                vm.status.pid = Some(pid);
                let memory_bytes = vm.spec.memory_bytes;
                self.persist(name);
                supervisor::watch_pid(name.to_string(), pid, self.events.clone());
                let (vm, tx) = (name.to_string(), self.events.clone());
                let req =
                    supervisor::migrate_request(&self.settings.live_migration_config, to, false);
                tokio::spawn(async move {
                    let result = migrate_out(&socket, pid, &req, memory_bytes, false).await;
                    let _ = tx.send(Event::RemoteDone { vm, record, result });
                });
            }
            (VmState::MigratingOut { record, to, .. }, None) => {
                vm.source_exit = Some(ExitKind::from_status(None, None));
                self.on_remote_done(
                    name,
                    record,
                    failed(format!(
                        "noded restarted and the launcher is gone (migrated to {to}?)"
                    )),
                );
            }
            _ => {}
        }
    }
}

fn failed(error: impl Into<String>) -> MigrationResult {
    MigrationResult::Failed {
        outcome: "Failed".into(),
        error: error.into(),
        report: Value::Null,
    }
}

/// Polls an incoming launcher until it runs the VM (`Completed`) or ends (`Failed`).
fn watch_receive(
    vm: String,
    record: i64,
    pid: u32,
    socket: PathBuf,
    deadline: Option<Millis>,
    tx: mpsc::UnboundedSender<Event>,
) {
    tokio::spawn(async move {
        let result = loop {
            if !supervisor::pid_alive(pid) {
                break failed("the incoming launcher ended before the VM arrived");
            }
            if deadline.is_some_and(|d| now_ms() > d) {
                break failed("timed out");
            }
            if let Some(s) = supervisor::status(&socket).await {
                if s.state == Phase::Running {
                    break MigrationResult::Completed {
                        report: to_json(&s),
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let _ = tx.send(Event::RemoteDone { vm, record, result });
    });
}

/// Sends `req` to the source launcher (or, with `send` false after a noded restart,
/// only waits for the migration in progress to end) and reports the outcome.
async fn migrate_out(
    socket: &Path,
    pid: u32,
    req: &MigrateRequest,
    memory_bytes: u64,
    send: bool,
) -> MigrationResult {
    let answer = if send {
        let timeout = req.reply_timeout(memory_bytes);
        let body = Some(to_json(req));
        Some(supervisor::api_raw(socket, "PUT", "/v1/migrate", body, timeout).await)
    } else {
        None
    };
    let why = match answer {
        Some(Ok((code, body))) => match supervisor::read_answer(code, body) {
            Answer::Completed(report) => {
                // The launcher exits 64 by itself; make sure it does: the VM runs on
                // the destination now.
                if !supervisor::wait_gone(pid, Duration::from_secs(10)).await {
                    tracing::warn!(
                        pid,
                        "source still running after a completed migration; SIGKILL"
                    );
                    supervisor::signal(pid, libc::SIGKILL);
                    supervisor::wait_gone(pid, Duration::from_secs(5)).await;
                }
                return MigrationResult::Completed { report };
            }
            Answer::Failed {
                outcome,
                error,
                report,
            } => {
                return MigrationResult::Failed {
                    outcome: outcome.into(),
                    error,
                    report,
                }
            }
            // The launcher stays paused: where the VM runs is for the target to say.
            Answer::Unknown { error, report } => {
                return MigrationResult::Unknown { error, report };
            }
            Answer::Refused(e) => {
                return failed(format!("the launcher refused the migration: {e}"))
            }
        },
        Some(Err(e)) => e.to_string(),
        None => "interrupted by a noded restart".to_string(),
    };
    // The answer was lost (or noded restarted): let a migration in progress end, then
    // judge by whether the launcher still runs the VM.
    let budget = req
        .budget(memory_bytes)
        .unwrap_or_else(|| req.progress_timeout());
    let deadline = Instant::now() + budget + contracts::launcher::REPLY_MARGIN;
    while supervisor::pid_alive(pid) && Instant::now() < deadline {
        if supervisor::phase(socket).await != Some(Phase::Migrating) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A source left paused after the migration lost the handover's answer (or was
    // paused before it): it must not resume until someone knows where the VM runs.
    if supervisor::pid_alive(pid) && supervisor::phase(socket).await == Some(Phase::Paused) {
        return MigrationResult::Unknown {
            error: why,
            report: Value::Null,
        };
    }
    failed(why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::after_exit;
    use crate::spec::parse_spec_text;

    #[test]
    fn ends_during_cross_node_migrations_never_restart() {
        let spec = parse_spec_text("name: a\nkernel: /k\nmemory: 64Mi").unwrap();
        let mut st = VmStatus::new(&spec, 0);
        st.state = VmState::Receiving {
            since: 0,
            listen: "tcp:10.0.0.2:4000".into(),
            record: 1,
        };
        assert_eq!(st.state.phase(0), "Receiving");
        assert!(st.state.has_launcher());
        let n = after_exit(&st, &spec, &ExitKind::Failure("exit status 1".into()), 5, 5);
        assert_eq!(
            n.state,
            VmState::Stopped {
                cause: StopCause::ReceiveFailed("exit status 1".into())
            }
        );
        st.state = VmState::MigratingOut {
            since: 0,
            to: "tcp:10.0.0.2:4000".into(),
            record: 2,
            outcome_unknown: None,
        };
        assert_eq!(st.state.phase(0), "MigratingOut");
        let n = after_exit(&st, &spec, &ExitKind::MigratedAway, 5, 5);
        assert_eq!(n.state.phase(5), "MovedAway");
        assert_eq!(
            n.state,
            VmState::Stopped {
                cause: StopCause::MovedAway("tcp:10.0.0.2:4000".into())
            }
        );
    }

    #[test]
    fn request_checks() {
        assert!(tcp_address("to", Some(&json!("tcp:10.0.0.2:4000"))).is_ok());
        assert!(tcp_address("to", Some(&json!("unix:/x"))).is_err());
        assert!(tcp_address("to", None).is_err());
        assert!(tls_dir(Some(&json!("/etc/tls"))).is_ok());
        assert!(tls_dir(Some(&json!("tls"))).is_err());
        assert!(only_fields(&json!({"to": 1, "local": true}), &["to"]).is_err());
        let spec =
            parse_spec_text("name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: t0, mac: \"52:54:00:00:00:01\"}]")
                .unwrap();
        let a = remote_incoming_options(
            "tcp:10.0.0.2:4000",
            "/tls",
            Path::new("/c.log"),
            Path::new("/a.sock"),
            &spec,
        )
        .to_argv();
        assert!(a
            .windows(2)
            .any(|w| w == ["--incoming", "tcp:10.0.0.2:4000"]));
        assert!(a.windows(2).any(|w| w == ["--tls-dir", "/tls"]));
        assert!(a
            .windows(2)
            .any(|w| w == ["--net", "tap=t0,mac=52:54:00:00:00:01"]));
    }
}

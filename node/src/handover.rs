//! The end of a cross-node handover whose outcome the source does not know.
//!
//! After `Go`, a source launcher that loses the destination's answer stays paused: it
//! cannot tell whether the destination runs the guest (docs/wire-protocol.md). noded then
//! keeps the VM `MigratingOut` with `outcomeUnknown` set, and never restarts it here on
//! its own. In a cluster the target node knows the answer and writes it into the
//! migration record; the agent then brings it here as a [`Resolution`]
//! (docs/cluster.md, "Handover outcome unknown"). Outside a cluster the operator, who
//! can look at the destination node, gives the answer: `nodectl vm resolve NAME
//! --resume` when the destination does not run the VM (the paused copy goes on here,
//! without a reboot), `--moved-away` when it does (the paused copy goes).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::coordinator::{ExitKind, StopCause, VmState};
use super::daemon::Daemon;
use super::requests::{err, not_found, only_fields, Reply};
use super::supervisor;
use super::views::now_ms;

/// What the target's answer means for the paused source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The target's launcher ended without running the VM: resume it here.
    Resume,
    /// The target runs the VM (the cluster assigned it there): the paused copy goes.
    MovedAway,
    /// Nobody can tell (the target's node failed and is fenced): the paused copy goes
    /// and the VM restarts as its runStrategy says, as after a crash.
    Crashed(String),
}

impl Resolution {
    /// The operator's answer in `PUT /v1/vms/{name}/resolve-handover`
    /// (`{"outcome": "resume" | "movedAway"}`).
    fn from_request(body: &Value) -> Result<Resolution, Reply> {
        only_fields(body, &["outcome"])?;
        match body.get("outcome").and_then(Value::as_str) {
            Some("resume") => Ok(Resolution::Resume),
            Some("movedAway") => Ok(Resolution::MovedAway),
            Some(o) => Err(err(
                400,
                format!("outcome {o:?}: use \"resume\" (the destination does not run the VM) or \"movedAway\" (it does)"),
            )),
            None => Err(err(400, "outcome: required, \"resume\" or \"movedAway\"")),
        }
    }
}

impl Daemon {
    /// `PUT /v1/vms/{name}/resolve-handover`: the operator's answer for a VM left paused
    /// by a handover to another node whose outcome is unknown. Only outside a cluster
    /// (there the target node's record decides), and only for such a VM: the answer
    /// never touches a VM that runs, so a late or repeated call changes nothing.
    pub(crate) fn resolve_handover_request(&mut self, name: &str, body: &Value) -> Reply {
        let Some(vm) = self.vms.get(name) else {
            return not_found(name);
        };
        if self.grants.is_some() {
            return err(
                409,
                "this node is in a cluster: the target node's answer in the migration record decides (docs/cluster.md, \"Handover outcome unknown\"); nothing is resolved by hand",
            );
        }
        if !matches!(
            vm.status.state,
            VmState::MigratingOut {
                outcome_unknown: Some(_),
                ..
            }
        ) {
            return err(
                409,
                format!(
                    "VM {name} is {}: only a VM paused by a handover whose outcome is unknown is resolved this way",
                    vm.status.state.phase(now_ms())
                ),
            );
        }
        let resolution = match Resolution::from_request(body) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        tracing::info!(vm = name, resolution = ?resolution, "handover outcome resolved by the operator");
        self.resolve_handover(name, resolution);
        self.vm_reply(name, 200)
    }

    /// Applies the answer to a VM left paused by an unknown handover outcome; any
    /// other VM is left alone (the answer came late, or twice).
    pub(crate) fn resolve_handover(&mut self, name: &str, resolution: Resolution) {
        let now = now_ms();
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let VmState::MigratingOut {
            to,
            outcome_unknown: Some(_),
            ..
        } = vm.status.state.clone()
        else {
            return;
        };
        tracing::info!(vm = name, to = %to, resolution = ?resolution, "handover outcome resolved");
        match resolution {
            Resolution::Resume => {
                if let Some(socket) = vm.status.api_socket.clone() {
                    let vm_name = name.to_string();
                    tokio::spawn(async move {
                        let r = supervisor::api(
                            &PathBuf::from(socket),
                            "PUT",
                            "/v1/resume",
                            None,
                            Some(Duration::from_secs(5)),
                        )
                        .await;
                        if let Err(e) = r {
                            // Its exit, if it is gone, restarts it as runStrategy says.
                            tracing::error!(vm = %vm_name, error = %e, "cannot resume the paused source");
                        }
                    });
                }
                vm.status.state = VmState::Running {
                    since: vm.launched_at,
                };
                vm.status.last_error = Some(format!(
                    "the handover to {to} had an unknown outcome; the target never ran the VM, so it resumed here"
                ));
            }
            Resolution::MovedAway => {
                if let Some(pid) = vm.status.pid.take() {
                    supervisor::signal(pid, libc::SIGKILL);
                }
                if let Some(s) = vm.status.api_socket.take() {
                    let _ = std::fs::remove_file(s);
                }
                vm.status.launcher_version = None;
                vm.status.last_error = None;
                vm.source_exit = None;
                vm.status.state = VmState::Stopped {
                    cause: StopCause::MovedAway(to),
                };
            }
            Resolution::Crashed(why) => {
                if let Some(pid) = vm.status.pid.take() {
                    supervisor::signal(pid, libc::SIGKILL);
                }
                vm.source_exit = None;
                vm.status.state = VmState::Running {
                    since: vm.launched_at,
                };
                // As a crash of a running VM: runStrategy decides whether it restarts.
                self.apply_exit(name, &ExitKind::Failure(why), now);
                return;
            }
        }
        self.persist(name);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::path::Path;
    use std::process::{Command, Stdio};

    use serde_json::json;

    use super::*;
    use crate::coordinator::VmStatus;
    use crate::daemon::{Options, Vm};
    use crate::requests::{Body, Req};
    use crate::spec::parse_spec_text;
    use crate::store::VmRow;

    /// A daemon on a fresh state directory with one VM `a` whose handover to another
    /// node ended with an unknown outcome: paused in a live process (`pid`), with an API
    /// socket at `socket`.
    fn daemon_with_unknown_handover(dir: &Path, pid: u32, socket: &Path) -> Daemon {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let opts = Options {
            state_dir: dir.join("state"),
            socket: dir.join("noded.sock"),
            config: None,
            cluster: None,
            metrics_address: None,
        };
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let mut d = Daemon::open(&opts, tx).unwrap();
        let spec =
            parse_spec_text("name: a\nkernel: /k\nmemory: 64Mi\nrunStrategy: Manual").unwrap();
        let row = VmRow {
            status: VmStatus::new(&spec, 0),
            serial_log: dir.join("console.log").display().to_string(),
            created_at: 0,
            spec,
        };
        d.store.insert_vm(&row).unwrap();
        d.vms.insert(
            "a".into(),
            Vm {
                spec: row.spec,
                status: row.status,
                serial_log: dir.join("console.log"),
                created_at: 0,
                launched_at: 0,
                source_exit: None,
                target_exit: None,
            },
        );
        let vm = d.vms.get_mut("a").unwrap();
        vm.status.pid = Some(pid);
        vm.status.api_socket = Some(socket.display().to_string());
        vm.status.state = VmState::MigratingOut {
            since: 0,
            to: "tcp:10.0.0.2:4000".into(),
            record: 1,
            outcome_unknown: Some("connection reset after Go".into()),
        };
        d
    }

    fn body(r: &Reply) -> Value {
        match &r.body {
            Body::Json(v) => v.clone(),
            Body::Text(t) => Value::String(t.clone()),
        }
    }

    fn resolve(d: &mut Daemon, name: &str, b: Value) -> Reply {
        d.handle(Req::ResolveHandover(name.into(), b))
    }

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("noded-handover-{name}-{}", std::process::id()))
    }

    #[tokio::test]
    async fn the_operator_resumes_a_paused_copy_the_destination_never_ran() {
        let dir = scratch("resume");
        let socket = dir.join("launcher.sock");
        let mut d = daemon_with_unknown_handover(&dir, 1, &socket);
        let listener = UnixListener::bind(&socket).unwrap();
        // Stands in for the paused launcher's API: records the request line, answers 200.
        let seen = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(conn.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}");
            line
        });
        let r = resolve(&mut d, "a", json!({"outcome": "resume"}));
        assert_eq!(r.status, 200, "{:?}", body(&r));
        assert_eq!(body(&r)["phase"], "Running");
        let line = tokio::task::spawn_blocking(move || seen.join().unwrap())
            .await
            .unwrap();
        assert!(line.starts_with("PUT /v1/resume "), "{line:?}");
        assert!(
            matches!(d.vms["a"].status.state, VmState::Running { .. }),
            "{:?}",
            d.vms["a"].status.state
        );
        // Answered once: a second answer finds a running VM and changes nothing.
        let r = resolve(&mut d, "a", json!({"outcome": "movedAway"}));
        assert_eq!(r.status, 409, "{:?}", body(&r));
        assert!(matches!(d.vms["a"].status.state, VmState::Running { .. }));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_operator_drops_a_paused_copy_the_destination_runs() {
        let dir = scratch("moved");
        let mut paused = Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut d = daemon_with_unknown_handover(&dir, paused.id(), &dir.join("none.sock"));
        let r = resolve(&mut d, "a", json!({"outcome": "movedAway"}));
        assert_eq!(r.status, 200, "{:?}", body(&r));
        assert_eq!(body(&r)["phase"], "MovedAway");
        // The paused copy's process is gone: it can never be resumed by mistake.
        let status = paused.wait().unwrap();
        assert!(!status.success(), "{status:?}");
        assert_eq!(d.vms["a"].status.pid, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn bad_answers_are_refused_and_change_nothing() {
        let dir = scratch("bad");
        let mut d = daemon_with_unknown_handover(&dir, 1, &dir.join("none.sock"));
        for (b, status, says) in [
            (json!({}), 400, "outcome: required"),
            (json!({"outcome": "guess"}), 400, "\"resume\""),
            (
                json!({"outcome": "resume", "force": true}),
                400,
                "unknown field",
            ),
            (json!("resume"), 400, "JSON object"),
        ] {
            let r = resolve(&mut d, "a", b.clone());
            assert_eq!(r.status, status, "{b}: {:?}", body(&r));
            assert!(
                body(&r)["error"].as_str().unwrap().contains(says),
                "{b}: {:?}",
                body(&r)
            );
        }
        let r = resolve(&mut d, "b", json!({"outcome": "resume"}));
        assert_eq!(r.status, 404, "{:?}", body(&r));
        // In a cluster the target node's record decides, never the operator.
        d.grants = Some(Default::default());
        let r = resolve(&mut d, "a", json!({"outcome": "resume"}));
        assert_eq!(r.status, 409, "{:?}", body(&r));
        assert!(body(&r)["error"].as_str().unwrap().contains("cluster"));
        d.grants = None;
        assert!(matches!(
            d.vms["a"].status.state,
            VmState::MigratingOut {
                outcome_unknown: Some(_),
                ..
            }
        ));
        // A VM that is not waiting for this answer is left alone.
        d.vms.get_mut("a").unwrap().status.state = VmState::Running { since: 0 };
        let r = resolve(&mut d, "a", json!({"outcome": "resume"}));
        assert_eq!(r.status, 409, "{:?}", body(&r));
        assert!(body(&r)["error"].as_str().unwrap().contains("Running"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The end of a cross-node handover whose outcome the source does not know.
//!
//! After `Go`, a source launcher that loses the destination's answer stays paused: it
//! cannot tell whether the destination runs the guest (docs/wire-protocol.md). noded then
//! keeps the VM `MigratingOut` with `outcomeUnknown` set, and never restarts it here on
//! its own. In a cluster the target node knows the answer and writes it into the
//! migration record; the agent then brings it here as a [`Resolution`]
//! (docs/cluster.md, "Handover outcome unknown"). Outside a cluster an operator
//! decides: `nodectl vm delete` stops the paused copy.

use std::path::PathBuf;
use std::time::Duration;

use super::coordinator::{ExitKind, StopCause, VmState};
use super::daemon::Daemon;
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

impl Daemon {
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

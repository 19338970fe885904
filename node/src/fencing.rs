//! The node's side of self-fencing (docs/cluster.md, "Node failure"): the
//! reconciliation loop kills every launcher when the cluster task decides that this
//! node is cut off, records that it did (so that a noded restarted afterwards stays
//! fenced), and starts nothing until the cluster task has reconciled with etcd again.
//!
//! Two gates stop the loop from starting anything:
//! - `held`: in a cluster, while the node's lease is not surely alive and reconciled
//!   (at startup, during an etcd outage). Running VMs go on; nothing new starts.
//! - `fenced`: after a fence, until the agent has handed the fenced VMs back to the
//!   cluster and cleared it.
//!
//! In a cluster every launcher is started with `--watchdog-file`: the cluster task
//! feeds that file while the node is healthy, so a frozen noded (SIGSTOP, a stalled
//! host) stops feeding and its launchers kill themselves.

use std::path::PathBuf;

use contracts::launch::LaunchOptions;

use super::coordinator::{StopCause, VmState};
use super::daemon::Daemon;
use super::supervisor;

/// The store key of the fence marker.
const FENCED_KEY: &str = "fenced";

/// The watchdog file's name in the state directory.
pub const WATCHDOG_FILE: &str = "watchdog";

/// In a cluster: a migration stream with no byte moving for this long is given up.
pub const STALL_TIMEOUT_MS: u64 = 15_000;

/// How long a launcher runs unfed before it kills itself (ms). The timing argument in
/// docs/cluster.md uses it: it is shorter than the lease TTL plus the grace period.
pub const WATCHDOG_TIMEOUT_MS: u64 = 5000;

impl Daemon {
    /// Loads the fence marker and arms the gates for a cluster node.
    pub(crate) fn init_fencing(&mut self, cluster: bool) {
        if !cluster {
            return;
        }
        self.held = true;
        self.watchdog = Some(self.dir.join(WATCHDOG_FILE));
        match self.store.get::<String>(FENCED_KEY) {
            Ok(Some(why)) => {
                tracing::warn!(reason = %why, "this node fenced itself before; it starts nothing until it has rejoined the cluster");
                self.fenced = Some(why.clone());
                // A noded that died in the middle of fencing: finish the job.
                self.kill_all(&why);
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the fence marker"),
        }
    }

    /// Whether the loop may start launchers now.
    pub(crate) fn may_start(&self) -> bool {
        !self.held && self.fenced.is_none()
    }

    /// The launcher's arguments. On a cluster node they add the watchdog, and a
    /// migration stall timeout short enough that a migration to a node that died behind
    /// a dead link (no RST ever comes) ends, and the source resumes, in
    /// [`STALL_TIMEOUT_MS`].
    pub(crate) fn launch_argv(&self, mut options: LaunchOptions) -> Vec<String> {
        if let Some(f) = &self.watchdog {
            options.watchdog_file = Some(f.display().to_string());
            options.watchdog_timeout_ms = Some(WATCHDOG_TIMEOUT_MS);
            options.migration_stall_timeout_ms = Some(STALL_TIMEOUT_MS);
        }
        options.to_argv()
    }

    /// Kills every launcher (SIGKILL: the guests stop executing now) and marks every
    /// VM that had one as fenced. Recorded first, so a restart finishes the job.
    pub(crate) fn fence(&mut self, reason: &str) {
        if let Err(e) = self.store.set(FENCED_KEY, &reason.to_string()) {
            tracing::error!(error = %e, "cannot record the fence; fencing anyway");
        }
        self.fenced = Some(reason.to_string());
        tracing::warn!(reason, "fencing this node: killing every launcher");
        self.kill_all(reason);
    }

    fn kill_all(&mut self, reason: &str) {
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            let Some(vm) = self.vms.get_mut(&name) else {
                continue;
            };
            let mut pids: Vec<u32> = vm.status.pid.into_iter().collect();
            if let VmState::Migrating { target_pid, .. } = &vm.status.state {
                pids.extend(*target_pid);
            }
            if let Some(s) = &vm.status.api_socket {
                pids.extend(supervisor::find_pid_with_arg(s));
            }
            let had = !matches!(vm.status.state, VmState::Stopped { .. }) || !pids.is_empty();
            for pid in &pids {
                supervisor::signal(*pid, libc::SIGKILL);
            }
            if !had {
                continue;
            }
            vm.status.state = VmState::Stopped {
                cause: StopCause::Fenced(reason.to_string()),
            };
            vm.status.pid = None;
            vm.status.last_error = Some(format!("fenced: {reason}"));
            tracing::warn!(vm = %name, pids = ?pids, "launcher killed by the fence");
            self.persist(&name);
        }
    }

    /// The agent handed the fenced VMs back to the cluster: starts are allowed again.
    pub(crate) fn unfence(&mut self) {
        if let Err(e) = self.store.delete_key(FENCED_KEY) {
            tracing::error!(error = %e, "cannot clear the fence marker");
            return;
        }
        if self.fenced.take().is_some() {
            tracing::info!("rejoined the cluster; the fence is lifted");
        }
    }

    /// The watchdog file, for the cluster task that feeds it.
    pub fn watchdog_file(&self) -> Option<PathBuf> {
        self.watchdog.clone()
    }
}

//! The seam between the cluster tasks (async, etcd) and the node's reconciliation loop
//! (the only owner of local VMs): the cluster side sends [`LocalCall`]s, the loop answers
//! them with typed values. The node daemon stays the only one that starts, stops and
//! adopts launchers on its node; the cluster only asks it to.

use std::collections::BTreeSet;

use serde_json::Value;
use tokio::sync::oneshot;

use super::model::NodeLauncher;
use crate::coordinator::{StopCause, VmState};
use crate::daemon::Daemon;
use crate::handover::Resolution;
use crate::requests::{Reply, Req};
use crate::spec::{parse_spec, SpecError, VmSpec};
use crate::store::MigrationRecord;
use crate::views::now_ms;

/// One local VM as the cluster sees it.
#[derive(Debug, Clone)]
pub struct LocalVm {
    /// The spec it runs with.
    pub spec: VmSpec,
    /// noded's phase (`Running`, `MovedAway`, `Receiving`, ...).
    pub phase: String,
    /// Launcher version running it.
    pub launcher_version: Option<String>,
    /// The coordinator finds it outdated.
    pub outdated: bool,
    /// Why it stopped, or the last error.
    pub message: Option<String>,
    /// A launcher process runs it (or is starting, migrating, receiving).
    pub active: bool,
    /// It left for `tcp:…` (the migration to another node completed).
    pub moved_to: Option<String>,
    /// Its newest migration record.
    pub last_migration: Option<MigrationRecord>,
    /// Its launcher's API socket.
    pub api_socket: Option<String>,
    /// Its launcher is paused after a handover with an unknown outcome (see
    /// [`crate::handover`]).
    pub handover_unknown: bool,
}

/// What the node has, for the node object and the agent's reconciliation.
#[derive(Debug, Clone, Default)]
pub struct LocalSnapshot {
    /// Every local VM.
    pub vms: Vec<LocalVm>,
    /// Installed launchers.
    pub launchers: Vec<NodeLauncher>,
    /// The channel the node follows.
    pub channel: String,
    /// Finished same-node update migrations (for the cluster's records).
    pub updates: Vec<MigrationRecord>,
    /// This node fenced itself, and why.
    pub fenced: Option<String>,
}

/// A call from the cluster tasks into the loop.
pub enum LocalCall {
    /// Everything local, now.
    Snapshot(oneshot::Sender<LocalSnapshot>),
    /// Validate a spec for the cluster (names, quantities, machine type resolved by this
    /// node's launchers, MACs assigned) without creating anything.
    Validate(Value, oneshot::Sender<Result<VmSpec, SpecError>>),
    /// An ordinary API request (create, stop, delete, receive, migrate out ...).
    Request(Req, oneshot::Sender<Reply>),
    /// The VMs the leader allows to be updated now; `None` outside a cluster.
    SetGrants(Option<BTreeSet<String>>),
    /// What this node knows of the cluster, for `/v1/status` and the metrics.
    ClusterStatus(Value),
    /// Hold starts (`true`) while the lease is not surely alive, or allow them again.
    Hold(bool),
    /// This node is cut off: kill every launcher now (answers once done).
    Fence(String, oneshot::Sender<()>),
    /// The fenced VMs were handed back to the cluster: lift the fence.
    Unfence(oneshot::Sender<()>),
    /// The target's answer for a VM left paused by an unknown handover outcome.
    ResolveHandover(String, Resolution, oneshot::Sender<()>),
}

impl Daemon {
    /// Answers one cluster call.
    pub fn on_local_call(&mut self, call: LocalCall) {
        match call {
            LocalCall::Snapshot(tx) => {
                let _ = tx.send(self.local_snapshot());
            }
            LocalCall::Validate(v, tx) => {
                let _ = tx.send(self.validate_for_cluster(&v));
            }
            LocalCall::Request(req, tx) => {
                let _ = tx.send(self.handle(req));
            }
            LocalCall::SetGrants(g) => self.grants = g,
            LocalCall::ClusterStatus(v) => self.cluster_status = Some(v),
            LocalCall::Hold(h) => {
                if h != self.held {
                    tracing::info!(
                        held = h,
                        "{}",
                        if h {
                            "lease not surely alive: holding starts"
                        } else {
                            "lease alive and reconciled: starts allowed"
                        }
                    );
                }
                self.held = h;
            }
            LocalCall::Fence(why, tx) => {
                self.fence(&why);
                let _ = tx.send(());
            }
            LocalCall::Unfence(tx) => {
                self.unfence();
                let _ = tx.send(());
            }
            LocalCall::ResolveHandover(vm, resolution, tx) => {
                self.resolve_handover(&vm, resolution);
                let _ = tx.send(());
            }
        }
    }

    fn validate_for_cluster(&self, v: &Value) -> Result<VmSpec, SpecError> {
        let mut spec = parse_spec(v)?;
        spec.assign_macs(None);
        spec.machine_type = self.resolve_machine_type(&spec.machine_type)?;
        Ok(spec)
    }

    fn local_snapshot(&self) -> LocalSnapshot {
        let now = now_ms();
        let plan = self.plan(now);
        let is_version = |s: &str| s.chars().next().is_some_and(|c| c.is_ascii_digit());
        // One read of each VM's records (this runs every agent round, in the loop).
        let mut updates = Vec::new();
        let vms = self
            .vms
            .iter()
            .map(|(name, vm)| {
                let records = self.store.migrations(name).unwrap_or_default();
                let last_migration = records.iter().max_by_key(|m| m.id).cloned();
                updates.extend(records.into_iter().filter(|m| {
                    m.finished_at.is_some()
                        && is_version(&m.source_version)
                        && is_version(&m.target_version)
                }));
                let moved_to = match &vm.status.state {
                    VmState::Stopped {
                        cause: StopCause::MovedAway(to),
                    } => Some(to.clone()),
                    _ => None,
                };
                let active = !matches!(vm.status.state, VmState::Stopped { .. })
                    && (vm.status.pid.is_some()
                        || !matches!(vm.status.state, VmState::Running { .. }));
                LocalVm {
                    spec: vm.spec.clone(),
                    phase: vm.status.state.phase(now).to_string(),
                    launcher_version: vm.status.launcher_version.clone(),
                    outdated: plan.verdicts.get(name).is_some_and(|v| v.outdated),
                    message: vm.status.last_error.clone(),
                    active,
                    moved_to,
                    last_migration,
                    api_socket: vm.status.api_socket.clone(),
                    handover_unknown: matches!(
                        vm.status.state,
                        VmState::MigratingOut {
                            outcome_unknown: Some(_),
                            ..
                        }
                    ),
                }
            })
            .collect();
        let launchers = self
            .launchers
            .iter()
            .map(|l| NodeLauncher {
                version: l.version.clone(),
                channel: l.channel.as_str().to_string(),
                machine_types: l.capabilities.machine_types.clone(),
                migration_protocol: [
                    l.capabilities.migration_protocol.min,
                    l.capabilities.migration_protocol.max,
                ],
            })
            .collect();
        LocalSnapshot {
            vms,
            launchers,
            channel: self.settings.channel.as_str().to_string(),
            updates,
            fenced: self.fenced.clone(),
        }
    }
}

//! The node's status (conditions, outdated count, channel notes) and its metrics, built
//! from the loop's state and the coordinator's plan.

use super::coordinator::{StopCause, VmState};
use super::daemon::Daemon;
use super::metrics::{render, Gauges};
use super::settings::WorkloadUpdateMethod;
use super::views::{now_ms, Condition, NodeStatus};

impl Daemon {
    pub(crate) fn node_status(&self) -> NodeStatus {
        let now = now_ms();
        let plan = self.plan(now);
        let outdated: Vec<&String> = plan
            .verdicts
            .iter()
            .filter(|(_, v)| v.outdated)
            .map(|(n, _)| n)
            .collect();
        let count =
            |f: &dyn Fn(&VmState) -> bool| self.vms.values().filter(|v| f(&v.status.state)).count();
        let migrating = count(&|s| matches!(s, VmState::Migrating { .. }));
        let evicting = count(&|s| matches!(s, VmState::Evicting { .. }));
        let failing = self.failing_vms(now);
        let blocked = blocked_updates(&plan);
        let methods_empty = self
            .settings
            .workload_update_strategy
            .workload_update_methods
            .is_empty();
        let mut conditions = Vec::new();
        conditions.push(match self.newest() {
            Some(l) => Condition::new(
                "Available",
                true,
                "LauncherInstalled",
                format!("launcher {} installed", l.version),
            ),
            None => Condition::new(
                "Available",
                false,
                "NoLauncherInstalled",
                "install one with nodectl launcher install --path PATH",
            ),
        });
        conditions.push(progressing(&Progress {
            migrating,
            evicting,
            outdated: outdated.len(),
            blocked: blocked.len(),
            approval_pending: self.approval_pending(),
            methods_empty,
        }));
        conditions.push(if failing.is_empty() {
            Condition::new("Degraded", false, "AsExpected", "")
        } else {
            Condition::new(
                "Degraded",
                true,
                "VMsFailing",
                format!("failing or retrying: {}", failing.join(", ")),
            )
        });
        conditions.push(if blocked.is_empty() {
            Condition::new("Upgradeable", true, "AsExpected", "")
        } else {
            Condition::new(
                "Upgradeable",
                false,
                "OutdatedWorkloadsBlocked",
                blocked.join("; "),
            )
        });
        let untested_update_path = self.untested_update_path();
        if let Some(msg) = &untested_update_path {
            conditions.push(Condition::new(
                "UntestedUpdatePath",
                true,
                "ChannelSwitchedToStable",
                msg.clone(),
            ));
        }
        NodeStatus {
            channel: self.settings.channel.as_str().to_string(),
            untested_update_path,
            target_launcher_version: self.newest().map(|l| l.version.clone()),
            approval_pending: self.approval_pending(),
            approved_launcher_version: self.effective().map(|l| l.version.clone()),
            outdated_virtual_machine_instance_workloads: outdated.len(),
            conditions,
            virtual_machines: self.vms.len(),
            approval_strategy: format!("{:?}", self.settings.approval_strategy),
            workload_update_methods: self
                .settings
                .workload_update_strategy
                .workload_update_methods
                .iter()
                .map(|m| match m {
                    WorkloadUpdateMethod::LiveMigrate => "LiveMigrate".to_string(),
                    WorkloadUpdateMethod::Evict => "Evict".to_string(),
                })
                .collect(),
        }
    }

    /// VMs that failed, crash-loop or wait in back-off: the Degraded condition's list.
    fn failing_vms(&self, now: i64) -> Vec<&str> {
        self.vms
            .values()
            .filter(|v| match &v.status.state {
                VmState::Stopped {
                    cause: StopCause::Failed(_) | StopCause::StartFailed(_),
                } => true,
                VmState::Starting { not_before, .. } => *not_before > now,
                VmState::Backoff { .. } => true,
                _ => false,
            })
            .map(|v| v.spec.name.as_str())
            .collect()
    }

    pub(crate) fn metrics(&self) -> String {
        let now = now_ms();
        let plan = self.plan(now);
        let mut g = Gauges {
            outdated: plan.verdicts.values().filter(|v| v.outdated).count(),
            launchers: self.launchers.len(),
            approval_pending: self.approval_pending(),
            degraded: self
                .node_status()
                .conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.status == "True"),
            ..Default::default()
        };
        for v in self.vms.values() {
            *g.phases
                .entry(v.status.state.phase(now).to_string())
                .or_default() += 1;
        }
        g.cluster = self
            .cluster_status
            .as_ref()
            .map(|c| (c["connected"] == true, c["leading"] == true));
        render(&self.counters, &g)
    }

    /// The note for VMs on launchers of a channel the node does not follow (it was
    /// switched from candidate back to stable): allowed, but an untested update path.
    fn untested_update_path(&self) -> Option<String> {
        let mut off: Vec<String> = self
            .vms
            .values()
            .filter(|v| v.status.state.has_launcher())
            .filter_map(|v| {
                let ver = v.status.launcher_version.as_deref()?;
                let l = self.launcher(ver)?;
                (!self.on_channel(l))
                    .then(|| format!("{} ({} {ver})", v.spec.name, l.channel.as_str()))
            })
            .collect();
        if off.is_empty() {
            return None;
        }
        off.sort();
        Some(format!(
            "the node follows {} but VMs run launchers of another channel: {}; moving them from there is an untested update path",
            self.settings.channel.as_str(),
            off.join(", ")
        ))
    }
}

/// Outdated VMs that no enabled update method can move, with the planner's reason: the
/// Upgradeable condition's list.
fn blocked_updates(plan: &super::coordinator::Plan) -> Vec<String> {
    plan.verdicts
        .iter()
        .filter(|(_, v)| {
            v.outdated
                && v.reason.as_deref().is_some_and(|r| {
                    r.contains("Evict is not enabled")
                        || r.contains("refuses eviction")
                        || r.contains("does not offer")
                })
        })
        .map(|(n, v)| format!("{n}: {}", v.reason.as_deref().unwrap_or("")))
        .collect()
}

/// What the Progressing condition is decided from.
struct Progress {
    migrating: usize,
    evicting: usize,
    outdated: usize,
    blocked: usize,
    approval_pending: bool,
    methods_empty: bool,
}

/// The Progressing condition: updating, up to date, or why the update waits.
fn progressing(p: &Progress) -> Condition {
    if p.migrating + p.evicting > 0 {
        Condition::new(
            "Progressing",
            true,
            "UpdatingWorkloads",
            format!(
                "{} migrating, {} evicting, {} outdated",
                p.migrating, p.evicting, p.outdated
            ),
        )
    } else if p.outdated == 0 {
        Condition::new(
            "Progressing",
            false,
            "UpToDate",
            "every VM runs the target launcher",
        )
    } else if p.approval_pending {
        Condition::new(
            "Progressing",
            false,
            "WaitingForApproval",
            "run nodectl update approve",
        )
    } else if p.methods_empty {
        Condition::new(
            "Progressing",
            false,
            "WorkloadUpdatesDisabled",
            "workloadUpdateMethods is empty",
        )
    } else if p.blocked == p.outdated {
        Condition::new(
            "Progressing",
            false,
            "OutdatedWorkloadsBlocked",
            "every outdated VM is blocked; see Upgradeable",
        )
    } else {
        Condition::new(
            "Progressing",
            true,
            "UpdatingWorkloads",
            format!("{} outdated", p.outdated),
        )
    }
}

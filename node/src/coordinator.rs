//! The update coordinator's decisions, as pure functions: given the VMs' recorded states,
//! the settings and the time, say what to do next and why each outdated VM is not
//! updated yet. Nothing here does I/O, so the rules (batches, approval, runStrategy,
//! backoff) are unit-tested directly; the daemon only executes the actions.
//!
//! The per-VM states and the runStrategy table live in [`super::vm_state`] (re-exported
//! here).

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

use super::launchers::{compare_versions, Range};
use super::settings::{NodeSettings, WorkloadUpdateMethod};
use super::spec::{EvictionStrategy, VmSpec};

pub use super::vm_state::{
    after_exit, crash_restart_delay_ms, ExitKind, Millis, StopCause, VmState, VmStatus,
    QUICK_CRASH_MS,
};

/// Retry delay after `failures` failed migrations: base, 2·base, 4·base ... capped.
pub fn migration_backoff_ms(settings: &NodeSettings, failures: u32) -> Millis {
    let c = &settings.live_migration_config;
    let base = c.retry_backoff_base_seconds.saturating_mul(1000);
    let cap = c.retry_backoff_max_seconds.saturating_mul(1000);
    let d = base.saturating_mul(1u64 << failures.saturating_sub(1).min(30));
    d.min(cap).min(i64::MAX as u64) as Millis
}

/// The eviction batch window: evictions started within `[started_at, started_at+interval)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchWindow {
    /// When the current batch started.
    pub started_at: Millis,
    /// Evictions started in it.
    pub count: u32,
}

/// An installed launcher as the planner sees it (the target is one of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its version.
    pub version: String,
    /// Machine types it offers.
    pub machine_types: Vec<String>,
    /// The migration-protocol versions it speaks (as a source) and accepts (as a target).
    pub migration_protocol: Range,
    /// Whether it is on a channel this node follows (only those become targets).
    pub on_channel: bool,
}

impl Target {
    /// Why a VM on launcher `source` cannot live-migrate to this one, if it cannot: their
    /// protocol windows do not overlap, so the attempt would be refused at the preamble.
    pub fn protocol_gap(&self, source: &Target) -> Option<String> {
        let (s, t) = (source.migration_protocol, self.migration_protocol);
        (s.max < t.min || t.max < s.min).then(|| {
            format!(
                "launcher {} speaks migration protocol {}..{}, outside the {}..{} window target launcher {} accepts",
                source.version, s.min, s.max, t.min, t.max, self.version
            )
        })
    }
}

/// One VM as the planner sees it.
#[derive(Debug, Clone)]
pub struct VmInput<'a> {
    /// The spec.
    pub spec: &'a VmSpec,
    /// The recorded status.
    pub status: &'a VmStatus,
}

/// Everything the planner needs.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// Current time.
    pub now: Millis,
    /// Node settings.
    pub settings: &'a NodeSettings,
    /// The newest installed version (what "outdated" is measured against).
    pub newest: Option<&'a str>,
    /// The approved target (equals `newest` unless approval is pending).
    pub target: Option<&'a Target>,
    /// A newer version waits for `nodectl update approve`.
    pub approval_pending: bool,
    /// The eviction batch window.
    pub batch: BatchWindow,
    /// Every installed launcher, oldest first (source protocol windows, and the launchers
    /// a VM can restart on when the target lacks its machine type).
    pub launchers: &'a [Target],
    /// The channel the node follows (for reasons).
    pub channel: &'a str,
    /// The VMs.
    pub vms: Vec<VmInput<'a>>,
}

/// What the daemon should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the VM on a launcher of this version.
    Start {
        /// VM name.
        vm: String,
        /// Launcher version.
        version: String,
    },
    /// Live-migrate the VM to a new launcher of this version.
    Migrate {
        /// VM name.
        vm: String,
        /// Attempt number.
        attempt: u32,
        /// Target version.
        version: String,
    },
    /// Evict the VM for an update to this version.
    Evict {
        /// VM name.
        vm: String,
        /// Target version.
        version: String,
    },
}

/// Per-VM verdict: outdated or not, and the reason it has not been updated yet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Runs a launcher older than the newest installed.
    pub outdated: bool,
    /// Why it is not updated yet (or what is happening to it).
    pub reason: Option<String>,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Actions, in the order to execute them.
    pub actions: Vec<Action>,
    /// Verdict per VM name.
    pub verdicts: std::collections::BTreeMap<String, Verdict>,
    /// The batch window after the planned evictions.
    pub batch: BatchWindow,
}

fn older(a: Option<&str>, b: &str) -> bool {
    a.is_some_and(|a| compare_versions(a, b) == Ordering::Less)
}

fn secs_until(now: Millis, t: Millis) -> i64 {
    ((t - now).max(0) + 999) / 1000
}

/// Decides the next actions. Deterministic: VMs are taken in name order.
pub fn plan(inp: &Inputs) -> Plan {
    let s = inp.settings;
    let mut out = Plan {
        batch: inp.batch,
        ..Plan::default()
    };
    let interval_ms = s
        .workload_update_strategy
        .batch_eviction_interval
        .0
        .as_millis() as Millis;
    let batch_size = s.workload_update_strategy.batch_eviction_size;
    let slots = s.live_migration_config.parallel_migrations_per_node as usize;
    let mut migrating = inp
        .vms
        .iter()
        .filter(|v| matches!(v.status.state, VmState::Migrating { .. }))
        .count();
    let mut vms: Vec<&VmInput> = inp.vms.iter().collect();
    vms.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    for vm in vms {
        let name = vm.spec.name.clone();
        let st = vm.status;
        let mut verdict = Verdict::default();
        // Starts happen whatever the update settings say: a VM must run.
        if let VmState::Starting { not_before, .. } = st.state {
            match inp.target {
                None => {
                    verdict.reason =
                        Some("no launcher installed (nodectl launcher install --path PATH)".into())
                }
                Some(_) if not_before > inp.now => {
                    verdict.reason = Some(format!(
                        "restarting in {} s after: {}",
                        secs_until(inp.now, not_before),
                        st.last_error.as_deref().unwrap_or("a crash")
                    ))
                }
                Some(t) => match start_launcher(inp, t, vm) {
                    Ok(version) => out.actions.push(Action::Start {
                        vm: name.clone(),
                        version,
                    }),
                    Err(reason) => verdict.reason = Some(reason),
                },
            }
            out.verdicts.insert(name, verdict);
            continue;
        }
        let Some(newest) = inp.newest else {
            out.verdicts.insert(name, verdict);
            continue;
        };
        if !st.state.has_launcher() || !older(st.launcher_version.as_deref(), newest) {
            verdict.reason = off_channel(inp, st);
            out.verdicts.insert(name, verdict);
            continue;
        }
        verdict.outdated = true;
        verdict.reason = Some(match &st.state {
            VmState::Migrating {
                attempt,
                target_version,
                ..
            } => format!("migrating to {target_version} (attempt {attempt})"),
            VmState::Evicting { target_version, .. } => {
                format!("evicting for the update to {target_version}")
            }
            VmState::Stopping { .. } => "stopping".into(),
            VmState::Receiving { .. } => "receiving a migration from another node".into(),
            VmState::MigratingOut { to, .. } => format!("migrating to another node ({to})"),
            _ => match decide_update(
                inp,
                vm,
                &mut out,
                &mut migrating,
                slots,
                interval_ms,
                batch_size,
            ) {
                Ok(action) => {
                    let r = match &action {
                        Action::Migrate {
                            version, attempt, ..
                        } => {
                            format!("migrating to {version} (attempt {attempt})")
                        }
                        Action::Evict { version, .. } => {
                            format!("evicting for the update to {version}")
                        }
                        Action::Start { .. } => String::new(),
                    };
                    out.actions.push(action);
                    r
                }
                Err(reason) => reason,
            },
        });
        out.verdicts.insert(name, verdict);
    }
    out
}

/// The launcher a VM (re)starts on: the target, or when the target does not offer the
/// machine type it will start with (a forced install of a launcher that dropped it), the
/// newest older launcher on the node's channel that does, so that it is never stranded.
fn start_launcher(inp: &Inputs, target: &Target, vm: &VmInput) -> Result<String, String> {
    let mt = vm
        .status
        .pending
        .as_ref()
        .map_or(&vm.spec.machine_type, |p| &p.machine_type);
    if target.machine_types.contains(mt) {
        return Ok(target.version.clone());
    }
    inp.launchers
        .iter()
        .rev()
        .find(|l| {
            l.on_channel
                && compare_versions(&l.version, &target.version) != Ordering::Greater
                && l.machine_types.contains(mt)
        })
        .map(|l| l.version.clone())
        .ok_or_else(|| format!("no installed launcher offers machine type {mt}"))
}

/// The note for a VM that runs a launcher of a channel the node no longer follows (a
/// node switched from candidate back to stable): not outdated, nothing is downgraded.
fn off_channel(inp: &Inputs, st: &VmStatus) -> Option<String> {
    let v = st.launcher_version.as_deref()?;
    let l = inp.launchers.iter().find(|l| l.version == v)?;
    (st.state.has_launcher() && !l.on_channel).then(|| {
        format!(
            "runs launcher {v}, which is not on this node's {} channel (untested update path); it moves when a newer {} launcher is installed",
            inp.channel, inp.channel
        )
    })
}

/// For an outdated VM with a running launcher: the action to take, or why not.
fn decide_update(
    inp: &Inputs,
    vm: &VmInput,
    out: &mut Plan,
    migrating: &mut usize,
    slots: usize,
    interval_ms: Millis,
    batch_size: u32,
) -> Result<Action, String> {
    let s = inp.settings;
    let st = vm.status;
    let Some(target) = inp.target else {
        return Err("waiting for approval (nodectl update approve)".into());
    };
    if !older(st.launcher_version.as_deref(), &target.version) {
        // Already on the approved version; a newer one waits for approval.
        return Err(format!(
            "waiting for approval of launcher {} (nodectl update approve)",
            inp.newest.unwrap_or("?")
        ));
    }
    if s.workload_update_strategy
        .workload_update_methods
        .is_empty()
    {
        return Err("workload updates disabled (workloadUpdateMethods is empty)".into());
    }
    if let VmState::Backoff { until, last_error } = &st.state {
        if *until > inp.now {
            return Err(format!(
                "retrying in {} s after: {last_error}",
                secs_until(inp.now, *until)
            ));
        }
    }
    if !target.machine_types.contains(&vm.spec.machine_type) {
        return Err(format!(
            "target launcher {} does not offer machine type {}",
            target.version, vm.spec.machine_type
        ));
    }
    let mut m = vm.spec.migratability();
    // Direct updates: whatever versions were installed in between, the VM moves in one
    // migration, provided the target accepts the protocol its launcher speaks; otherwise
    // it is treated as not migratable (evicted if allowed) instead of a doomed attempt.
    let source = st
        .launcher_version
        .as_deref()
        .and_then(|v| inp.launchers.iter().find(|l| l.version == v));
    if let Some(gap) = source.and_then(|src| target.protocol_gap(src)) {
        if m.migratable {
            m.migratable = false;
            m.reason = Some(gap);
        }
    }
    let live = s.allows(WorkloadUpdateMethod::LiveMigrate);
    let evict = s.allows(WorkloadUpdateMethod::Evict);
    // With Evict, a migratable VM whose evictionStrategy migrates is migrated, as an
    // eviction of it would be turned into a migration in KubeVirt.
    let evict_migrates = evict
        && matches!(
            vm.spec.eviction_strategy,
            EvictionStrategy::LiveMigrate | EvictionStrategy::LiveMigrateIfPossible
        );
    if m.migratable && (live || evict_migrates) {
        if *migrating >= slots {
            return Err(format!(
                "waiting for a migration slot ({migrating} in progress, parallelMigrationsPerNode {slots})"
            ));
        }
        *migrating += 1;
        return Ok(Action::Migrate {
            vm: vm.spec.name.clone(),
            attempt: st.migration_failures + 1,
            version: target.version.clone(),
        });
    }
    let why = if m.migratable {
        "LiveMigrate is not enabled".to_string()
    } else {
        format!(
            "not migratable: {}",
            m.reason.as_deref().unwrap_or("unknown")
        )
    };
    if !evict {
        return Err(format!("{why} and Evict is not enabled"));
    }
    if vm.spec.eviction_strategy == EvictionStrategy::LiveMigrate {
        return Err(format!(
            "{why} and evictionStrategy LiveMigrate refuses eviction"
        ));
    }
    let window_open = out.batch.count > 0 && inp.now < out.batch.started_at + interval_ms;
    if window_open && out.batch.count >= batch_size {
        return Err(format!(
            "waiting for batch window ({} s, batchEvictionSize {batch_size})",
            secs_until(inp.now, out.batch.started_at + interval_ms)
        ));
    }
    if window_open {
        out.batch.count += 1;
    } else {
        out.batch = BatchWindow {
            started_at: inp.now,
            count: 1,
        };
    }
    Ok(Action::Evict {
        vm: vm.spec.name.clone(),
        version: target.version.clone(),
    })
}

#[cfg(test)]
#[path = "coordinator_tests.rs"]
mod tests;

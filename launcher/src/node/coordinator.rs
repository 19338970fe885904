//! The update coordinator's decisions, as pure functions: given the VMs' recorded states,
//! the settings and the time, say what to do next and why each outdated VM is not
//! updated yet. Nothing here does I/O, so the rules (batches, approval, runStrategy,
//! backoff) are unit-tested directly; the daemon only executes the actions.
//!
//! The per-VM state machine (DESIGN-NOTES): `Running(v)` → outdated (derived) →
//! `Migrating(attempt)` → `Running(v')`, or `Migrating` → `Backoff(until, error)` →
//! `Migrating`; or outdated → `Evicting` → `Starting` (restart) → `Running(v')`, or
//! `Stopped` per runStrategy.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

use super::launchers::compare_versions;
use super::settings::{NodeSettings, WorkloadUpdateMethod};
use super::spec::{EvictionStrategy, RunStrategy, VmSpec};

/// Unix time in milliseconds.
pub type Millis = i64;

/// Why a VM is not running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", content = "detail", rename_all = "camelCase")]
pub enum StopCause {
    /// Created with a runStrategy that does not start it (Manual, Halted).
    NotStarted,
    /// `nodectl vm stop`.
    UserStop,
    /// The guest powered off (exit status 0).
    PowerOff,
    /// The launcher failed (non-zero exit, signal, or unknown).
    Failed(String),
    /// Evicted for an update, and the runStrategy keeps it down.
    Evicted,
    /// The launcher exited 64: the VM was migrated away by someone else; restarting it
    /// here would run it twice, so it stays down.
    MigratedAway,
    /// The launcher could not be started.
    StartFailed(String),
}

/// The recorded state of one VM (stored as JSON, written before acting).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum VmState {
    /// Not running.
    Stopped {
        /// Why.
        cause: StopCause,
    },
    /// To be started (or restarted) on the target launcher, not before `not_before`.
    #[serde(rename_all = "camelCase")]
    Starting {
        /// Earliest start (crash-loop backoff).
        not_before: Millis,
        /// Restart after an eviction for an update.
        after_eviction: bool,
    },
    /// A launcher runs the VM.
    #[serde(rename_all = "camelCase")]
    Running {
        /// Since when this launcher runs it.
        since: Millis,
    },
    /// A live migration to a new launcher is in progress.
    #[serde(rename_all = "camelCase")]
    Migrating {
        /// 1 for the first try, then counting failures.
        attempt: u32,
        /// Version of the new launcher.
        target_version: String,
        /// When it started.
        started_at: Millis,
        /// Generation number of the new launcher's sockets.
        target_generation: u64,
        /// The new launcher's API socket.
        target_api_socket: String,
        /// The incoming migration socket path.
        incoming: String,
        /// The new launcher's pid, once spawned.
        target_pid: Option<u32>,
        /// Migration record id.
        record: i64,
    },
    /// The last migration failed; the VM runs on its old launcher until `until`.
    #[serde(rename_all = "camelCase")]
    Backoff {
        /// Earliest retry.
        until: Millis,
        /// Why the last attempt failed.
        last_error: String,
    },
    /// Being shut down for an update.
    #[serde(rename_all = "camelCase")]
    Evicting {
        /// When the shutdown was requested.
        since: Millis,
        /// Version it will restart on.
        target_version: String,
    },
    /// Being shut down at the user's request (or for deletion).
    #[serde(rename_all = "camelCase")]
    Stopping {
        /// When the shutdown was requested.
        since: Millis,
        /// Delete the VM once stopped.
        delete: bool,
    },
}

impl VmState {
    /// Whether a launcher process is (believed to be) running the VM.
    pub fn has_launcher(&self) -> bool {
        matches!(
            self,
            VmState::Running { .. }
                | VmState::Migrating { .. }
                | VmState::Backoff { .. }
                | VmState::Evicting { .. }
                | VmState::Stopping { .. }
        )
    }

    /// The phase users see.
    pub fn phase(&self, now: Millis) -> &'static str {
        match self {
            VmState::Stopped { .. } => "Stopped",
            VmState::Starting { not_before, .. } if *not_before > now => "CrashLoopBackOff",
            VmState::Starting { .. } => "Starting",
            VmState::Running { .. } | VmState::Backoff { .. } => "Running",
            VmState::Migrating { .. } => "Migrating",
            VmState::Evicting { .. } => "Evicting",
            VmState::Stopping { .. } => "Stopping",
        }
    }
}

/// The mutable per-VM record besides the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    /// State machine state.
    pub state: VmState,
    /// Version of the launcher that runs it (when running).
    pub launcher_version: Option<String>,
    /// That launcher's pid.
    pub pid: Option<u32>,
    /// That launcher's API socket.
    pub api_socket: Option<String>,
    /// Counter used to name sockets (`api-<n>.sock`), bumped for every launcher.
    pub generation: u64,
    /// Failed migration attempts since the last success (drives the backoff).
    pub migration_failures: u32,
    /// Quick consecutive crash restarts (drives the crash-loop backoff).
    pub crash_restarts: u32,
    /// Last error worth showing.
    pub last_error: Option<String>,
}

impl VmStatus {
    /// A new VM's status: starting or stopped per runStrategy.
    pub fn new(spec: &VmSpec, now: Millis) -> VmStatus {
        let state = match spec.run_strategy {
            RunStrategy::Always | RunStrategy::RerunOnFailure | RunStrategy::Once => {
                VmState::Starting {
                    not_before: now,
                    after_eviction: false,
                }
            }
            RunStrategy::Manual | RunStrategy::Halted => VmState::Stopped {
                cause: StopCause::NotStarted,
            },
        };
        VmStatus {
            state,
            launcher_version: None,
            pid: None,
            api_socket: None,
            generation: 0,
            migration_failures: 0,
            crash_restarts: 0,
            last_error: None,
        }
    }
}

/// How a launcher ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// Exit status 0: guest power-off or clean stop.
    Clean,
    /// Exit status 64: migrated away.
    MigratedAway,
    /// Anything else, with a description ("exit status 3", "killed by signal 9").
    Failure(String),
}

impl ExitKind {
    /// Classifies an exit status (`code` None = killed by `signal`).
    pub fn from_status(code: Option<i32>, signal: Option<i32>) -> ExitKind {
        match (code, signal) {
            (Some(0), _) => ExitKind::Clean,
            (Some(64), _) => ExitKind::MigratedAway,
            (Some(c), _) => ExitKind::Failure(format!("exit status {c}")),
            (None, Some(s)) => ExitKind::Failure(format!("killed by signal {s}")),
            (None, None) => ExitKind::Failure(
                "ended while noded was not its parent (exit status unknown)".into(),
            ),
        }
    }
}

/// Crash-loop restart delay: immediate after a crash of a launcher that ran a while,
/// then 1 s, 2 s, 4 s ... (capped at 5 min) while it keeps crashing quickly.
pub fn crash_restart_delay_ms(quick_crashes: u32) -> Millis {
    if quick_crashes == 0 {
        0
    } else {
        (1000i64 << (quick_crashes - 1).min(20)).min(300_000)
    }
}

/// A launcher that ran less than this before failing counts as a quick crash.
pub const QUICK_CRASH_MS: Millis = 30_000;

/// The new status after the VM's launcher ended, applying the runStrategy table:
///
/// | runStrategy    | power-off | crash    | evicted for update | user stop |
/// |----------------|-----------|----------|--------------------|-----------|
/// | Always         | restart   | restart  | restart on target  | stays down|
/// | RerunOnFailure | down      | restart  | restart on target  | down      |
/// | Manual         | down      | down     | down               | down      |
/// | Halted         | down      | down     | down               | down      |
/// | Once           | down      | down     | down               | down      |
///
/// A `RerunOnFailure` VM evicted for an update is restarted (a deliberate difference from
/// KubeVirt): the user did not ask it to stop. Exit 64 (migrated away) never restarts.
pub fn after_exit(
    status: &VmStatus,
    spec: &VmSpec,
    exit: &ExitKind,
    ran_ms: Millis,
    now: Millis,
) -> VmStatus {
    let mut next = status.clone();
    next.pid = None;
    next.api_socket = None;
    next.launcher_version = None;
    let restart = |next: &mut VmStatus, after_eviction: bool| {
        next.state = VmState::Starting {
            not_before: now + crash_restart_delay_ms(next.crash_restarts),
            after_eviction,
        };
    };
    match (&status.state, exit) {
        (_, ExitKind::MigratedAway) => {
            next.state = VmState::Stopped {
                cause: StopCause::MigratedAway,
            };
        }
        (VmState::Stopping { .. }, _) => {
            next.state = VmState::Stopped {
                cause: StopCause::UserStop,
            };
        }
        (VmState::Evicting { .. }, _) => {
            next.crash_restarts = 0;
            if matches!(
                spec.run_strategy,
                RunStrategy::Always | RunStrategy::RerunOnFailure
            ) {
                restart(&mut next, true);
            } else {
                next.state = VmState::Stopped {
                    cause: StopCause::Evicted,
                };
            }
        }
        (_, ExitKind::Clean) => {
            next.crash_restarts = 0;
            if spec.run_strategy == RunStrategy::Always {
                restart(&mut next, false);
            } else {
                next.state = VmState::Stopped {
                    cause: StopCause::PowerOff,
                };
            }
        }
        (_, ExitKind::Failure(why)) => {
            next.last_error = Some(format!("launcher failed: {why}"));
            if matches!(
                spec.run_strategy,
                RunStrategy::Always | RunStrategy::RerunOnFailure
            ) {
                next.crash_restarts = if ran_ms < QUICK_CRASH_MS {
                    status.crash_restarts + 1
                } else {
                    0
                };
                restart(&mut next, false);
            } else {
                next.state = VmState::Stopped {
                    cause: StopCause::Failed(why.clone()),
                };
            }
        }
    }
    next
}

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

/// The launcher that outdated VMs should move to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its version.
    pub version: String,
    /// Machine types it offers.
    pub machine_types: Vec<String>,
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
                Some(t) => out.actions.push(Action::Start {
                    vm: name.clone(),
                    version: t.version.clone(),
                }),
            }
            out.verdicts.insert(name, verdict);
            continue;
        }
        let Some(newest) = inp.newest else {
            out.verdicts.insert(name, verdict);
            continue;
        };
        if !st.state.has_launcher() || !older(st.launcher_version.as_deref(), newest) {
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
    let m = vm.spec.migratability();
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

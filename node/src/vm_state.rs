//! The per-VM state machine's states and the runStrategy rules applied when a launcher
//! ends (pure; split from the coordinator so that each file stays one concept).
//!
//! States (DESIGN-NOTES): `Running(v)` → outdated (derived) → `Migrating(attempt)` →
//! `Running(v')`, or `Migrating` → `Backoff(until, error)` → `Migrating`; or outdated →
//! `Evicting` → `Starting` (restart) → `Running(v')`, or `Stopped` per runStrategy.

use serde::{Deserialize, Serialize};

use super::spec::{RunStrategy, VmSpec};

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
    /// Live-migrated to another node (`nodectl vm migrate`), to this destination; it runs
    /// there now and is never restarted here.
    MovedAway(String),
    /// An incoming migration from another node (`nodectl vm receive`) failed: nothing
    /// runs here; the VM still runs on the source node.
    ReceiveFailed(String),
    /// This node fenced itself (it lost its etcd lease, docs/cluster.md): the launcher
    /// was killed, and the cluster owns the VM now; never restarted here.
    Fenced(String),
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
    /// Waiting for the VM from another node: an incoming launcher listens on `listen`
    /// (`nodectl vm receive`); it becomes `Running` when that launcher runs the VM.
    #[serde(rename_all = "camelCase")]
    Receiving {
        /// When the incoming launcher was started.
        since: Millis,
        /// The `tcp:IP:PORT` it listens on.
        listen: String,
        /// Migration record id.
        record: i64,
    },
    /// Being live-migrated to another node (`nodectl vm migrate`); the VM keeps running
    /// here until the launcher reports the migration completed (and exits 64).
    #[serde(rename_all = "camelCase")]
    MigratingOut {
        /// When the migration was asked for.
        since: Millis,
        /// The destination (`tcp:IP:PORT`).
        to: String,
        /// Migration record id.
        record: i64,
        /// Set when the launcher lost the handover's answer after `Go`: it stays paused,
        /// and where the VM runs is decided elsewhere (the target node in a cluster, an
        /// operator otherwise). Never restarted here meanwhile.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcome_unknown: Option<String>,
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
                | VmState::Receiving { .. }
                | VmState::MigratingOut { .. }
        )
    }

    /// The phase users see.
    pub fn phase(&self, now: Millis) -> &'static str {
        match self {
            VmState::Stopped {
                cause: StopCause::MovedAway(_),
            } => "MovedAway",
            VmState::Stopped {
                cause: StopCause::Fenced(_),
            } => "Fenced",
            VmState::Stopped { .. } => "Stopped",
            VmState::Receiving { .. } => "Receiving",
            VmState::MigratingOut { .. } => "MigratingOut",
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
    /// A spec change that needs a restart (machine type, kernel, memory, disks ...),
    /// applied when the VM next starts on a new launcher and never by a migration, which
    /// must keep the running machine identical (KubeVirt's `RestartRequired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<VmSpec>,
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
            pending: None,
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
        // An incoming launcher that ends before it runs the VM: the migration failed and
        // the VM still runs on the source node; starting it here would run it twice.
        (VmState::Receiving { .. }, _) => {
            let why = match exit {
                ExitKind::Failure(w) => w.clone(),
                ExitKind::Clean => "exit status 0".into(),
                ExitKind::MigratedAway => "exit status 64".into(),
            };
            next.last_error = Some(format!("incoming migration failed: {why}"));
            next.state = VmState::Stopped {
                cause: StopCause::ReceiveFailed(why),
            };
        }
        (VmState::MigratingOut { to, .. }, ExitKind::MigratedAway) => {
            next.state = VmState::Stopped {
                cause: StopCause::MovedAway(to.clone()),
            };
        }
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
            // A guest that powers off right after starting would otherwise be restarted
            // in a hot loop under Always: quick power-offs back off like quick crashes.
            next.crash_restarts = if ran_ms < QUICK_CRASH_MS {
                status.crash_restarts.saturating_add(1)
            } else {
                0
            };
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

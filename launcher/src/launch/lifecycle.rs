//! The launcher's lifecycle as one state machine: which state the VM of this process is
//! in, and which transitions are allowed. [`transition`] is a pure function, so that
//! the table is tested directly; [`super::runtime::Runtime`] applies it under one lock,
//! together with the action (pause, resume, ...) that the transition stands for, so two
//! concurrent requests cannot both pass the same check.

use contracts::launcher::Phase;

/// The state of this launcher's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for an incoming migration; no VM yet.
    Incoming,
    /// Guest code runs.
    Running,
    /// Paused through the API (one pause: a second is refused, one resume undoes it).
    Paused,
    /// A migration is under way; `paused` says what the VM was before it.
    Migrating {
        /// The VM was paused when the migration started (and is again if it fails).
        paused: bool,
    },
    /// The guest reset itself; the VM is being rebuilt.
    Rebooting,
    /// The VM runs elsewhere now; this process exits and never runs it again.
    MigratedAway,
    /// The process is stopping (shutdown, snapshot with stop, guest power-off).
    Stopping,
}

/// What happened, or what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An incoming migration completed: the VM runs here.
    VmArrived,
    /// `PUT /v1/pause`.
    Pause,
    /// `PUT /v1/resume`.
    Resume,
    /// `PUT /v1/migrate` starts sending.
    MigrationStarted,
    /// The migration ended.
    MigrationEnded(MigrationEnd),
    /// The guest reset itself (not during a migration: that reset is deferred).
    Reset,
    /// The rebuilt VM runs.
    Rebooted,
    /// `PUT /v1/snapshot` (the state stays; refused where no VM can be saved).
    Snapshot,
    /// Shutdown, or a snapshot that stops the VM.
    Stop,
}

/// How a migration ended, for the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationEnd {
    /// Failed or cancelled before Go: the source runs on (as before: running or paused).
    SourceRuns,
    /// Completed: the destination runs the VM.
    MigratedAway,
    /// After Go without an answer: the source stays paused until told.
    OutcomeUnknown,
}

/// A transition that the state machine refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the VM is {}; cannot {} now", describe(*.from), action(*.event))]
pub struct Refused {
    /// The state.
    pub from: State,
    /// What was asked.
    pub event: Event,
}

/// The state in words, for messages.
pub fn describe(s: State) -> &'static str {
    match s {
        State::Incoming => "waiting for an incoming migration",
        State::Running => "running",
        State::Paused => "paused",
        State::Migrating { .. } => "migrating",
        State::Rebooting => "rebooting",
        State::MigratedAway => "migrated away",
        State::Stopping => "stopping",
    }
}

fn action(e: Event) -> &'static str {
    match e {
        Event::VmArrived => "take an incoming VM",
        Event::Pause => "pause",
        Event::Resume => "resume",
        Event::MigrationStarted => "migrate",
        Event::MigrationEnded(_) => "end a migration",
        Event::Reset => "reset",
        Event::Rebooted => "finish a reboot",
        Event::Snapshot => "snapshot",
        Event::Stop => "stop",
    }
}

/// The transition table.
pub fn transition(from: State, event: Event) -> Result<State, Refused> {
    use State::*;
    let to = match (from, event) {
        (Incoming, Event::VmArrived) => Running,
        (Running, Event::Pause) => Paused,
        (Paused, Event::Resume) => Running,
        (Running, Event::MigrationStarted) => Migrating { paused: false },
        (Paused, Event::MigrationStarted) => Migrating { paused: true },
        (Migrating { paused }, Event::MigrationEnded(MigrationEnd::SourceRuns)) => {
            if paused {
                Paused
            } else {
                Running
            }
        }
        (Migrating { .. }, Event::MigrationEnded(MigrationEnd::OutcomeUnknown)) => Paused,
        (Migrating { .. }, Event::MigrationEnded(MigrationEnd::MigratedAway)) => MigratedAway,
        // A reset comes from a running vCPU; a paused VM's guest cannot reset.
        (Running | Paused, Event::Reset) => Rebooting,
        (Rebooting, Event::Rebooted) => Running,
        (Running | Paused, Event::Snapshot) => from,
        (MigratedAway, Event::Stop) => MigratedAway,
        (_, Event::Stop) => Stopping,
        _ => return Err(Refused { from, event }),
    };
    Ok(to)
}

impl State {
    /// What `GET /v1/status` reports.
    pub fn phase(self) -> Phase {
        match self {
            State::Incoming => Phase::Incoming,
            State::Running | State::Rebooting | State::Stopping => Phase::Running,
            State::Paused => Phase::Paused,
            // Until the process exits, a migrated-away source still says "migrating".
            State::Migrating { .. } | State::MigratedAway => Phase::Migrating,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    const STATES: [State; 8] = [
        Incoming,
        Running,
        Paused,
        Migrating { paused: false },
        Migrating { paused: true },
        Rebooting,
        MigratedAway,
        Stopping,
    ];
    const EVENTS: [Event; 11] = [
        Event::VmArrived,
        Event::Pause,
        Event::Resume,
        Event::MigrationStarted,
        Event::MigrationEnded(MigrationEnd::SourceRuns),
        Event::MigrationEnded(MigrationEnd::MigratedAway),
        Event::MigrationEnded(MigrationEnd::OutcomeUnknown),
        Event::Reset,
        Event::Rebooted,
        Event::Snapshot,
        Event::Stop,
    ];

    /// The whole table: every (state, event) pair that is allowed, and where it leads;
    /// every other pair is refused.
    #[test]
    fn the_transition_table() {
        let allowed = [
            (Incoming, Event::VmArrived, Running),
            (Running, Event::Pause, Paused),
            (Paused, Event::Resume, Running),
            (
                Running,
                Event::MigrationStarted,
                Migrating { paused: false },
            ),
            (Paused, Event::MigrationStarted, Migrating { paused: true }),
            (
                Migrating { paused: false },
                Event::MigrationEnded(MigrationEnd::SourceRuns),
                Running,
            ),
            (
                Migrating { paused: true },
                Event::MigrationEnded(MigrationEnd::SourceRuns),
                Paused,
            ),
            (
                Migrating { paused: false },
                Event::MigrationEnded(MigrationEnd::OutcomeUnknown),
                Paused,
            ),
            (
                Migrating { paused: true },
                Event::MigrationEnded(MigrationEnd::OutcomeUnknown),
                Paused,
            ),
            (
                Migrating { paused: false },
                Event::MigrationEnded(MigrationEnd::MigratedAway),
                MigratedAway,
            ),
            (
                Migrating { paused: true },
                Event::MigrationEnded(MigrationEnd::MigratedAway),
                MigratedAway,
            ),
            (Running, Event::Reset, Rebooting),
            (Paused, Event::Reset, Rebooting),
            (Rebooting, Event::Rebooted, Running),
            (Running, Event::Snapshot, Running),
            (Paused, Event::Snapshot, Paused),
            (MigratedAway, Event::Stop, MigratedAway),
        ];
        for s in STATES {
            for e in EVENTS {
                let expected = allowed
                    .iter()
                    .find(|(f, ev, _)| *f == s && *ev == e)
                    .map(|(_, _, t)| *t)
                    .or((e == Event::Stop).then_some(Stopping));
                match (transition(s, e), expected) {
                    (Ok(t), Some(x)) => assert_eq!(t, x, "{s:?} --{e:?}-->"),
                    (Err(r), None) => assert_eq!(r, Refused { from: s, event: e }),
                    (got, x) => panic!("{s:?} --{e:?}--> {got:?}, expected {x:?}"),
                }
            }
        }
    }

    #[test]
    fn a_second_pause_is_refused_and_says_why() {
        let s = transition(Running, Event::Pause).unwrap();
        let e = transition(s, Event::Pause).unwrap_err();
        assert_eq!(e.to_string(), "the VM is paused; cannot pause now");
        assert_eq!(transition(s, Event::Resume), Ok(Running));
        let e = transition(Running, Event::Resume).unwrap_err().to_string();
        assert_eq!(e, "the VM is running; cannot resume now");
        let e = transition(Migrating { paused: false }, Event::Pause).unwrap_err();
        assert!(e.to_string().contains("migrating"));
    }

    #[test]
    fn a_migrated_vm_never_runs_here_again() {
        for e in EVENTS {
            if let Ok(t) = transition(MigratedAway, e) {
                assert_eq!(t, MigratedAway, "{e:?}");
            }
        }
        assert_eq!(MigratedAway.phase(), Phase::Migrating);
    }
}

//! Unit tests of the coordinator's pure decisions.

use super::*;
use crate::settings::{apply_text, NodeSettings};
use crate::spec::parse_spec_text;

fn spec(name: &str, extra: &str) -> VmSpec {
    let mut s =
        parse_spec_text(&format!("name: {name}\nkernel: /k\nmemory: 64Mi\n{extra}")).unwrap();
    s.machine_type = "q35-1.0".into();
    s
}

fn running(version: &str) -> VmStatus {
    VmStatus {
        state: VmState::Running { since: 0 },
        launcher_version: Some(version.into()),
        pid: Some(100),
        api_socket: Some("/x".into()),
        generation: 1,
        migration_failures: 0,
        crash_restarts: 0,
        last_error: None,
        pending: None,
    }
}

fn target(v: &str) -> Target {
    Target {
        version: v.into(),
        machine_types: vec!["q35-1.0".into()],
        migration_protocol: crate::launchers::Range { min: 1, max: 1 },
        on_channel: true,
    }
}

fn settings(text: &str) -> NodeSettings {
    apply_text(&NodeSettings::default(), text).unwrap()
}

struct World {
    specs: Vec<VmSpec>,
    statuses: Vec<VmStatus>,
    settings: NodeSettings,
    target: Target,
    /// Every installed launcher, oldest first (the target is taken from here when listed).
    launchers: Vec<Target>,
    batch: BatchWindow,
}

impl World {
    fn new(settings_text: &str) -> World {
        World {
            specs: vec![],
            statuses: vec![],
            settings: settings(settings_text),
            target: target("2.0.0"),
            launchers: vec![target("1.0.0"), target("2.0.0")],
            batch: BatchWindow::default(),
        }
    }
    fn vm(mut self, name: &str, extra: &str, status: VmStatus) -> World {
        self.specs.push(spec(name, extra));
        self.statuses.push(status);
        self
    }
    fn plan(&self, now: Millis) -> Plan {
        let inp = Inputs {
            now,
            settings: &self.settings,
            newest: Some(&self.target.version),
            target: Some(&self.target),
            approval_pending: false,
            batch: self.batch,
            launchers: &self.launchers,
            channel: "stable",
            vms: self
                .specs
                .iter()
                .zip(&self.statuses)
                .map(|(spec, status)| VmInput { spec, status })
                .collect(),
        };
        plan(&inp)
    }
}

const HOSTDEV: &str = "hostDevices: [{name: gpu}]\n";

#[test]
fn migratable_vm_is_migrated_and_current_vm_is_left_alone() {
    let w = World::new("{}")
        .vm("a", "", running("1.0.0"))
        .vm("b", "", running("2.0.0"));
    let p = w.plan(1000);
    assert_eq!(
        p.actions,
        vec![Action::Migrate {
            vm: "a".into(),
            attempt: 1,
            version: "2.0.0".into()
        }]
    );
    assert!(p.verdicts["a"].outdated);
    assert!(!p.verdicts["b"].outdated);
    assert_eq!(p.verdicts["b"].reason, None);
}

#[test]
fn parallel_migrations_are_limited() {
    let w = World::new("liveMigrationConfig: {parallelMigrationsPerNode: 1}")
        .vm("a", "", running("1.0.0"))
        .vm("b", "", running("1.0.0"));
    let p = w.plan(0);
    assert_eq!(p.actions.len(), 1);
    assert!(p.verdicts["b"]
        .reason
        .as_ref()
        .unwrap()
        .contains("waiting for a migration slot"));
}

#[test]
fn empty_methods_update_nothing() {
    let w = World::new("workloadUpdateStrategy: {workloadUpdateMethods: []}")
        .vm("a", "", running("1.0.0"))
        .vm("b", HOSTDEV, running("1.0.0"));
    let p = w.plan(0);
    assert!(p.actions.is_empty());
    for v in ["a", "b"] {
        assert!(p.verdicts[v].outdated);
        assert_eq!(
            p.verdicts[v].reason.as_deref(),
            Some("workload updates disabled (workloadUpdateMethods is empty)")
        );
    }
}

#[test]
fn non_migratable_with_live_migrate_only_stays_outdated() {
    let w = World::new("{}").vm("a", HOSTDEV, running("1.0.0"));
    let p = w.plan(0);
    assert!(p.actions.is_empty());
    assert_eq!(
        p.verdicts["a"].reason.as_deref(),
        Some("not migratable: HostDevicesNotLiveMigratable and Evict is not enabled")
    );
}

#[test]
fn non_migratable_with_evict_is_evicted_unless_strategy_refuses() {
    let w = World::new("workloadUpdateStrategy: {workloadUpdateMethods: [LiveMigrate, Evict]}")
        .vm("a", HOSTDEV, running("1.0.0"))
        .vm(
            "b",
            &format!("{HOSTDEV}evictionStrategy: LiveMigrate\n"),
            running("1.0.0"),
        )
        .vm("c", "", running("1.0.0"));
    let p = w.plan(0);
    assert_eq!(
        p.actions,
        vec![
            Action::Evict {
                vm: "a".into(),
                version: "2.0.0".into()
            },
            Action::Migrate {
                vm: "c".into(),
                attempt: 1,
                version: "2.0.0".into()
            }
        ]
    );
    assert!(p.verdicts["b"]
        .reason
        .as_ref()
        .unwrap()
        .contains("refuses eviction"));
}

#[test]
fn evict_only_migrates_when_eviction_strategy_says_so() {
    let w = World::new("workloadUpdateStrategy: {workloadUpdateMethods: [Evict]}")
        .vm(
            "a",
            "evictionStrategy: LiveMigrateIfPossible\n",
            running("1.0.0"),
        )
        .vm("b", "", running("1.0.0"));
    let p = w.plan(0);
    assert!(matches!(&p.actions[0], Action::Migrate { vm, .. } if vm == "a"));
    assert!(matches!(&p.actions[1], Action::Evict { vm, .. } if vm == "b"));
}

#[test]
fn batch_size_and_interval_are_honoured() {
    let mut w = World::new(
        "workloadUpdateStrategy: {workloadUpdateMethods: [Evict], batchEvictionSize: 2, batchEvictionInterval: 10s}",
    );
    for n in ["a", "b", "c", "d", "e"] {
        w = w.vm(n, HOSTDEV, running("1.0.0"));
    }
    let p = w.plan(1_000);
    let evicted: Vec<_> = p
        .actions
        .iter()
        .map(|a| match a {
            Action::Evict { vm, .. } => vm.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(evicted, ["a", "b"]);
    assert_eq!(
        p.batch,
        BatchWindow {
            started_at: 1_000,
            count: 2
        }
    );
    assert_eq!(
        p.verdicts["c"].reason.as_deref(),
        Some("waiting for batch window (10 s, batchEvictionSize 2)")
    );
    // Later in the same window: nothing more.
    w.statuses[0].state = VmState::Evicting {
        since: 1_000,
        target_version: "2.0.0".into(),
    };
    w.statuses[1].state = VmState::Evicting {
        since: 1_000,
        target_version: "2.0.0".into(),
    };
    w.batch = p.batch;
    let p2 = w.plan(9_000);
    assert!(p2.actions.is_empty());
    assert!(p2.verdicts["c"]
        .reason
        .as_ref()
        .unwrap()
        .starts_with("waiting for batch window (2 s"));
    // Next window: two more.
    let p3 = w.plan(11_000);
    assert_eq!(p3.actions.len(), 2);
    assert_eq!(
        p3.batch,
        BatchWindow {
            started_at: 11_000,
            count: 2
        }
    );
}

#[test]
fn manual_approval_waits() {
    let s = settings("approvalStrategy: Manual");
    let specs = [spec("a", "")];
    let statuses = [running("1.0.0")];
    let approved = target("1.0.0");
    let inp = Inputs {
        now: 0,
        settings: &s,
        newest: Some("2.0.0"),
        target: Some(&approved),
        approval_pending: true,
        batch: BatchWindow::default(),
        launchers: &[],
        channel: "stable",
        vms: vec![VmInput {
            spec: &specs[0],
            status: &statuses[0],
        }],
    };
    let p = plan(&inp);
    assert!(p.actions.is_empty());
    assert!(p.verdicts["a"].outdated);
    assert_eq!(
        p.verdicts["a"].reason.as_deref(),
        Some("waiting for approval of launcher 2.0.0 (nodectl update approve)")
    );
}

#[test]
fn backoff_is_respected_and_doubles() {
    let s =
        settings("liveMigrationConfig: {retryBackoffBaseSeconds: 20, retryBackoffMaxSeconds: 300}");
    assert_eq!(migration_backoff_ms(&s, 1), 20_000);
    assert_eq!(migration_backoff_ms(&s, 2), 40_000);
    assert_eq!(migration_backoff_ms(&s, 3), 80_000);
    assert_eq!(migration_backoff_ms(&s, 5), 300_000);
    assert_eq!(migration_backoff_ms(&s, 60), 300_000);
    let mut st = running("1.0.0");
    st.migration_failures = 2;
    st.state = VmState::Backoff {
        until: 40_000,
        last_error: "target not ready".into(),
    };
    let w = World::new("{}").vm("a", "", st);
    let p = w.plan(0);
    assert!(p.actions.is_empty());
    assert_eq!(
        p.verdicts["a"].reason.as_deref(),
        Some("retrying in 40 s after: target not ready")
    );
    let p = w.plan(40_000);
    assert_eq!(
        p.actions,
        vec![Action::Migrate {
            vm: "a".into(),
            attempt: 3,
            version: "2.0.0".into()
        }]
    );
}

#[test]
fn machine_type_must_be_offered_by_target() {
    let mut w = World::new("{}").vm("a", "", running("1.0.0"));
    w.target.machine_types = vec!["q35-2.0".into()];
    let p = w.plan(0);
    assert!(p.actions.is_empty());
    assert!(p.verdicts["a"]
        .reason
        .as_ref()
        .unwrap()
        .contains("does not offer machine type q35-1.0"));
}

#[test]
fn starting_vms_start_on_target_after_their_delay() {
    let mut st = running("1.0.0");
    st.state = VmState::Starting {
        not_before: 5_000,
        after_eviction: false,
    };
    st.last_error = Some("launcher failed: exit status 1".into());
    let w = World::new("workloadUpdateStrategy: {workloadUpdateMethods: []}").vm("a", "", st);
    let p = w.plan(0);
    assert!(p.actions.is_empty());
    assert_eq!(
        p.verdicts["a"].reason.as_deref(),
        Some("restarting in 5 s after: launcher failed: exit status 1")
    );
    let p = w.plan(5_000);
    assert_eq!(
        p.actions,
        vec![Action::Start {
            vm: "a".into(),
            version: "2.0.0".into()
        }]
    );
}

#[test]
fn direct_update_skips_intermediate_versions() {
    let mut w = World::new("{}").vm("a", "", running("1.0.0"));
    w.launchers = vec![target("1.0.0"), target("1.5.0"), target("2.0.0")];
    let p = w.plan(0);
    assert_eq!(
        p.actions,
        vec![Action::Migrate {
            vm: "a".into(),
            attempt: 1,
            version: "2.0.0".into()
        }]
    );
}

#[test]
fn protocol_window_outside_target_means_evict_or_stay() {
    let mut w = World::new("{}").vm("a", "runStrategy: Always\n", running("1.0.0"));
    w.target.migration_protocol = crate::launchers::Range { min: 2, max: 3 };
    w.launchers[1] = w.target.clone();
    let p = w.plan(0);
    assert!(p.actions.is_empty(), "no doomed migration: {:?}", p.actions);
    assert_eq!(
        p.verdicts["a"].reason.as_deref(),
        Some("not migratable: launcher 1.0.0 speaks migration protocol 1..1, outside the 2..3 window target launcher 2.0.0 accepts and Evict is not enabled")
    );
    w.settings = settings("workloadUpdateStrategy: {workloadUpdateMethods: [LiveMigrate, Evict]}");
    let p = w.plan(0);
    assert_eq!(
        p.actions,
        vec![Action::Evict {
            vm: "a".into(),
            version: "2.0.0".into()
        }]
    );
    // evictionStrategy LiveMigrate refuses the eviction: it stays, with the reason.
    w.specs[0] = spec("a", "evictionStrategy: LiveMigrate\n");
    let p = w.plan(0);
    assert!(p.actions.is_empty());
    assert!(p.verdicts["a"]
        .reason
        .as_deref()
        .unwrap_or("")
        .contains("refuses eviction"));
    // Overlapping windows migrate.
    w.target.migration_protocol = crate::launchers::Range { min: 1, max: 2 };
    w.specs[0] = spec("a", "");
    assert!(matches!(w.plan(0).actions[..], [Action::Migrate { .. }]));
}

#[test]
fn a_vm_whose_machine_type_the_target_dropped_restarts_on_an_older_launcher() {
    let mut st = running("1.0.0");
    st.state = VmState::Starting {
        not_before: 0,
        after_eviction: false,
    };
    let mut w = World::new("{}").vm("a", "", st);
    w.target.machine_types = vec!["q35-2.0".into()];
    w.launchers[1] = w.target.clone();
    let p = w.plan(0);
    assert_eq!(
        p.actions,
        vec![Action::Start {
            vm: "a".into(),
            version: "1.0.0".into()
        }]
    );
    // With a pending change to q35-2.0, the restart takes the target.
    let mut pending = w.specs[0].clone();
    pending.machine_type = "q35-2.0".into();
    w.statuses[0].pending = Some(pending);
    assert_eq!(
        w.plan(0).actions,
        vec![Action::Start {
            vm: "a".into(),
            version: "2.0.0".into()
        }]
    );
    // No launcher offers it: it waits, with the reason.
    if let Some(p) = w.statuses[0].pending.as_mut() {
        p.machine_type = "pc-9".into();
    }
    let p = w.plan(0);
    assert!(p.actions.is_empty());
    assert_eq!(
        p.verdicts["a"].reason.as_deref(),
        Some("no installed launcher offers machine type pc-9")
    );
}

#[test]
fn a_vm_on_an_off_channel_launcher_is_not_downgraded() {
    let mut w = World::new("{}").vm("a", "", running("3.0.0-rc.1"));
    let mut rc = target("3.0.0-rc.1");
    rc.on_channel = false;
    w.launchers.push(rc);
    let p = w.plan(0);
    assert!(p.actions.is_empty());
    assert!(!p.verdicts["a"].outdated);
    assert!(p.verdicts["a"]
        .reason
        .as_deref()
        .unwrap_or("")
        .contains("untested update path"));
}

fn exit_state(strategy: &str, from: VmState, exit: ExitKind) -> VmState {
    let s = spec("a", &format!("runStrategy: {strategy}\n"));
    let mut st = running("1.0.0");
    st.state = from;
    after_exit(&st, &s, &exit, 60_000, 100).state
}

#[test]
fn run_strategy_table() {
    let run = || VmState::Running { since: 0 };
    let evicting = || VmState::Evicting {
        since: 0,
        target_version: "2.0.0".into(),
    };
    let stopping = || VmState::Stopping {
        since: 0,
        delete: false,
    };
    let crash = || ExitKind::Failure("exit status 1".into());
    let restarts = |s: &VmState| matches!(s, VmState::Starting { .. });
    // Always
    assert!(restarts(&exit_state("Always", run(), ExitKind::Clean)));
    assert!(restarts(&exit_state("Always", run(), crash())));
    assert!(matches!(
        exit_state("Always", evicting(), ExitKind::Clean),
        VmState::Starting {
            after_eviction: true,
            ..
        }
    ));
    assert_eq!(
        exit_state("Always", stopping(), ExitKind::Clean),
        VmState::Stopped {
            cause: StopCause::UserStop
        }
    );
    // RerunOnFailure
    assert_eq!(
        exit_state("RerunOnFailure", run(), ExitKind::Clean),
        VmState::Stopped {
            cause: StopCause::PowerOff
        }
    );
    assert!(restarts(&exit_state("RerunOnFailure", run(), crash())));
    assert!(restarts(&exit_state(
        "RerunOnFailure",
        evicting(),
        ExitKind::Clean
    )));
    // Manual, Once, Halted stay down
    for s in ["Manual", "Once", "Halted"] {
        assert_eq!(
            exit_state(s, run(), ExitKind::Clean),
            VmState::Stopped {
                cause: StopCause::PowerOff
            }
        );
        assert!(matches!(
            exit_state(s, run(), crash()),
            VmState::Stopped {
                cause: StopCause::Failed(_)
            }
        ));
        assert_eq!(
            exit_state(s, evicting(), ExitKind::Clean),
            VmState::Stopped {
                cause: StopCause::Evicted
            }
        );
    }
    // Migrated away never restarts.
    assert_eq!(
        exit_state("Always", run(), ExitKind::MigratedAway),
        VmState::Stopped {
            cause: StopCause::MigratedAway
        }
    );
}

#[test]
fn crash_loops_back_off() {
    let s = spec("a", "");
    let mut st = running("1.0.0");
    let crash = ExitKind::Failure("exit status 1".into());
    st = after_exit(&st, &s, &crash, 100, 0);
    assert_eq!(
        st.state,
        VmState::Starting {
            not_before: 1_000,
            after_eviction: false
        }
    );
    st.state = VmState::Running { since: 0 };
    st = after_exit(&st, &s, &crash, 100, 0);
    assert_eq!(
        st.state,
        VmState::Starting {
            not_before: 2_000,
            after_eviction: false
        }
    );
    // A launcher that ran long enough resets the count.
    st.state = VmState::Running { since: 0 };
    st = after_exit(&st, &s, &crash, QUICK_CRASH_MS, 0);
    assert_eq!(
        st.state,
        VmState::Starting {
            not_before: 0,
            after_eviction: false
        }
    );
    assert_eq!(
        ExitKind::from_status(Some(64), None),
        ExitKind::MigratedAway
    );
    assert_eq!(
        ExitKind::from_status(None, Some(9)),
        ExitKind::Failure("killed by signal 9".into())
    );
}

#[test]
fn phases() {
    assert_eq!(
        VmState::Backoff {
            until: 0,
            last_error: String::new()
        }
        .phase(0),
        "Running"
    );
    assert_eq!(
        VmState::Starting {
            not_before: 10,
            after_eviction: false
        }
        .phase(0),
        "CrashLoopBackOff"
    );
    assert_eq!(
        VmState::Stopped {
            cause: StopCause::NotStarted
        }
        .phase(0),
        "Stopped"
    );
}

#[test]
fn quick_power_offs_under_always_back_off_instead_of_looping() {
    let s = spec("a", "runStrategy: Always\n");
    let mut st = running("1.0.0");
    // Powered off 100 ms after starting: restart, but not at once.
    st = after_exit(&st, &s, &ExitKind::Clean, 100, 0);
    assert_eq!(
        st.state,
        VmState::Starting {
            not_before: 1_000,
            after_eviction: false
        }
    );
    st.state = VmState::Running { since: 0 };
    st = after_exit(&st, &s, &ExitKind::Clean, 100, 0);
    assert_eq!(
        st.state,
        VmState::Starting {
            not_before: 2_000,
            after_eviction: false
        }
    );
    // A guest that ran a while before powering off is restarted immediately.
    st.state = VmState::Running { since: 0 };
    st = after_exit(&st, &s, &ExitKind::Clean, QUICK_CRASH_MS, 0);
    assert_eq!(
        st.state,
        VmState::Starting {
            not_before: 0,
            after_eviction: false
        }
    );
}

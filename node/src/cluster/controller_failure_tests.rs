//! The node-failure rules of [`plan`]: a gone node is recorded, its VMs wait out the
//! grace period (the node fences itself meanwhile), then run elsewhere as their
//! runStrategy says; a migration cut by a failure is left to the live node.

use super::tests::{node, running, view, vm};
use super::*;

const GRACE_MS: u64 = 10_000;

fn rescheduled(p: &Plan) -> Vec<String> {
    p.decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Reschedule { vm, .. } => Some(vm.clone()),
            _ => None,
        })
        .collect()
}

fn failed_at(v: &mut View, node: &str, since: u64) {
    v.failures.insert(node.into(), NodeFailureRecord { since });
}

#[test]
fn a_gone_node_with_vms_is_recorded_once_and_forgotten_when_back() {
    let mut v = view(&[node("b", 8, &["1.0.0"])]);
    v.vms.insert("x".into(), vm("x", "", Some("a")));
    let p = plan(&v);
    assert!(p
        .decisions
        .contains(&Decision::NodeLost { node: "a".into() }));
    // Nothing runs elsewhere yet: the node may still be running it, cut off.
    assert!(rescheduled(&p).is_empty());
    assert!(placements_of(&p).is_empty());
    let now = v.now;
    failed_at(&mut v, "a", now);
    let p = plan(&v);
    assert!(!p
        .decisions
        .iter()
        .any(|d| matches!(d, Decision::NodeLost { .. })));
    // Back with a new lease: the record goes, nothing is rescheduled.
    v.nodes.insert("a".into(), node("a", 8, &["1.0.0"]));
    let p = plan(&v);
    assert!(p
        .decisions
        .contains(&Decision::NodeBack { node: "a".into() }));
    assert!(rescheduled(&p).is_empty());
}

fn placements_of(p: &Plan) -> Vec<String> {
    p.decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Place { vm, .. } => Some(vm.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn vms_of_a_failed_node_move_only_after_the_grace_period_as_run_strategy_says() {
    let mut v = view(&[node("b", 8, &["1.0.0"])]);
    for (name, rs) in [
        ("always", "Always"),
        ("rerun", "RerunOnFailure"),
        ("manual", "Manual"),
        ("halted", "Halted"),
    ] {
        v.vms.insert(
            name.into(),
            vm(name, &format!("runStrategy: {rs}\n"), Some("a")),
        );
    }
    let now = v.now;
    failed_at(&mut v, "a", now - GRACE_MS + 1);
    assert!(rescheduled(&plan(&v)).is_empty(), "inside the grace period");
    failed_at(&mut v, "a", now - GRACE_MS);
    let p = plan(&v);
    let mut r = rescheduled(&p);
    r.sort();
    assert_eq!(r, ["always", "halted", "manual", "rerun"]);
    let reason = |name: &str| {
        p.decisions.iter().find_map(|d| match d {
            Decision::Reschedule { vm, reason, .. } if vm == name => Some(reason.clone()),
            _ => None,
        })
    };
    assert!(reason("always").unwrap().contains("restarted elsewhere"));
    assert!(reason("manual").unwrap().contains("runStrategy Manual"));
    // Applied (node unassigned, reason set): Always and RerunOnFailure are placed on b,
    // Manual and Halted stay stopped.
    for d in &p.decisions {
        if let Decision::Reschedule { vm, reason, .. } = d {
            let x = v.vms.get_mut(vm).unwrap();
            x.node_name = None;
            x.message = Some(reason.clone());
        }
    }
    v.failures.clear();
    let mut placed = placements_of(&plan(&v));
    placed.sort();
    assert_eq!(placed, ["always", "rerun"]);
    // The grace period is the configured one.
    let mut v2 = view(&[node("b", 8, &["1.0.0"])]);
    v2.vms.insert("x".into(), vm("x", "", Some("a")));
    v2.config.node_failure.grace_period = 30;
    failed_at(&mut v2, "a", now - GRACE_MS);
    assert!(rescheduled(&plan(&v2)).is_empty());
}

#[test]
fn host_local_disks_keep_a_vm_waiting_for_its_failed_node() {
    let mut v = view(&[node("b", 8, &["1.0.0"])]);
    let mut x = vm("x", "", Some("a"));
    x.host_affinity = Some("a".into());
    v.vms.insert("x".into(), x);
    failed_at(&mut v, "a", 0);
    let p = plan(&v);
    assert!(rescheduled(&p).is_empty());
    assert!(p
        .status
        .unschedulable
        .iter()
        .any(|b| b.vm == "x" && b.reason.contains("failed and holds its disks")));
}

#[test]
fn a_migration_cut_by_a_failure_is_left_to_the_live_node() {
    let mut v = view(&[node("b", 8, &["1.0.0"])]);
    v.vms.insert("x".into(), vm("x", "", Some("a")));
    v.statuses.insert("x".into(), running("a", "1.0.0"));
    failed_at(&mut v, "a", 0);
    // Source a failed after the data started moving: target b says where it runs.
    v.migrations = vec![MigrationRecord::for_test(
        "x",
        "a",
        "b",
        MigrationPhase::Running,
    )];
    let p = plan(&v);
    assert!(rescheduled(&p).is_empty());
    assert!(!p
        .decisions
        .iter()
        .any(|d| matches!(d, Decision::Abandon { .. })));
    // Both failed and fenced: the record is abandoned, and then the VM runs elsewhere.
    let mut v = view(&[node("c", 8, &["1.0.0"])]);
    v.vms.insert("x".into(), vm("x", "", Some("a")));
    failed_at(&mut v, "a", 0);
    failed_at(&mut v, "b", 0);
    v.migrations = vec![MigrationRecord::for_test(
        "x",
        "a",
        "b",
        MigrationPhase::TargetReady,
    )];
    let p = plan(&v);
    assert!(p.decisions.iter().any(|d| matches!(
        d,
        Decision::Abandon { reason, .. } if reason.contains("both failed")
    )));
    assert_eq!(rescheduled(&p), ["x"]);
}

#[test]
fn a_gone_draining_node_is_not_drained() {
    let mut v = view(&[node("b", 8, &["1.0.0"])]);
    v.vms.insert("x".into(), vm("x", "", Some("a")));
    v.node_configs.insert(
        "a".into(),
        NodeConfig {
            unschedulable: true,
            drain_requested_at: Some(1),
        },
    );
    let p = plan(&v);
    assert!(!p
        .decisions
        .iter()
        .any(|d| matches!(d, Decision::Evict { .. } | Decision::Migrate { .. })));
}

#[test]
fn an_unknown_handover_is_abandoned_only_once_its_target_is_fenced() {
    let mut v = view(&[node("a", 8, &["1.0.0"])]);
    v.vms.insert("x".into(), vm("x", "", Some("a")));
    v.statuses.insert("x".into(), running("a", "1.0.0"));
    let mut r = MigrationRecord::for_test("x", "a", "b", MigrationPhase::Running);
    r.handover = Some(Handover::Unknown);
    v.migrations = vec![r];
    let abandoned = |p: &Plan| {
        p.decisions.iter().any(|d| {
            matches!(
                d,
                Decision::Abandon { reason, .. } if reason.contains("outcome is unknown")
            )
        })
    };
    // Target b gone but not yet fenced: it may still run the VM and answer.
    let now = v.now;
    failed_at(&mut v, "b", now);
    assert!(!abandoned(&plan(&v)));
    // Past the grace period b has fenced itself: nobody runs the VM but the paused
    // source, which restarts it.
    failed_at(&mut v, "b", now - GRACE_MS);
    let p = plan(&v);
    assert!(abandoned(&p));
    // The VM stays assigned to the live source (it is not rescheduled elsewhere).
    assert!(rescheduled(&p).is_empty());
    // Without the unknown handover, a live source decides alone.
    v.migrations[0].handover = None;
    assert!(!abandoned(&plan(&v)));
}

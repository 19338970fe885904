//! The leader's rules, driven through the pure [`plan`].

use super::*;
use crate::cluster::model::{EvictOrder, NodeLauncher};
use crate::spec::parse_spec_text;

const GIB: u64 = 1 << 30;

pub(super) fn node(name: &str, mem_gib: u64, versions: &[&str]) -> NodeObject {
    NodeObject {
        name: name.into(),
        ready: true,
        migration_address: format!("10.0.0.{}:4800", name.len()),
        memory_total: mem_gib * GIB,
        vcpus_total: 16,
        memory_allocated: 0,
        vcpus_allocated: 0,
        launchers: versions
            .iter()
            .map(|v| NodeLauncher {
                version: v.to_string(),
                channel: "stable".into(),
                machine_types: vec!["q35-1.0".into()],
                migration_protocol: [1, 2],
            })
            .collect(),
        channel: "stable".into(),
        noded_version: "0.1.0".into(),
    }
}

pub(super) fn vm(name: &str, extra: &str, node: Option<&str>) -> ClusterVm {
    let spec = parse_spec_text(&format!(
        "name: {name}\nkernel: /k\nmemory: 1Gi\nmachineType: q35-1.0\n{extra}"
    ))
    .expect("spec");
    ClusterVm {
        spec,
        node_name: node.map(str::to_string),
        host_affinity: None,
        evict: None,
        message: None,
        deletion_requested: false,
        created_at: 1,
    }
}

pub(super) fn running(node: &str, version: &str) -> VmStatusReport {
    VmStatusReport {
        node: node.into(),
        phase: "Running".into(),
        launcher_version: Some(version.into()),
        message: None,
        outdated: false,
    }
}

pub(super) fn view(nodes: &[NodeObject]) -> View {
    View {
        now: 1_000_000,
        nodes: nodes.iter().map(|n| (n.name.clone(), n.clone())).collect(),
        ..View::default()
    }
}

fn drain(v: &mut View, node: &str) {
    v.node_configs.insert(
        node.into(),
        NodeConfig {
            unschedulable: true,
            drain_requested_at: Some(1),
        },
    );
}

fn placements(p: &Plan) -> Vec<(String, String)> {
    p.decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Place { vm, node } => Some((vm.clone(), node.clone())),
            _ => None,
        })
        .collect()
}

fn migrations(p: &Plan) -> Vec<(String, String, String)> {
    p.decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Migrate { vm, source, target } => {
                Some((vm.clone(), source.clone(), target.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn placement_spreads_by_free_memory_and_respects_capacity() {
    let mut v = view(&[node("a", 3, &["1.0.0"]), node("b", 2, &["1.0.0"])]);
    for n in ["v1", "v2", "v3", "v4", "v5", "v6"] {
        v.vms.insert(n.into(), vm(n, "", None));
    }
    let p = plan(&v);
    let placed = placements(&p);
    assert_eq!(placed.len(), 5, "{placed:?}");
    let on = |n: &str| placed.iter().filter(|(_, x)| x == n).count();
    assert_eq!((on("a"), on("b")), (3, 2));
    assert_eq!(p.status.unschedulable.len(), 1);
    assert!(
        p.status.unschedulable[0]
            .reason
            .contains("not enough memory"),
        "{:?}",
        p.status.unschedulable
    );
}

#[test]
fn placement_needs_the_machine_type_and_skips_cordoned_nodes() {
    let mut v = view(&[node("a", 8, &["1.0.0"]), node("b", 8, &["1.0.0"])]);
    v.nodes.get_mut("a").unwrap().launchers[0].machine_types = vec!["q35-2.0".into()];
    v.node_configs.insert(
        "b".into(),
        NodeConfig {
            unschedulable: true,
            drain_requested_at: None,
        },
    );
    v.vms.insert("x".into(), vm("x", "", None));
    let p = plan(&v);
    assert!(placements(&p).is_empty());
    let why = &p.status.unschedulable[0].reason;
    assert!(
        why.contains("machine type q35-1.0") && why.contains("cordoned"),
        "{why}"
    );
    v.node_configs.clear();
    assert_eq!(placements(&plan(&v)), vec![("x".into(), "b".into())]);
}

#[test]
fn an_evicted_vm_is_placed_again_only_as_its_run_strategy_says() {
    let mut v = view(&[node("a", 8, &["1.0.0"])]);
    for (n, rs) in [
        ("al", "Always"),
        ("re", "RerunOnFailure"),
        ("ma", "Manual"),
        ("ha", "Halted"),
    ] {
        let mut x = vm(n, &format!("runStrategy: {rs}\n"), None);
        x.message = Some("evicted by the drain of node b".into());
        v.vms.insert(n.into(), x);
    }
    v.vms
        .insert("new".into(), vm("new", "runStrategy: Manual\n", None));
    let mut placed: Vec<String> = placements(&plan(&v)).into_iter().map(|(n, _)| n).collect();
    placed.sort();
    assert_eq!(placed, vec!["al", "new", "re"]);
}

#[test]
fn drain_follows_each_eviction_strategy() {
    let mut v = view(&[
        node("a", 16, &["1.0.0"]),
        node("b", 16, &["1.0.0"]),
        node("c", 16, &["1.0.0"]),
    ]);
    let specs = [
        ("lm", "evictionStrategy: LiveMigrate\n"),
        ("lmip", "evictionStrategy: LiveMigrateIfPossible\n"),
        ("none", "evictionStrategy: None\n"),
        (
            "local",
            "evictionStrategy: LiveMigrate\ndisks:\n- name: d\n  path: /d.img\n",
        ),
        (
            "localnone",
            "evictionStrategy: None\ndisks:\n- name: d\n  path: /d.img\n",
        ),
    ];
    for (n, extra) in specs {
        v.vms.insert(n.into(), vm(n, extra, Some("a")));
        v.statuses.insert(n.into(), running("a", "1.0.0"));
    }
    drain(&mut v, "a");
    let p = plan(&v);
    let moved = migrations(&p);
    assert_eq!(moved.len(), 2, "{moved:?}");
    assert!(moved.iter().all(|(_, s, t)| s == "a" && t != "a"));
    let evicted: Vec<(String, Option<String>)> = p
        .decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Evict { vm, affinity, .. } => Some((vm.clone(), affinity.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        evicted,
        vec![
            ("localnone".to_string(), Some("a".to_string())),
            ("none".to_string(), None)
        ]
    );
    let blocked = &p.status.drain_blocked["a"];
    assert_eq!(blocked.len(), 1);
    assert_eq!(blocked[0].vm, "local");
    assert!(
        blocked[0].reason.contains("DisksNotLiveMigratable"),
        "{blocked:?}"
    );
}

#[test]
fn live_migrate_if_possible_is_evicted_when_no_node_fits_and_live_migrate_blocks() {
    let mut v = view(&[node("a", 16, &["1.0.0"]), node("b", 1, &["1.0.0"])]);
    v.vms.insert(
        "big1".into(),
        vm(
            "big1",
            "evictionStrategy: LiveMigrateIfPossible\nmemory: 2Gi\n",
            Some("a"),
        ),
    );
    v.vms.insert(
        "big2".into(),
        vm(
            "big2",
            "evictionStrategy: LiveMigrate\nmemory: 2Gi\n",
            Some("a"),
        ),
    );
    for n in ["big1", "big2"] {
        v.statuses.insert(n.into(), running("a", "1.0.0"));
    }
    drain(&mut v, "a");
    let p = plan(&v);
    assert!(migrations(&p).is_empty());
    assert!(p
        .decisions
        .iter()
        .any(|d| matches!(d, Decision::Evict { vm, .. } if vm == "big1")));
    let blocked = &p.status.drain_blocked["a"];
    assert_eq!(blocked[0].vm, "big2");
    assert!(
        blocked[0].reason.contains("not enough memory"),
        "{blocked:?}"
    );
}

#[test]
fn drains_respect_the_parallel_limits() {
    let mut v = view(&[
        node("a", 64, &["1.0.0"]),
        node("b", 64, &["1.0.0"]),
        node("c", 64, &["1.0.0"]),
    ]);
    for i in 0..6 {
        for src in ["a", "b"] {
            let n = format!("{src}{i}");
            v.vms.insert(
                n.clone(),
                vm(&n, "evictionStrategy: LiveMigrate\n", Some(src)),
            );
            v.statuses.insert(n, running(src, "1.0.0"));
        }
    }
    drain(&mut v, "a");
    drain(&mut v, "b");
    v.config
        .live_migration_config
        .parallel_migrations_per_cluster = 3;
    v.config
        .live_migration_config
        .parallel_outbound_migrations_per_node = 2;
    let moved = migrations(&plan(&v));
    assert_eq!(moved.len(), 3, "{moved:?}");
    for src in ["a", "b"] {
        assert!(moved.iter().filter(|(_, s, _)| s == src).count() <= 2);
    }
    // Two already in flight from a: only b may start, one more.
    v.migrations = (0..2)
        .map(|i| MigrationRecord {
            id: format!("1-{i}"),
            ..MigrationRecord::for_test(&format!("a{i}"), "a", "c", MigrationPhase::Running)
        })
        .collect();
    let moved = migrations(&plan(&v));
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0].1, "b");
}

#[test]
fn a_failed_drain_migration_backs_off() {
    let mut v = view(&[node("a", 8, &["1.0.0"]), node("b", 8, &["1.0.0"])]);
    v.vms.insert(
        "x".into(),
        vm("x", "evictionStrategy: LiveMigrate\n", Some("a")),
    );
    v.statuses.insert("x".into(), running("a", "1.0.0"));
    drain(&mut v, "a");
    v.migrations.push(MigrationRecord {
        id: "1-0".into(),
        vm: "x".into(),
        reason: MigrationReason::Drain,
        source: "a".into(),
        target: "b".into(),
        phase: MigrationPhase::Failed,
        listen: None,
        from_version: None,
        to_version: None,
        created_at: v.now - 1000,
        finished_at: Some(v.now - 1000),
        error: Some("boom".into()),
        report: None,
        handover: None,
    });
    let p = plan(&v);
    assert!(migrations(&p).is_empty());
    assert!(p.status.drain_blocked["a"][0]
        .reason
        .contains("retrying in"));
    v.now += RETRY_BASE_MS;
    assert_eq!(migrations(&plan(&v)).len(), 1);
}

#[test]
fn updates_go_canary_first_then_in_waves_and_pause_after_max_failures() {
    let mut v = view(&[
        node("a", 64, &["1.0.0", "2.0.0"]),
        node("b", 64, &["1.0.0", "2.0.0"]),
    ]);
    for i in 0..8 {
        let n = format!("v{i}");
        let at = if i % 2 == 0 { "a" } else { "b" };
        v.vms.insert(n.clone(), vm(&n, "", Some(at)));
        v.statuses.insert(n, running(at, "1.0.0"));
    }
    v.config.workload_update_strategy.batch_size = 3;
    v.config
        .live_migration_config
        .parallel_migrations_per_cluster = 5;
    v.config
        .live_migration_config
        .parallel_outbound_migrations_per_node = 2;
    let grants = |p: &Plan| -> Vec<(String, UpdateGrant)> {
        p.decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Grant { vm, grant } => Some((vm.clone(), grant.clone())),
                _ => None,
            })
            .collect()
    };
    // A node that has not installed 2.0.0 yet does not make the rollout look proven.
    v.nodes.insert("c".into(), node("c", 64, &["1.0.0"]));
    v.vms.insert("old".into(), vm("old", "", Some("c")));
    v.statuses.insert("old".into(), running("c", "1.0.0"));
    // Canary.
    let p = plan(&v);
    assert_eq!(p.status.outdated, 8);
    assert_eq!(p.status.target_version.as_deref(), Some("2.0.0"));
    let g = grants(&p);
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].1.wave, 0);
    // While the canary runs, nothing else.
    v.grants.insert(g[0].0.clone(), g[0].1.clone());
    v.previous = p.status.clone();
    assert!(grants(&plan(&v)).is_empty());
    // The canary succeeded: its grant is revoked and a wave of 3 (≤ 2 per node) starts.
    v.statuses.get_mut(&g[0].0).unwrap().launcher_version = Some("2.0.0".into());
    let p = plan(&v);
    assert!(p
        .decisions
        .contains(&Decision::Revoke { vm: g[0].0.clone() }));
    let g = grants(&p);
    assert_eq!(g.len(), 3, "{g:?}");
    assert!(g.iter().all(|(_, x)| x.wave == 1));
    for node in ["a", "b"] {
        assert!(g.iter().filter(|(_, x)| x.node == node).count() <= 2);
    }
    // Failures up to maxFailures pause the rollout, with the reason.
    v.grants.clear();
    v.previous = p.status.clone();
    v.config.workload_update_strategy.max_failures = 2;
    for i in 0..2 {
        v.migrations.push(MigrationRecord {
            id: format!("9-{i}"),
            vm: format!("v{}", i + 1),
            reason: MigrationReason::Update,
            source: "a".into(),
            target: "a".into(),
            phase: MigrationPhase::Failed,
            listen: None,
            from_version: Some("1.0.0".into()),
            to_version: Some("2.0.0".into()),
            created_at: v.now,
            finished_at: Some(v.now),
            error: Some("target launcher failed".into()),
            report: None,
            handover: None,
        });
    }
    let p = plan(&v);
    assert!(grants(&p).is_empty());
    assert!(
        p.status
            .update_paused
            .as_deref()
            .unwrap_or("")
            .contains("maxFailures"),
        "{:?}",
        p.status
    );
    // An empty method list disables updates.
    v.migrations.clear();
    v.config
        .workload_update_strategy
        .workload_update_methods
        .clear();
    assert!(grants(&plan(&v)).is_empty());
}

#[test]
fn a_vm_under_an_eviction_order_is_not_moved_again() {
    let mut v = view(&[node("a", 8, &["1.0.0"]), node("b", 8, &["1.0.0"])]);
    let mut x = vm("x", "evictionStrategy: None\n", Some("a"));
    x.evict = Some(EvictOrder {
        node: "a".into(),
        reason: "r".into(),
    });
    v.vms.insert("x".into(), x);
    v.statuses.insert("x".into(), running("a", "1.0.0"));
    drain(&mut v, "a");
    assert!(plan(&v).decisions.is_empty());
}

#[test]
fn a_scheduled_migration_to_a_node_that_is_gone_is_abandoned_and_the_vm_moves_elsewhere() {
    let mut v = view(&[node("a", 8, &["1.0.0"]), node("c", 8, &["1.0.0"])]);
    v.vms.insert(
        "x".into(),
        vm("x", "evictionStrategy: LiveMigrate\n", Some("a")),
    );
    v.statuses.insert("x".into(), running("a", "1.0.0"));
    drain(&mut v, "a");
    let rec = |phase| MigrationRecord::for_test("x", "a", "b", phase);
    v.migrations.push(rec(MigrationPhase::Scheduled));
    let p = plan(&v);
    assert!(p.decisions.contains(&Decision::Abandon {
        vm: "x".into(),
        id: "1-0".into(),
        reason: "node b is not ready before it started".into()
    }));
    assert_eq!(migrations(&p), vec![("x".into(), "a".into(), "c".into())]);
    // Once the source sends (TargetReady and later), only it decides the outcome.
    v.migrations = vec![rec(MigrationPhase::TargetReady)];
    let p = plan(&v);
    assert!(!p
        .decisions
        .iter()
        .any(|d| matches!(d, Decision::Abandon { .. })));
    assert!(migrations(&p).is_empty());
}

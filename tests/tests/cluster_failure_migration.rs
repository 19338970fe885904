//! A node dies in the middle of a cross-node migration (issue 12, test 5): the source
//! or the target node is killed (links down, noded and launchers killed) during
//! pre-copy or right after the handover (`Go`: the VM runs on the target), and in every
//! trial the VM runs exactly once afterwards. The live node decides from etcd's records
//! (docs/cluster.md, "Migrations cut by a failure"); a [`RunWatch`] follows every copy.
//!
//! Each trial prints one `FAULT-RESULT` line (scripts/fault-cluster, docs/fault-matrix.md).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use integration_tests::cluster::{logs, require_cluster_tools, Fabric};
use integration_tests::node::{kill_processes_mentioning, processes_mentioning};
use integration_tests::run_watch::RunWatch;
use integration_tests::{bin, guests};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Source,
    Target,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    /// Memory is being copied (the guest still runs on the source).
    PreCopy,
    /// The target runs the VM (the source sent `Go`).
    AfterGo,
}

/// One trial: VM `mv` on n1, drained to n2 (n3 cordoned until the kill); `victim` is
/// killed at `when`. Returns the node the VM runs on at the end.
fn trial(subnet: u8, victim: Victim, when: When) {
    require_cluster_tools();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tag = format!("m{subnet}");
    let mut f = Fabric::new(&tag, subnet, 3);
    let launcher = bin("launcher");
    let mut all = vec![
        f.node("n1", 1, "1Gi", &launcher),
        f.node("n2", 2, "1Gi", &launcher),
        f.node("n3", 3, "1Gi", &launcher),
    ];
    let n1 = &all[0];
    // For a kill during pre-copy, a guest that dirties 8 MiB as fast as it can, sent at
    // 1 MiB/s: pre-copy cannot converge and lasts until the completion timeout; for a
    // kill after Go, one that converges at once. A quick grace in both.
    let (mib, bandwidth) = match when {
        When::PreCopy => (8, 1 << 20),
        When::AfterGo => (2, 16 << 20),
    };
    let cfg = n1.node.file(
        "cluster.yaml",
        &format!("nodeFailure:\n  gracePeriod: 5\nliveMigrationConfig:\n  bandwidthPerMigration: {bandwidth}\n  progressTimeout: 10\n"),
    );
    n1.node.ctl(&["cluster", "config", "set", "-f", &cfg]);
    n1.node.ctl(&["node", "cordon", "n2"]);
    n1.node.ctl(&["node", "cordon", "n3"]);
    let spec = format!(
        "name: mv\nkernel: {}\ncmdline: mib={mib} every=10\nmemory: 64Mi\nevictionStrategy: LiveMigrate\n",
        guests::pattern_path().display()
    );
    let file = n1.node.file("mv.yaml", &spec);
    n1.node.ctl(&["vm", "create", "-f", &file]);
    n1.node.wait_until("mv placed on n1", || {
        n1.node.try_ctl(&["vm", "get", "mv"]).ok()
    });
    n1.node.wait_vm("mv", "Running", None);
    n1.node.wait_pass_above("mv", 20);
    // The leader decides on the cluster's view, which the agent updates a moment after
    // noded's: a drain before it says Running would evict the VM instead of moving it.
    n1.wait_cluster("mv running on n1 in the cluster's view", |vms| {
        vms.iter()
            .any(|v| v["name"] == "mv" && v["phase"] == "Running" && v["node"] == "n1")
    });
    let nodes: Vec<(String, PathBuf)> = all
        .iter()
        .map(|n| (n.name.clone(), n.node.state()))
        .collect();
    let w = RunWatch::start("mv", &nodes);
    n1.node.ctl(&["node", "uncordon", "n2"]);
    n1.node.ctl(&["node", "drain", "n1"]);
    let n2 = &all[1];
    // Wait for the moment.
    let deadline = Instant::now() + integration_tests::SAFETY;
    loop {
        let hit = match when {
            When::PreCopy => n2.try_migrations().iter().any(|r| r["phase"] == "Running"),
            When::AfterGo => n2
                .node
                .try_ctl(&["vm", "get", "mv"])
                .is_ok_and(|v| v["phase"] == "Running"),
        };
        if hit {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the migration never reached {when:?}: {:?}\n{}",
            n2.try_migrations(),
            logs(&all)
        );
        std::thread::sleep(Duration::from_millis(if when == When::AfterGo {
            5
        } else {
            100
        }));
    }
    if when == When::PreCopy {
        std::thread::sleep(Duration::from_millis(300)); // data moving
    }
    let (vi, survivor) = match victim {
        Victim::Source => (0usize, 1usize),
        Victim::Target => (1, 0),
    };
    let phase_at_kill = all[survivor]
        .try_migrations()
        .last()
        .map(|r| r["phase"].clone())
        .unwrap_or_default();
    if when == When::PreCopy {
        assert_eq!(
            phase_at_kill,
            "Running",
            "the kill must hit pre-copy: {:?}",
            all[survivor].try_migrations()
        );
    }
    f.set_link(vi as u8 + 1, false);
    all[vi].node.kill_daemon();
    kill_processes_mentioning(&all[vi].node.state().display().to_string());
    let dead = all[vi].name.clone();
    let live = &all[survivor];
    live.node.ctl(&["node", "uncordon", "n3"]);
    // The VM runs on a live node, exactly once, and its migration record is over.
    let deadline = Instant::now() + integration_tests::SAFETY;
    let at = loop {
        // Records first, then the row (at least as new), then the node's own word.
        let over = live
            .try_migrations()
            .iter()
            .all(|m| m["phase"] == "Succeeded" || m["phase"] == "Failed");
        let r = live.try_cluster_vm("mv");
        if let Some(v) = &r {
            let node = v["node"].as_str().unwrap_or_default().to_string();
            let local_running = all
                .iter()
                .find(|n| n.name == node && n.name != dead)
                .and_then(|n| n.node.try_ctl(&["vm", "get", "mv"]).ok())
                .is_some_and(|l| l["phase"] == "Running");
            if v["phase"] == "Running" && over && local_running {
                break node;
            }
        }
        assert!(
            Instant::now() < deadline,
            "mv never settled on a live node: {r:?} {:?}\n{}",
            live.try_migrations(),
            logs(&all)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // It keeps running there (new passes; a restarted guest counts from 0 again).
    let runner = all.iter().find(|n| n.name == at).expect("node");
    let passes = || runner.node.console("mv").matches("pass=").count();
    let before = passes();
    runner.node.wait_until("mv makes progress", || {
        (passes() > before + 2).then_some(())
    });
    let report = w.finish();
    assert!(
        report.double_runs.is_empty(),
        "mv ran twice: {:?}\n{}",
        report.double_runs,
        logs(&all)
    );
    let procs: Vec<i32> = all
        .iter()
        .flat_map(|n| processes_mentioning(&n.node.state().join("vms/mv/").display().to_string()))
        .collect();
    assert_eq!(
        procs.len(),
        1,
        "one launcher runs mv: {procs:?}\n{}",
        logs(&all)
    );
    let outcome = live
        .try_migrations()
        .last()
        .map(|r| format!("{}", r["phase"]))
        .unwrap_or_default();
    println!(
        "FAULT-RESULT case=migration-{}-{} vms=1 restarted={} double_runs=0 longest_down_ms={} phase_at_kill={phase_at_kill} record={outcome} runs_on={at}",
        match victim {
            Victim::Source => "kill-source",
            Victim::Target => "kill-target",
        },
        match when {
            When::PreCopy => "precopy",
            When::AfterGo => "aftergo",
        },
        usize::from(report.boots > 0),
        report.longest_down.as_millis(),
    );
    all.clear();
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn source_killed_during_precopy() {
    trial(41, Victim::Source, When::PreCopy);
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn target_killed_during_precopy() {
    trial(42, Victim::Target, When::PreCopy);
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn source_killed_after_go() {
    trial(43, Victim::Source, When::AfterGo);
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn target_killed_after_go() {
    trial(44, Victim::Target, When::AfterGo);
}

//! Node failure end to end (issue 12, docs/cluster.md "Node failure"): a real 3-member
//! etcd cluster and three noded hosts in network namespaces; VMs on node n1; then n1 is
//! killed, cut off, or frozen. A [`RunWatch`] follows every copy of each guest on every
//! node (through their consoles) and reports any two copies running at once.
//!
//! Each test prints one `FAULT-RESULT` line; `scripts/fault-cluster` runs the tests in a
//! loop and tabulates those lines (docs/fault-matrix.md).
//!
//! The scenarios share the machine's two cores, so they run one at a time.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use integration_tests::cluster::{etcd_available, ClusterNode, Fabric};
use integration_tests::netns::require_ip;
use integration_tests::node::{boots, kill_processes_mentioning, processes_mentioning};
use integration_tests::run_watch::{RunReport, RunWatch};
use integration_tests::{bin, guests};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The grace period these tests configure (docs/cluster.md: it must exceed the launcher
/// watchdog's 5 s minus the 3 s check margin; 5 s keeps the tests short).
const GRACE_S: u64 = 5;

fn require_tools() {
    require_ip();
    assert!(
        etcd_available(),
        "the cluster tests need etcd (etcd-server); .ci/run installs it"
    );
}

fn spec(name: &str, extra: &str) -> String {
    format!(
        "name: {name}\nkernel: {}\ncmdline: mib=2 every=10\nmemory: 64Mi\n{extra}",
        guests::pattern_path().display()
    )
}

/// Three nodes; `always`, `rerun` (RerunOnFailure) and `manual` (Manual, started) run on
/// n1. Returns the nodes.
fn setup(f: &mut Fabric) -> Vec<ClusterNode> {
    let launcher = bin("launcher");
    let all = vec![
        f.node("n1", 1, "1Gi", &launcher),
        f.node("n2", 2, "1Gi", &launcher),
        f.node("n3", 3, "1Gi", &launcher),
    ];
    let n1 = &all[0];
    let cfg = n1.node.file(
        "cluster.yaml",
        &format!("nodeFailure:\n  gracePeriod: {GRACE_S}\n"),
    );
    n1.node.ctl(&["cluster", "config", "set", "-f", &cfg]);
    n1.node.ctl(&["node", "cordon", "n2"]);
    n1.node.ctl(&["node", "cordon", "n3"]);
    // `always` has a disk on shared storage: its lock (an OFD lock of the launcher) goes
    // with the fenced launcher, so the copy started elsewhere can take it.
    let disk = n1.node.dir.join("shared.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let shared = format!(
        "disks:\n- name: data\n  path: {}\n  shared: true\n",
        disk.display()
    );
    for (vm, rs) in [
        ("always", "Always"),
        ("rerun", "RerunOnFailure"),
        ("manual", "Manual"),
    ] {
        let extra = format!(
            "runStrategy: {rs}\n{}",
            if vm == "always" { shared.as_str() } else { "" }
        );
        let f = n1.node.file(&format!("{vm}.yaml"), &spec(vm, &extra));
        n1.node.ctl(&["vm", "create", "-f", &f]);
    }
    for vm in ["always", "rerun", "manual"] {
        n1.node.wait_until(&format!("{vm} on n1"), || {
            n1.node.try_ctl(&["vm", "get", vm]).ok()
        });
    }
    n1.node.ctl(&["vm", "start", "manual"]);
    for vm in ["always", "rerun", "manual"] {
        n1.node.wait_vm(vm, "Running", None);
        n1.node.wait_pass_above(vm, 20);
    }
    n1.node.ctl(&["node", "uncordon", "n2"]);
    n1.node.ctl(&["node", "uncordon", "n3"]);
    all
}

fn watch(all: &[ClusterNode], vm: &str) -> RunWatch {
    let nodes: Vec<(String, PathBuf)> = all
        .iter()
        .map(|n| (n.name.clone(), n.node.state()))
        .collect();
    RunWatch::start(vm, &nodes)
}

fn logs(all: &[ClusterNode]) -> String {
    all.iter()
        .map(|x| {
            format!(
                "--- {}:\n{}\n{}",
                x.name,
                x.log_tail(60),
                x.launcher_logs(8)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The cluster's row of `vm`, read through node `n`.
fn row(n: &ClusterNode, vm: &str) -> Option<Value> {
    n.node
        .try_ctl(&["cluster", "vms"])
        .ok()?
        .as_array()?
        .iter()
        .find(|v| v["name"] == vm)
        .cloned()
}

/// Waits until `vm` runs on a node other than n1, through node `via`; returns the node.
fn runs_elsewhere(via: &ClusterNode, all: &[ClusterNode], vm: &str) -> String {
    let deadline = Instant::now() + integration_tests::SAFETY;
    loop {
        if let Some(v) = row(via, vm) {
            if v["phase"] == "Running" && v["node"].is_string() && v["node"] != "n1" {
                return v["node"].as_str().unwrap_or("").to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{vm} never ran elsewhere: {:?}\n{}",
            row(via, vm),
            logs(all)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The checks every failure test ends with, and its `FAULT-RESULT` line.
fn conclude(case: &str, all: &[ClusterNode], via: &ClusterNode, reports: &[(&str, RunReport)]) {
    let mut restarted = 0;
    let mut longest = 0u128;
    for (vm, r) in reports {
        assert!(
            r.double_runs.is_empty(),
            "{vm} ran twice: {:?}\n{}",
            r.double_runs,
            logs(all)
        );
        if *vm != "manual" {
            restarted += usize::from(r.boots > 0);
            longest = longest.max(r.longest_down.as_millis());
        }
    }
    // Manual stays stopped, with the reason.
    let m = row(via, "manual").expect("manual is still a cluster VM");
    assert!(m["node"].is_null(), "{m}");
    let why = m["message"].as_str().unwrap_or_default().to_string();
    assert!(
        why.contains("failed") && why.contains("Manual") || why.contains("fence"),
        "{m}"
    );
    println!(
        "FAULT-RESULT case={case} vms=3 restarted={restarted} double_runs=0 longest_down_ms={longest}"
    );
}

/// Every copy of `vm` on any node: exactly one launcher runs it.
fn one_launcher(all: &[ClusterNode], vm: &str) {
    let procs: Vec<i32> = all
        .iter()
        .flat_map(|n| {
            processes_mentioning(&n.node.state().join("vms").join(vm).display().to_string())
        })
        .collect();
    assert_eq!(procs.len(), 1, "{vm}: launchers {procs:?}\n{}", logs(all));
}

/// Node n1 comes back and reconciles: nothing it ran is started again there.
fn rejoined_cleanly(all: &[ClusterNode]) {
    let n1 = &all[0];
    n1.node.wait_until("n1 Ready again", || {
        let list = n1.node.try_ctl(&["node", "list"]).ok()?;
        list.as_array()?
            .iter()
            .any(|n| n["name"] == "n1" && n["status"] == "Ready")
            .then_some(())
    });
    n1.node.wait_until("n1's fenced VMs cleaned up", || {
        let vms = n1.node.try_ctl(&["vm", "list"]).ok()?;
        vms.as_array()?
            .iter()
            .all(|v| v["phase"] != "Running" && v["phase"] != "Fenced")
            .then_some(())
    });
    let st = n1.node.ctl(&["status"]);
    assert!(st["cluster"]["fenced"].is_null(), "{st}");
    for vm in ["always", "rerun"] {
        one_launcher(all, vm);
    }
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn a_killed_node_s_vms_run_elsewhere_exactly_once() {
    require_tools();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fabric::new("fk", 31, 3);
    let mut all = setup(&mut f);
    let watches: Vec<(&str, RunWatch)> = ["always", "rerun", "manual"]
        .into_iter()
        .map(|vm| (vm, watch(&all, vm)))
        .collect();
    // The node dies: links down, noded and every launcher killed.
    f.set_link(1, false);
    all[0].node.kill_daemon();
    kill_processes_mentioning(&all[0].node.state().display().to_string());
    for vm in ["always", "rerun"] {
        runs_elsewhere(&all[1], &all, vm);
    }
    for vm in ["always", "rerun"] {
        let n = row(&all[1], vm).expect("row")["node"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let node = all.iter().find(|x| x.name == n).expect("node");
        node.node.wait_pass_above(vm, 20);
        assert_eq!(boots(&node.node.console(vm)), 1, "{vm} started once there");
    }
    // n1 comes back (a new noded on its state): its lease expired, so it fences what it
    // had and hands it back; nothing starts twice.
    f.set_link(1, true);
    all[0].node.spawn_daemon();
    rejoined_cleanly(&all);
    let reports: Vec<(&str, RunReport)> =
        watches.into_iter().map(|(v, w)| (v, w.finish())).collect();
    conclude("kill-node", &all, &all[1], &reports);
    all.clear();
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn a_cut_off_node_fences_itself_before_its_vms_run_elsewhere() {
    require_tools();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fabric::new("fp", 32, 3);
    let mut all = setup(&mut f);
    let watches: Vec<(&str, RunWatch)> = ["always", "rerun", "manual"]
        .into_iter()
        .map(|vm| (vm, watch(&all, vm)))
        .collect();
    // n1 loses its network: it reaches neither etcd nor its peers, and keeps running.
    f.set_link(1, false);
    all[0].node.wait_until("n1 fences itself", || {
        all[0].node.log().contains("FENCING").then_some(())
    });
    // Its launchers are gone before anything runs elsewhere (the watches check the
    // order; here, the fence itself).
    for vm in ["always", "rerun", "manual"] {
        all[0]
            .node
            .wait_until(&format!("{vm}'s launcher killed on n1"), || {
                processes_mentioning(
                    &all[0]
                        .node
                        .state()
                        .join("vms")
                        .join(vm)
                        .display()
                        .to_string(),
                )
                .is_empty()
                .then_some(())
            });
    }
    for vm in ["always", "rerun"] {
        runs_elsewhere(&all[1], &all, vm);
    }
    // Healed: n1 rejoins, hands back nothing twice.
    f.set_link(1, true);
    rejoined_cleanly(&all);
    let reports: Vec<(&str, RunReport)> =
        watches.into_iter().map(|(v, w)| (v, w.finish())).collect();
    conclude("partition", &all, &all[1], &reports);
    all.clear();
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn a_frozen_noded_s_launchers_fence_themselves() {
    require_tools();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fabric::new("fs", 33, 3);
    let mut all = setup(&mut f);
    let watches: Vec<(&str, RunWatch)> = ["always", "rerun", "manual"]
        .into_iter()
        .map(|vm| (vm, watch(&all, vm)))
        .collect();
    let pid = all[0].node.daemon_pid().expect("noded runs") as i32;
    // SAFETY: kill(2) with SIGSTOP on the noded this test started.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    for vm in ["always", "rerun"] {
        runs_elsewhere(&all[1], &all, vm);
    }
    // The launchers on n1 killed themselves (their watchdog went unfed).
    for vm in ["always", "rerun", "manual"] {
        assert!(
            processes_mentioning(
                &all[0]
                    .node
                    .state()
                    .join("vms")
                    .join(vm)
                    .display()
                    .to_string()
            )
            .is_empty(),
            "{vm}'s launcher still runs on the frozen node"
        );
    }
    // SAFETY: as above, SIGCONT.
    unsafe {
        libc::kill(pid, libc::SIGCONT);
    }
    rejoined_cleanly(&all);
    let reports: Vec<(&str, RunReport)> =
        watches.into_iter().map(|(v, w)| (v, w.finish())).collect();
    conclude("sigstop", &all, &all[1], &reports);
    all.clear();
}

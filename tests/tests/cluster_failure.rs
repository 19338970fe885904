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

use integration_tests::cluster::{logs, require_cluster_tools, ClusterNode, Fabric};
use integration_tests::node::{boots, kill_processes_mentioning, processes_mentioning};
use integration_tests::run_watch::RunWatch;
use integration_tests::{bin, guests};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The grace period these tests configure (docs/cluster.md: it must exceed the launcher
/// watchdog's 5 s minus the 3 s check margin; 5 s keeps the tests short).
const GRACE_S: u64 = 5;

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

/// One watch per VM of [`setup`], over every node.
fn watch_all(all: &[ClusterNode]) -> Vec<(&'static str, RunWatch)> {
    let nodes: Vec<(String, PathBuf)> = all
        .iter()
        .map(|n| (n.name.clone(), n.node.state()))
        .collect();
    ["always", "rerun", "manual"]
        .into_iter()
        .map(|vm| (vm, RunWatch::start(vm, &nodes)))
        .collect()
}

/// Waits until `vm` runs on a node other than n1, through node `via`; returns the node.
fn runs_elsewhere(via: &ClusterNode, all: &[ClusterNode], vm: &str) -> String {
    let deadline = Instant::now() + integration_tests::SAFETY;
    loop {
        if let Some(v) = via.try_cluster_vm(vm) {
            if v["phase"] == "Running" && v["node"].is_string() && v["node"] != "n1" {
                return v["node"].as_str().unwrap_or("").to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{vm} never ran elsewhere: {:?}\n{}",
            via.try_cluster_vm(vm),
            logs(all)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The checks every failure test ends with, and its `FAULT-RESULT` line: no double run;
/// `always` and `rerun` booted again elsewhere; `manual` stopped, with the reason, and
/// run by no launcher anywhere.
fn conclude(case: &str, all: &[ClusterNode], via: &ClusterNode, watches: Vec<(&str, RunWatch)>) {
    let mut longest = 0u128;
    for (vm, w) in watches {
        let r = w.finish();
        assert!(
            r.double_runs.is_empty(),
            "{vm} ran twice: {:?}\n{}",
            r.double_runs,
            logs(all)
        );
        if vm == "manual" {
            assert_eq!(r.boots, 0, "manual was started again\n{}", logs(all));
        } else {
            assert!(r.boots > 0, "{vm} was not restarted: {r:?}\n{}", logs(all));
            longest = longest.max(r.longest_down.as_millis());
        }
    }
    let m = via
        .try_cluster_vm("manual")
        .expect("manual is still a cluster VM");
    assert!(m["node"].is_null(), "{m}");
    let why = m["message"].as_str().unwrap_or_default();
    assert!(
        why.contains("failed") && why.contains("runStrategy Manual"),
        "{m}"
    );
    let procs: Vec<i32> = all
        .iter()
        .flat_map(|n| {
            processes_mentioning(&n.node.state().join("vms/manual/").display().to_string())
        })
        .collect();
    assert!(procs.is_empty(), "manual runs: {procs:?}");
    let restarted = 2;
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
    require_cluster_tools();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fabric::new("fk", 31, 3);
    let mut all = setup(&mut f);
    let watches = watch_all(&all);
    // The node dies: links down, noded and every launcher killed.
    f.set_link(1, false);
    all[0].node.kill_daemon();
    kill_processes_mentioning(&all[0].node.state().display().to_string());
    for vm in ["always", "rerun"] {
        runs_elsewhere(&all[1], &all, vm);
    }
    for vm in ["always", "rerun"] {
        let n = all[1].try_cluster_vm(vm).expect("row")["node"]
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
    conclude("kill-node", &all, &all[1], watches);
    all.clear();
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn a_cut_off_node_fences_itself_before_its_vms_run_elsewhere() {
    require_cluster_tools();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fabric::new("fp", 32, 3);
    let mut all = setup(&mut f);
    let watches = watch_all(&all);
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
    conclude("partition", &all, &all[1], watches);
    all.clear();
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn a_frozen_noded_s_launchers_fence_themselves() {
    require_cluster_tools();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fabric::new("fs", 33, 3);
    let mut all = setup(&mut f);
    let watches = watch_all(&all);
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
    conclude("sigstop", &all, &all[1], watches);
    all.clear();
}

//! The cluster layer end to end: a real 3-member etcd cluster and noded "hosts" in network
//! namespaces (tests/src/cluster.rs), driven only through `nodectl`, with `pattern` guests
//! that check their own memory (a stale page prints `STALE`; a reboot prints a second
//! banner).
//!
//! The scenarios share the machine's two cores, so they run one at a time.

use std::process::Command;
use std::sync::Mutex;

use integration_tests::cluster::{logs, require_cluster_tools, ClusterNode, Fabric};
use integration_tests::node::{boots, last_pass};
use integration_tests::run_watch::RunWatch;
use integration_tests::{bin, guests};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn spec(name: &str, extra: &str) -> String {
    format!(
        "name: {name}\nkernel: {}\ncmdline: mib=2 every=50\nmemory: 64Mi\n{extra}",
        guests::pattern_path().display()
    )
}

fn create(n: &ClusterNode, name: &str, extra: &str) -> Value {
    let f = n.node.file(&format!("{name}.yaml"), &spec(name, extra));
    n.node.ctl(&["vm", "create", "-f", &f])
}

/// `nodectl ARGS` in table mode: (success, stdout + stderr).
fn ctl_text(n: &ClusterNode, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("nodectl"))
        .arg("--socket")
        .arg(n.node.socket())
        .args(args)
        .output()
        .expect("run nodectl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The node a VM runs on, once the cluster says it runs; on the safety deadline, the
/// logs of `all` nodes.
fn running_on_any(all: &[&ClusterNode], vm: &str) -> String {
    let n = all[0];
    let deadline = std::time::Instant::now() + integration_tests::SAFETY;
    loop {
        let vms = n.node.try_ctl(&["cluster", "vms"]).unwrap_or_default();
        let found = vms.as_array().and_then(|a| {
            a.iter()
                .find(|v| v["name"] == vm && v["phase"] == "Running" && v["node"].is_string())
        });
        if let Some(v) = found {
            return v["node"].as_str().unwrap_or("").to_string();
        }
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = all
                .iter()
                .map(|x| format!("--- {}:\n{}", x.name, x.log_tail(60)))
                .collect();
            panic!("{vm} never runs: {vms:#}\n{}", logs.join("\n"));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn running_on(n: &ClusterNode, vm: &str) -> String {
    running_on_any(&[n], vm)
}

fn node_by_name<'a>(nodes: &'a [&'a ClusterNode], name: &str) -> &'a ClusterNode {
    nodes.iter().find(|n| n.name == name).expect("node")
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn placement_puts_vms_on_nodes_with_capacity() {
    require_cluster_tools();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fabric::new("pl", 21, 3);
    let launcher = integration_tests::bin("launcher");
    // Room for two 64 MiB VMs each.
    let n1 = f.node("n1", 1, "150Mi", &launcher);
    let n2 = f.node("n2", 2, "150Mi", &launcher);
    // Both nodes are in the node list (Fabric::node waits for each), both Ready.
    let list = n1.node.ctl(&["node", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    // All five are created through n1; four fit, two per node.
    for i in 1..=5 {
        create(&n1, &format!("v{i}"), "");
    }
    let mut per_node = std::collections::BTreeMap::<String, Vec<String>>::new();
    for i in 1..=4 {
        let vm = format!("v{i}");
        let _ = running_on(&n1, &vm);
    }
    let vms = n1.cluster_vms();
    for v in &vms {
        if let Some(node) = v["node"].as_str() {
            per_node
                .entry(node.to_string())
                .or_default()
                .push(v["name"].as_str().unwrap_or("").to_string());
        }
    }
    assert_eq!(per_node.len(), 2, "{vms:?}");
    assert!(per_node.values().all(|v| v.len() == 2), "{per_node:?}");
    let pending: Vec<&Value> = vms.iter().filter(|v| v["node"].is_null()).collect();
    assert_eq!(pending.len(), 1, "{vms:?}");
    let st = n2.node.ctl(&["cluster", "status"]);
    let why = serde_json::to_string(&st["controller"]["unschedulable"]).unwrap_or_default();
    assert!(why.contains("not enough memory"), "{st}");
    // Each node runs its VMs itself: its local list has them, and the guests run.
    let both = [&n1, &n2];
    for (node, names) in &per_node {
        let n = node_by_name(&both, node);
        for vm in names {
            let v = n.node.wait_vm(vm, "Running", None);
            assert_eq!(v["name"], vm.as_str());
            n.node.wait_pass_above(vm, 50);
        }
    }
    // A third node joins: the pending VM lands there.
    let n3 = f.node("n3", 3, "150Mi", &launcher);
    let pend = pending[0]["name"].as_str().unwrap_or("").to_string();
    assert_eq!(running_on(&n1, &pend), "n3");
    n3.node.wait_pass_above(&pend, 50);
    // Deleting through any node removes it from its node.
    n2.node.ctl(&["vm", "delete", &pend]);
    n1.wait_cluster("deleted", |vms| {
        !vms.iter().any(|v| v["name"] == pend.as_str())
    });
    n3.node.wait_until("local VM gone", || {
        n3.node
            .try_ctl(&["vm", "list"])
            .ok()
            .filter(|v| v.as_array().is_some_and(|a| a.is_empty()))
    });
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn drain_moves_vms_as_their_eviction_strategy_says() {
    require_cluster_tools();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fabric::new("dr", 22, 3);
    let launcher = integration_tests::bin("launcher");
    let n1 = f.node("n1", 1, "1Gi", &launcher);
    let n2 = f.node("n2", 2, "1Gi", &launcher);
    let n3 = f.node("n3", 3, "1Gi", &launcher);
    let nodes = [&n1, &n2, &n3];
    // Everything lands on n1 while the others are cordoned.
    for n in ["n2", "n3"] {
        n1.node.ctl(&["node", "cordon", n]);
    }
    let disk = n1.node.dir.join("local.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    create(&n1, "lm", "evictionStrategy: LiveMigrate\n");
    create(&n1, "lmip", "evictionStrategy: LiveMigrateIfPossible\n");
    create(&n1, "none", "evictionStrategy: None\nrunStrategy: Always\n");
    create(
        &n1,
        "local",
        &format!(
            "evictionStrategy: LiveMigrate\ndisks:\n- name: data\n  path: {}\n",
            disk.display()
        ),
    );
    for vm in ["lm", "lmip", "none", "local"] {
        assert_eq!(running_on(&n1, vm), "n1");
        n1.node.wait_pass_above(vm, 100);
    }
    for n in ["n2", "n3"] {
        n1.node.ctl(&["node", "uncordon", n]);
    }
    // Drain through another node's nodectl, following it to its end.
    let (ok, out) = ctl_text(&n2, &["node", "drain", "n1", "--wait"]);
    assert!(
        !ok && out.contains("blocked: local"),
        "a VM with a host-local disk must block the drain:\n{out}\n{}",
        logs(nodes)
    );
    assert!(out.contains("lm: live-migrated to"), "{out}");
    assert!(
        out.contains("lmip: live-migrated to"),
        "{out}\n{}",
        logs(nodes)
    );
    assert!(out.contains("none: stopped"), "{out}");
    assert!(
        out.contains("blocked: local") && out.contains("DisksNotLiveMigratable"),
        "{out}"
    );
    assert!(out.contains("2 live-migrated, 1 stopped"), "{out}");
    // The migrated guests continue where they were: no new boot, no stale page.
    for vm in ["lm", "lmip"] {
        let at = running_on(&n1, vm);
        assert_ne!(at, "n1");
        let n = node_by_name(&nodes, &at);
        let before = last_pass(&n.node.console(vm)).unwrap_or(0);
        n.node.wait_pass_above(vm, before);
        let console = n.node.console(vm);
        assert_eq!(boots(&console), 0, "{vm} rebooted on {at}:\n{console}");
        assert!(!console.contains("STALE"), "{console}");
    }
    // evictionStrategy None under runStrategy Always: stopped, then started elsewhere.
    let at = running_on_any(&nodes, "none");
    assert_ne!(at, "n1");
    let n = node_by_name(&nodes, &at);
    n.node.wait_pass_above("none", 50);
    assert_eq!(boots(&n.node.console("none")), 1);
    // The blocked VM still runs on n1; the node stays cordoned until uncordoned, which
    // cancels the drain.
    assert_eq!(running_on(&n1, "local"), "n1");
    let node = n1.node.ctl(&["node", "get", "n1"]);
    assert_eq!(node["draining"], true, "{node}");
    n1.node.ctl(&["node", "uncordon", "n1"]);
    let node = n1.node.ctl(&["node", "get", "n1"]);
    assert_eq!(node["draining"], false, "{node}");
    assert_eq!(node["schedulable"], true, "{node}");
    n1.node
        .wait_pass_above("local", last_pass(&n1.node.console("local")).unwrap_or(0));
    // Records: two drain migrations succeeded, with the launcher's report.
    let recs = n3.node.ctl(&["cluster", "migrations"]);
    let ok: Vec<&Value> = recs
        .as_array()
        .map(|a| a.iter().filter(|r| r["phase"] == "Succeeded").collect())
        .unwrap_or_default();
    assert_eq!(ok.len(), 2, "{recs:#}");
    assert!(ok.iter().all(|r| r["report"].is_object()), "{recs:#}");
}

fn leader(n: &ClusterNode) -> Option<String> {
    let st = n.node.try_ctl(&["cluster", "status"]).ok()?;
    st["controller"]["leader"].as_str().map(str::to_string)
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn a_new_leader_finishes_the_drain_when_the_leader_dies() {
    require_cluster_tools();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fabric::new("lf", 23, 3);
    let launcher = integration_tests::bin("launcher");
    let mut all = vec![
        f.node("n1", 1, "1Gi", &launcher),
        f.node("n2", 2, "1Gi", &launcher),
        f.node("n3", 3, "1Gi", &launcher),
    ];
    let first = all[0].node.wait_until("a leader", || leader(&all[0]));
    let li = all
        .iter()
        .position(|n| n.name == first)
        .expect("leader node");
    let (si, ti) = match li {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let (l, s, t) = (
        all[li].name.clone(),
        all[si].name.clone(),
        all[ti].name.clone(),
    );
    // Three VMs on the source; the leader's node is never a target.
    all[ti].node.ctl(&["node", "cordon", &l]);
    all[ti].node.ctl(&["node", "cordon", &t]);
    for vm in ["m1", "m2", "m3"] {
        create(&all[si], vm, "evictionStrategy: LiveMigrate\n");
    }
    for vm in ["m1", "m2", "m3"] {
        assert_eq!(running_on(&all[ti], vm), s);
        all[si].node.wait_pass_above(vm, 50);
    }
    let cfg = all[ti].node.file(
        "cluster.yaml",
        "liveMigrationConfig:\n  parallelMigrationsPerCluster: 1\n",
    );
    all[ti].node.ctl(&["cluster", "config", "set", "-f", &cfg]);
    all[ti].node.ctl(&["node", "uncordon", &t]);
    all[ti].node.ctl(&["node", "drain", &s]);
    // Once the first move is under way, the leader's noded dies.
    all[ti].node.wait_until("a drain migration", || {
        let recs = all[ti].node.try_ctl(&["cluster", "migrations"]).ok()?;
        (!recs.as_array()?.is_empty()).then_some(())
    });
    all[li].node.kill_daemon();
    let (ok, out) = ctl_text(&all[ti], &["node", "drain", &s, "--wait"]);
    let refs: Vec<&ClusterNode> = all.iter().collect();
    assert!(
        ok,
        "the drain must finish under the new leader:\n{out}\n{}",
        logs(refs.iter().copied())
    );
    for vm in ["m1", "m2", "m3"] {
        assert_eq!(running_on(&all[ti], vm), t);
        let n = &all[ti].node;
        let before = last_pass(&n.console(vm)).unwrap_or(0);
        n.wait_pass_above(vm, before);
        assert_eq!(
            boots(&n.console(vm)),
            0,
            "{vm} rebooted\n{}",
            logs(refs.iter().copied())
        );
    }
    let now = leader(&all[ti]).expect("leader");
    assert_ne!(now, l, "a live node leads now");
    // No two migrations overlapped (parallelMigrationsPerCluster 1), across the failover.
    let recs = all[ti].node.ctl(&["cluster", "migrations"]);
    let mut spans: Vec<(u64, u64)> = recs
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["phase"] == "Succeeded")
        .map(|r| {
            (
                r["createdAt"].as_u64().unwrap_or(0),
                r["finishedAt"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    spans.sort();
    assert_eq!(spans.len(), 3, "{recs:#}");
    for w in spans.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "two migrations in flight at once: {recs:#}"
        );
    }
    all.clear();
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn losing_etcd_quorum_stops_decisions_but_no_vm() {
    require_cluster_tools();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fabric::new("eq", 24, 3);
    let launcher = integration_tests::bin("launcher");
    let n1 = f.node("n1", 1, "1Gi", &launcher);
    let n2 = f.node("n2", 2, "1Gi", &launcher);
    let nodes = [&n1, &n2];
    create(&n1, "a1", "");
    let a1 = running_on(&n1, "a1");
    // One member down: the cluster goes on deciding.
    f.kill_member(0);
    create(&n2, "a2", "");
    let a2 = running_on_any(&nodes, "a2");
    // Every copy of both guests is followed from here on (tests/src/run_watch.rs).
    let watched: Vec<(String, std::path::PathBuf)> = nodes
        .iter()
        .map(|n| (n.name.clone(), n.node.state()))
        .collect();
    let watches: Vec<(&str, RunWatch)> = ["a1", "a2"]
        .into_iter()
        .map(|vm| (vm, RunWatch::start(vm, &watched)))
        .collect();
    // Two down: no quorum. Nothing running stops; nothing new is decided; status says why.
    f.kill_member(1);
    for n in nodes {
        n.node.wait_until("the outage seen", || {
            let st = n.node.try_ctl(&["status"]).ok()?;
            (st["cluster"]["connected"] == false).then_some(())
        });
    }
    let (ok, out) = ctl_text(&n1, &["cluster", "status"]);
    assert!(ok && out.contains("ClusterUnavailable"), "{out}");
    let (ok, out) = ctl_text(&n2, &["status"]);
    assert!(
        ok && out.contains("ClusterAvailable") && out.contains("EtcdUnreachable"),
        "{out}"
    );
    let f3 = n1.node.file("a3.yaml", &spec("a3", ""));
    let e = n1
        .node
        .try_ctl(&["vm", "create", "-f", &f3])
        .expect_err("no VM can be created without quorum");
    assert!(e.contains("cannot be reached"), "{e}");
    for (vm, at) in [("a1", &a1), ("a2", &a2)] {
        let n = node_by_name(&nodes, at);
        let before = last_pass(&n.node.console(vm)).unwrap_or(0);
        n.node.wait_pass_above(vm, before + 100);
        assert_eq!(n.node.vm(vm)["phase"], "Running");
    }
    // Quorum back: decisions resume.
    f.start_member(0);
    f.start_member(1);
    f.wait_healthy(3);
    n1.node.wait_until("the cluster reachable again", || {
        n1.node.try_ctl(&["vm", "create", "-f", &f3]).ok()
    });
    running_on_any(&nodes, "a3");
    for (vm, at) in [("a1", &a1), ("a2", &a2)] {
        let n = node_by_name(&nodes, at);
        assert_eq!(boots(&n.node.console(vm)), 1, "{vm} restarted");
    }
    // No node fenced itself: their peers said the control plane was down.
    let mut longest = 0;
    for (vm, w) in watches {
        let r = w.finish();
        assert!(r.double_runs.is_empty(), "{vm}: {:?}", r.double_runs);
        assert_eq!(r.boots, 0, "{vm} was restarted");
        longest = longest.max(r.longest_down.as_millis());
    }
    for n in nodes {
        assert!(!n.node.log().contains("FENCING"), "{}", n.log_tail(40));
    }
    println!(
        "FAULT-RESULT case=quorum-loss vms=2 restarted=0 double_runs=0 longest_down_ms={longest}"
    );
}

/// The most migrations of `recs` in flight at one instant, over all and per source node.
fn peak_in_flight(recs: &[&Value]) -> (usize, usize) {
    let span = |r: &Value| {
        (
            r["createdAt"].as_u64().unwrap_or(0),
            r["finishedAt"].as_u64().unwrap_or(u64::MAX),
        )
    };
    let mut all = 0;
    let mut node = 0;
    for r in recs {
        let (start, _) = span(r);
        let live: Vec<&&Value> = recs
            .iter()
            .filter(|o| {
                let (s, e) = span(o);
                s <= start && start < e
            })
            .collect();
        all = all.max(live.len());
        node = node.max(live.iter().filter(|o| o["source"] == r["source"]).count());
    }
    (all, node)
}

#[test]
#[cfg_attr(
    not(all(has_ip, has_etcd)),
    ignore = "iproute2 or etcd-server is not installed (CI installs them)"
)]
fn a_fleet_update_goes_canary_first_within_the_limits_and_pauses_on_failures() {
    require_cluster_tools();
    let v9 = integration_tests::launcher_of_version("9.0.0");
    let v91 = integration_tests::launcher_of_version("9.1.0");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fabric::new("up", 25, 3);
    let launcher = integration_tests::bin("launcher");
    let nodes = [
        f.node("n1", 1, "1Gi", &launcher),
        f.node("n2", 2, "1Gi", &launcher),
        f.node("n3", 3, "1Gi", &launcher),
    ];
    let refs: Vec<&ClusterNode> = nodes.iter().collect();
    let cfg = nodes[0].node.file(
        "cluster.yaml",
        "liveMigrationConfig:\n  parallelMigrationsPerCluster: 2\n  parallelOutboundMigrationsPerNode: 1\nworkloadUpdateStrategy:\n  workloadUpdateMethods: [LiveMigrate]\n  batchSize: 4\n  maxFailures: 2\n",
    );
    nodes[0].node.ctl(&["cluster", "config", "set", "-f", &cfg]);
    let vms: Vec<String> = (1..=6).map(|i| format!("u{i}")).collect();
    for vm in &vms {
        create(&nodes[0], vm, "");
    }
    let mut at = std::collections::BTreeMap::new();
    for vm in &vms {
        let node = running_on_any(&refs, vm);
        node_by_name(&refs, &node).node.wait_pass_above(vm, 50);
        at.insert(vm.clone(), node);
    }
    // The new version everywhere: the cluster moves every VM to it, in place.
    for n in &nodes {
        n.node.install(&v9);
    }
    let done = nodes[0].wait_cluster("every VM on 9.0.0", |list| {
        list.len() == 6 && list.iter().all(|v| v["launcherVersion"] == "9.0.0")
    });
    for v in &done {
        let vm = v["name"].as_str().unwrap_or("");
        assert_eq!(
            v["node"].as_str(),
            at.get(vm).map(String::as_str),
            "updates stay on their node"
        );
        let n = node_by_name(&refs, &at[vm]);
        let before = last_pass(&n.node.console(vm)).unwrap_or(0);
        n.node.wait_pass_above(vm, before);
        let console = n.node.console(vm);
        assert_eq!(boots(&console), 1, "{vm} rebooted:\n{console}");
        assert!(!console.contains("STALE"), "{console}");
    }
    let recs = nodes[0].wait_until_records(6);
    let updates: Vec<&Value> = recs
        .iter()
        .filter(|r| {
            r["reason"] == "Update" && r["toVersion"] == "9.0.0" && r["phase"] == "Succeeded"
        })
        .collect();
    assert_eq!(updates.len(), 6, "{recs:#?}");
    let (all, per_node) = peak_in_flight(&updates);
    assert!(
        all <= 2 && per_node <= 1,
        "limits exceeded ({all} in flight, {per_node} from one node): {updates:#?}"
    );
    // The canary ended before any other update began.
    let mut by_start = updates.clone();
    by_start.sort_by_key(|r| r["createdAt"].as_u64());
    let canary_end = by_start[0]["finishedAt"].as_u64().unwrap_or(u64::MAX);
    assert!(
        by_start[1..]
            .iter()
            .all(|r| r["createdAt"].as_u64().unwrap_or(0) >= canary_end),
        "the canary did not go first: {by_start:#?}"
    );
    // A release whose launcher fails every migration: the rollout pauses itself after
    // maxFailures (2) failed canaries, and says why; every VM keeps running on 9.0.0.
    for n in &nodes {
        n.node.install(&n.node.launcher_version_script(&v91));
    }
    let st = nodes[1].node.wait_until("the rollout paused", || {
        let st = nodes[1].node.try_ctl(&["cluster", "status"]).ok()?;
        st["controller"]["updatePaused"]
            .as_str()
            .map(str::to_string)
    });
    assert!(st.contains("maxFailures"), "{st}");
    let failed = |recs: &Value| {
        recs.as_array()
            .map(|a| {
                a.iter()
                    .filter(|r| r["toVersion"] == "9.1.0" && r["phase"] == "Failed")
                    .count()
            })
            .unwrap_or(0)
    };
    let recs = nodes[1].node.ctl(&["cluster", "migrations"]);
    assert_eq!(failed(&recs), 2, "{recs:#}");
    for vm in &vms {
        let n = node_by_name(&refs, &at[vm]);
        let v = n.node.vm(vm);
        assert_eq!(v["phase"], "Running", "{v}");
        assert_eq!(v["launcherVersion"], "9.0.0", "{v}");
    }
}

//! Cluster benchmark: drain a node of N VMs across two targets, and a leader failover.
//!
//! `scripts/bench-cluster` (or `cargo run -p benches --bin cluster -- --vms 10,30`) builds
//! nothing itself: it uses the workspace's debug `noded`, `nodectl` and `launcher`, a real
//! 3-member etcd in network namespaces (tests/src/cluster.rs), and `pattern` guests.
//!
//! For each N: one node holds N VMs (the two targets are cordoned while they are
//! created); a drain with one VM first gives the single cross-node migration time T1
//! (the baseline, measured in the same run); then the drain of N VMs with the default
//! limits (`parallelMigrationsPerCluster` 5, `parallelOutboundMigrationsPerNode` 2, so 2
//! at a time out of one node). Reported: drain time against N × T1 ÷ 2, and the pause
//! median and p99 from the migration records. Then the leader's noded is killed and the
//! time until another node leads is measured, against the lease TTL.
//! Results go to stdout, and with `--write-docs` to docs/cluster-benchmarks.md.

use std::process::Command;
use std::time::{Duration, Instant};

use benches::DocsArg;
use clap::Parser;
use integration_tests::cluster::{ClusterNode, Fabric};
use integration_tests::{bin, guests};
use serde_json::Value;

const PROG: &str = "cluster";

#[derive(Parser)]
#[command(
    name = "cluster",
    about = "Drain and failover benchmark of the cluster layer"
)]
struct Opts {
    /// VM counts to drain, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [10, 30])]
    vms: Vec<usize>,
    #[command(flatten)]
    docs: DocsArg,
}

fn create(n: &ClusterNode, name: &str) {
    let spec = format!(
        "name: {name}\nkernel: {}\ncmdline: mib=1 every=5000\nmemory: 32Mi\nevictionStrategy: LiveMigrate\n",
        guests::pattern_path().display()
    );
    let f = n.node.file(&format!("{name}.yaml"), &spec);
    n.node.ctl(&["vm", "create", "-f", &f]);
}

fn running_on(n: &ClusterNode, node: &str, count: usize) {
    n.wait_cluster(&format!("{count} VMs running on {node}"), |vms| {
        vms.iter()
            .filter(|v| v["node"] == node && v["phase"] == "Running")
            .count()
            >= count
    });
}

/// Drains `source` and waits for the end; the wall time.
fn drain(ctl: &ClusterNode, source: &str) -> Duration {
    let t = Instant::now();
    let out = Command::new(bin("nodectl"))
        .arg("--socket")
        .arg(ctl.node.socket())
        .args(["node", "drain", source, "--wait"])
        .output()
        .expect("nodectl");
    if !out.status.success() {
        benches::fail(
            PROG,
            &format!("drain failed: {}", String::from_utf8_lossy(&out.stdout)),
        );
    }
    t.elapsed()
}

fn pauses(ctl: &ClusterNode) -> Vec<f64> {
    ctl.node
        .ctl(&["cluster", "migrations"])
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["reason"] == "Drain" && r["phase"] == "Succeeded")
                .filter_map(|r| r["report"]["downtimeMs"].as_f64())
                .collect()
        })
        .unwrap_or_default()
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

struct Row {
    n: usize,
    t1: Duration,
    drain: Duration,
    p50: f64,
    p99: f64,
}

fn one(n: usize, subnet: u8) -> Row {
    let mut f = Fabric::new(&format!("bc{n}"), subnet, 3);
    let launcher = bin("launcher");
    let cap = format!("{}Mi", 48 * (n + 2));
    let a = f.node("a", 1, &cap, &launcher);
    let b = f.node("b", 2, &cap, &launcher);
    let c = f.node("c", 3, &cap, &launcher);
    // The baseline: one VM, one migration.
    for t in ["b", "c"] {
        a.node.ctl(&["node", "cordon", t]);
    }
    create(&a, "one");
    running_on(&a, "a", 1);
    for t in ["b", "c"] {
        a.node.ctl(&["node", "uncordon", t]);
    }
    let t1 = drain(&b, "a");
    b.node.ctl(&["vm", "delete", "one"]);
    b.wait_cluster("the baseline VM gone", |vms| vms.is_empty());
    for t in ["b", "c"] {
        a.node.ctl(&["node", "cordon", t]);
    }
    a.node.ctl(&["node", "uncordon", "a"]);
    for i in 0..n {
        create(&a, &format!("v{i}"));
    }
    running_on(&a, "a", n);
    for t in ["b", "c"] {
        a.node.ctl(&["node", "uncordon", t]);
    }
    let d = drain(&c, "a");
    let p = pauses(&c);
    Row {
        n,
        t1,
        drain: d,
        p50: pct(p.clone(), 0.5),
        p99: pct(p, 0.99),
    }
}

fn failover() -> (Duration, u64) {
    let mut f = Fabric::new("bcf", 39, 3);
    let launcher = bin("launcher");
    let mut nodes = vec![
        f.node("a", 1, "1Gi", &launcher),
        f.node("b", 2, "1Gi", &launcher),
        f.node("c", 3, "1Gi", &launcher),
    ];
    let leader = |n: &ClusterNode| -> Option<String> {
        let st: Value = n.node.try_ctl(&["cluster", "status"]).ok()?;
        st["controller"]["leader"].as_str().map(str::to_string)
    };
    let first = nodes[0].node.wait_until("a leader", || leader(&nodes[0]));
    let li = nodes.iter().position(|n| n.name == first).expect("leader");
    let other = (li + 1) % 3;
    let t = Instant::now();
    nodes[li].node.kill_daemon();
    nodes[other].node.wait_until("a new leader", || {
        leader(&nodes[other]).filter(|l| *l != first)
    });
    let took = t.elapsed();
    nodes.clear();
    (took, 5)
}

fn main() {
    let o = Opts::parse();
    let mut rows = Vec::new();
    for (i, n) in o.vms.iter().enumerate() {
        eprintln!("{PROG}: draining {n} VMs");
        rows.push(one(*n, 30 + i as u8));
    }
    eprintln!("{PROG}: leader failover");
    let (fo, ttl) = failover();
    let mut text = String::from(
        "# Cluster benchmark\n\nWritten by `scripts/bench-cluster` (benches/src/bin/cluster.rs) on this 2-core nested-KVM machine: a real 3-member etcd, three noded hosts in network namespaces, debug builds, `pattern` guests of 32 MiB rewriting 1 MiB each pass. One source node, two targets, default limits (5 per cluster, 2 out of one node: 2 at a time here). T1 is one cross-node migration drained alone, in the same run.\n\n| VMs | T1 (one VM) | drain | N × T1 ÷ 2 | ratio | pause median | pause p99 |\n|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let ideal = r.t1.as_secs_f64() * r.n as f64 / 2.0;
        text.push_str(&format!(
            "| {} | {:.2} s | {:.2} s | {:.2} s | {:.2} | {:.2} ms | {:.2} ms |\n",
            r.n,
            r.t1.as_secs_f64(),
            r.drain.as_secs_f64(),
            ideal,
            r.drain.as_secs_f64() / ideal,
            r.p50,
            r.p99
        ));
    }
    text.push_str(&format!(
        "\nLeader failover: the leader's noded killed (SIGKILL), another node led after {:.2} s with a lease TTL of {ttl} s ({:.2} × TTL; the bound is the TTL, as the old leader's lease must expire first).\n",
        fo.as_secs_f64(),
        fo.as_secs_f64() / ttl as f64
    ));
    print!("{text}");
    o.docs.write(PROG, "docs/cluster-benchmarks.md", &text);
}

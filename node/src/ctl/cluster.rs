//! `nodectl node ...` and `nodectl cluster ...`: the cluster commands (any node's noded
//! answers them from etcd; see node/src/cluster/api.rs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde_json::Value;

use super::client::Client;
use super::output::{rows, s, table, yaml};
use super::read_doc;

fn print_yaml(v: &Value) {
    print!("{}", yaml(v));
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// List the cluster's nodes.
    List,
    /// Show one node: capacity, VMs, drain progress.
    Get { name: String },
    /// Mark a node unschedulable: no new VM is placed there.
    Cordon { name: String },
    /// Make a node schedulable again; cancels a drain in progress (migrations already
    /// running finish).
    Uncordon { name: String },
    /// Cordon a node and move every VM off it, as each VM's evictionStrategy says.
    Drain {
        name: String,
        /// Wait and print each VM as it leaves, then a summary.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Leader, connection, update rollout, outdated VMs.
    Status,
    /// Every VM in the cluster and its node.
    Vms,
    /// The kept migration records (5 per VM).
    Migrations,
    /// The cluster configuration.
    Config {
        #[command(subcommand)]
        command: ClusterConfigCmd,
    },
}

#[derive(Subcommand)]
pub enum ClusterConfigCmd {
    /// Show it.
    Get,
    /// Merge a YAML or JSON document into it (workloadUpdateStrategy,
    /// liveMigrationConfig, nodeFailure).
    Set {
        /// File (`-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

fn gib(v: &Value) -> String {
    v.as_u64()
        .map(|b| format!("{:.1}Gi", b as f64 / (1u64 << 30) as f64))
        .unwrap_or_else(|| "-".into())
}

fn node_rows(list: &[Value]) -> Vec<Vec<String>> {
    list.iter()
        .map(|n| {
            let status = if n["draining"] == true {
                format!("{},SchedulingDisabled,Draining", s(&n["status"]))
            } else if n["cordoned"] == true {
                format!("{},SchedulingDisabled", s(&n["status"]))
            } else {
                s(&n["status"])
            };
            let launchers = n["launchers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|l| s(&l["version"]))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                s(&n["name"]),
                status,
                n["vms"].as_array().map_or(0, Vec::len).to_string(),
                format!(
                    "{}/{}",
                    gib(&n["memory"]["allocated"]),
                    gib(&n["memory"]["total"])
                ),
                format!(
                    "{}/{}",
                    s(&n["vcpus"]["allocated"]),
                    s(&n["vcpus"]["total"])
                ),
                launchers,
                s(&n["migrationAddress"]),
            ]
        })
        .collect()
}

const NODE_HEADERS: &[&str] = &[
    "NAME",
    "STATUS",
    "VMS",
    "MEMORY",
    "VCPUS",
    "LAUNCHERS",
    "MIGRATION-ADDRESS",
];

/// Runs a node command.
pub async fn node(c: &Client, cmd: &NodeCmd, json_out: bool) -> Result<(), String> {
    let v = match cmd {
        NodeCmd::List => c.call("GET", "/v1/nodes", None).await?,
        NodeCmd::Get { name } => c.call("GET", &format!("/v1/nodes/{name}"), None).await?,
        NodeCmd::Cordon { name } => {
            c.call("PUT", &format!("/v1/nodes/{name}/cordon"), None)
                .await?
        }
        NodeCmd::Uncordon { name } => {
            c.call("PUT", &format!("/v1/nodes/{name}/uncordon"), None)
                .await?
        }
        NodeCmd::Drain { name, wait } => {
            let v = c
                .call("PUT", &format!("/v1/nodes/{name}/drain"), None)
                .await?;
            if *wait {
                return drain_wait(c, name, json_out).await;
            }
            v
        }
    };
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    match cmd {
        NodeCmd::List => table(NODE_HEADERS, &node_rows(v.as_array().map_or(&[], |a| a))),
        NodeCmd::Get { .. } => print_yaml(&v),
        NodeCmd::Cordon { name } => println!("node/{name} cordoned"),
        NodeCmd::Uncordon { name } => println!("node/{name} uncordoned"),
        NodeCmd::Drain { name, .. } => {
            println!("node/{name} cordoned; draining (nodectl node get {name} shows the progress)")
        }
    }
    Ok(())
}

/// Follows a drain until the node holds only VMs that block it, printing each VM as it
/// leaves, then a summary. Exit status 1 when VMs block the drain or it was cancelled.
async fn drain_wait(c: &Client, name: &str, json_out: bool) -> Result<(), String> {
    let first = c.call("GET", &format!("/v1/nodes/{name}"), None).await?;
    let start: BTreeSet<String> = names(&first["vms"]);
    if !json_out {
        println!("draining node/{name}: {} VM(s)", start.len());
    }
    let mut on: BTreeSet<String> = start.clone();
    let mut seen_migrations: BTreeSet<String> = BTreeSet::new();
    let mut reported_blocked: BTreeMap<String, String> = BTreeMap::new();
    let mut moved: Vec<String> = Vec::new();
    let mut stopped: Vec<String> = Vec::new();
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        // A busy or briefly unreachable cluster does not end the wait; a long outage does.
        let v = match c.call("GET", &format!("/v1/nodes/{name}"), None).await {
            Ok(v) => {
                failing_since = None;
                v
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_secs(60) {
                    return Err(format!("lost track of the drain of node {name}: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if v["draining"] != true {
            println!("drain of node/{name} cancelled (the node was uncordoned)");
            summary(name, &moved, &stopped, &reported_blocked);
            return Err(format!("drain of node {name} cancelled"));
        }
        for m in v["migrations"].as_array().cloned().unwrap_or_default() {
            let id = s(&m["id"]);
            if m["source"] != name || m["reason"] != "Drain" || !start.contains(&s(&m["vm"])) {
                continue;
            }
            if m["phase"] == "Succeeded" || m["phase"] == "Failed" {
                let key = format!("{id}/end");
                if seen_migrations.insert(key) {
                    let vm = s(&m["vm"]);
                    if m["phase"] == "Succeeded" {
                        let pause = m["report"]["downtime_ms"]
                            .as_f64()
                            .or(m["report"]["downtimeMs"].as_f64())
                            .map(|d| format!(", paused {d:.2} ms"))
                            .unwrap_or_default();
                        println!("  {vm}: live-migrated to {}{pause}", s(&m["target"]));
                        moved.push(format!("{vm} → {}", s(&m["target"])));
                    } else {
                        println!(
                            "  {vm}: migration to {} failed: {}",
                            s(&m["target"]),
                            s(&m["error"])
                        );
                    }
                }
            } else if seen_migrations.insert(id) {
                println!("  {}: migrating to {}", s(&m["vm"]), s(&m["target"]));
            }
        }
        let now: BTreeSet<String> = names(&v["vms"]);
        for gone in on.difference(&now) {
            if moved.iter().any(|m| m.starts_with(&format!("{gone} "))) {
                continue;
            }
            let msg = v["evicted"]
                .as_array()
                .and_then(|a| a.iter().find(|e| e["name"] == gone.as_str()))
                .map(|e| s(&e["message"]))
                .unwrap_or_else(|| "left the node".into());
            println!("  {gone}: stopped ({msg})");
            stopped.push(gone.clone());
        }
        on = now;
        let blocked: BTreeMap<String, String> = v["blocked"]
            .as_array()
            .map(|a| a.iter().map(|b| (s(&b["vm"]), s(&b["reason"]))).collect())
            .unwrap_or_default();
        for (vm, why) in &blocked {
            if reported_blocked.get(vm) != Some(why) && !why.contains("retrying in") {
                println!("  {vm}: blocks the drain: {why}");
            }
        }
        reported_blocked = blocked;
        let in_flight = v["migrations"].as_array().is_some_and(|a| {
            a.iter()
                .any(|m| m["phase"] != "Succeeded" && m["phase"] != "Failed" && m["source"] == name)
        });
        let left: BTreeSet<&String> = on
            .iter()
            .filter(|n| !reported_blocked.contains_key(*n))
            .collect();
        if left.is_empty() && !in_flight {
            summary(name, &moved, &stopped, &reported_blocked);
            if reported_blocked.is_empty() {
                return Ok(());
            }
            return Err(format!(
                "node {name} is not empty: {} VM(s) block the drain (it stays cordoned; the drain goes on when they can leave)",
                reported_blocked.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn summary(name: &str, moved: &[String], stopped: &[String], blocked: &BTreeMap<String, String>) {
    println!(
        "drain of node/{name}: {} live-migrated, {} stopped (restarted elsewhere as their runStrategy says), {} blocking",
        moved.len(),
        stopped.len(),
        blocked.len()
    );
    for (vm, why) in blocked {
        println!("  blocked: {vm}: {why}");
    }
}

fn names(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default()
}

/// Runs a cluster command.
pub async fn cluster(c: &Client, cmd: &ClusterCmd, json_out: bool) -> Result<(), String> {
    let v = match cmd {
        ClusterCmd::Status => c.call("GET", "/v1/cluster", None).await?,
        ClusterCmd::Vms => c.call("GET", "/v1/cluster/vms", None).await?,
        ClusterCmd::Migrations => c.call("GET", "/v1/cluster/migrations", None).await?,
        ClusterCmd::Config { command } => match command {
            ClusterConfigCmd::Get => c.call("GET", "/v1/cluster", None).await?["config"].clone(),
            ClusterConfigCmd::Set { file } => {
                c.call("PUT", "/v1/cluster/config", Some(&read_doc(file)?))
                    .await?
            }
        },
    };
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    match cmd {
        ClusterCmd::Status => {
            let ctl = &v["controller"];
            println!("node:                     {}", s(&v["node"]));
            println!("connected:                {}", s(&v["connected"]));
            if let Some(e) = v["error"].as_str() {
                println!("error:                    {e}");
            }
            println!("leader:                   {}", s(&ctl["leader"]));
            println!("targetLauncherVersion:    {}", s(&ctl["targetVersion"]));
            println!(
                "outdatedVirtualMachineInstanceWorkloads: {}",
                s(&ctl["outdated"])
            );
            println!("updateWave:               {}", s(&ctl["wave"]));
            if let Some(p) = ctl["updatePaused"].as_str() {
                println!("updatePaused:             {p}");
            }
            if v["connected"] != true {
                println!("condition:                ClusterUnavailable: no new decisions are made; running VMs keep running");
            }
        }
        ClusterCmd::Vms => {
            let rows = rows(
                &v,
                &[
                    "name",
                    "node",
                    "phase",
                    "launcherVersion",
                    "runStrategy",
                    "evictionStrategy",
                    "message",
                ],
            );
            table(
                &[
                    "NAME",
                    "NODE",
                    "PHASE",
                    "VERSION",
                    "RUN-STRATEGY",
                    "EVICTION-STRATEGY",
                    "MESSAGE",
                ],
                &rows,
            );
        }
        ClusterCmd::Migrations => {
            let rows = rows(
                &v,
                &["id", "vm", "reason", "source", "target", "phase", "error"],
            );
            table(
                &["ID", "VM", "REASON", "SOURCE", "TARGET", "PHASE", "ERROR"],
                &rows,
            );
        }
        ClusterCmd::Config { .. } => print_yaml(&v),
    }
    Ok(())
}

//! `nodectl status`, `update ...`, `config ...` and `migrations ...`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::Value;

use super::output::{print_event, print_structured, rows, s, table, table_text, yaml, Output};
use super::{read_doc, Ctx};

/// `nodectl update` subcommands.
#[derive(Subcommand)]
pub enum UpdateCmd {
    /// Approve the pending target version (approvalStrategy Manual).
    Approve,
    /// Follow the update in progress: each VM as it moves (with its pause), until every
    /// VM runs the target launcher.
    Watch,
}

/// `nodectl config` subcommands.
#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Show the settings.
    Get,
    /// Merge a YAML or JSON settings document into the settings.
    Set {
        /// Settings file (`-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Validate and show the resulting settings; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn print_status(o: Output, v: &Value) {
    if print_structured(o, "status", v) {
        return;
    }
    let field = |k: &str, val: String| println!("{:<26}{val}", format!("{k}:"));
    field("targetLauncherVersion", s(&v["targetLauncherVersion"]));
    field("approvedLauncherVersion", s(&v["approvedLauncherVersion"]));
    field("channel", s(&v["channel"]));
    field("approvalStrategy", s(&v["approvalStrategy"]));
    field("approvalPending", s(&v["approvalPending"]));
    field(
        "workloadUpdateMethods",
        v["workloadUpdateMethods"].to_string(),
    );
    field("virtualMachines", s(&v["virtualMachines"]));
    println!(
        "outdatedVirtualMachineInstanceWorkloads: {}",
        s(&v["outdatedVirtualMachineInstanceWorkloads"])
    );
    if let Some(m) = v["message"].as_str() {
        field("message", m.to_string());
    }
    if let Some(m) = v["untestedUpdatePath"].as_str() {
        field("untestedUpdatePath", m.to_string());
    }
    let c = &v["cluster"];
    if c.is_object() {
        let ctl = &c["controller"];
        println!();
        field("cluster.node", s(&c["node"]));
        field("cluster.connected", s(&c["connected"]));
        if let Some(e) = c["error"].as_str() {
            field("cluster.error", e.to_string());
        }
        field("cluster.leader", s(&ctl["leader"]));
        field("cluster.targetVersion", s(&ctl["targetVersion"]));
        println!(
            "cluster.outdatedVirtualMachineInstanceWorkloads: {}",
            s(&ctl["outdated"])
        );
        if let Some(p) = ctl["updatePaused"].as_str() {
            field("cluster.updatePaused", p.to_string());
        }
    }
    println!();
    table(
        &["CONDITION", "STATUS", "REASON", "MESSAGE"],
        &condition_rows(v),
    );
}

fn condition_rows(v: &Value) -> Vec<Vec<String>> {
    let mut rows = node_condition_rows(v);
    // In a cluster: whether it can decide anything now.
    let c = &v["cluster"];
    if c.is_object() {
        let up = c["connected"] == true;
        rows.push(vec![
            "ClusterAvailable".into(),
            if up { "True" } else { "False" }.into(),
            if up { "Connected" } else { "EtcdUnreachable" }.into(),
            if up {
                format!("leader {}", s(&c["controller"]["leader"]))
            } else {
                format!(
                    "no new cluster decision is made; running VMs keep running: {}",
                    s(&c["error"])
                )
            },
        ]);
        if let Some(why) = c["fenced"].as_str() {
            rows.push(vec![
                "Fenced".into(),
                "True".into(),
                "SelfFenced".into(),
                format!("this node killed its VMs and starts nothing until it has rejoined: {why}"),
            ]);
        }
    }
    rows
}

fn node_condition_rows(v: &Value) -> Vec<Vec<String>> {
    rows(&v["conditions"], &["type", "status", "reason", "message"])
}

/// One line per status change: the time, the counts and the conditions that are True.
fn status_line(v: &Value) -> String {
    let conds: Vec<String> = v["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter(|c| c["status"] == "True")
                .map(|c| format!("{}({})", s(&c["type"]), s(&c["reason"])))
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{}  target={} approved={} outdated={} vms={} {}",
        now(),
        s(&v["targetLauncherVersion"]),
        s(&v["approvedLauncherVersion"]),
        s(&v["outdatedVirtualMachineInstanceWorkloads"]),
        s(&v["virtualMachines"]),
        conds.join(" ")
    )
}

fn now() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

/// `nodectl status [-w]`.
pub async fn status(ctx: &Ctx, watch: bool) -> Result<(), String> {
    if !watch {
        let v = ctx.client.call("GET", "/v1/status", None).await?;
        print_status(ctx.output, &v);
        return Ok(());
    }
    let o = ctx.output;
    ctx.client
        .watch("/v1/status", |ev| {
            if !print_event(o, "status", &ev) {
                println!("{}", status_line(&ev["object"]));
            }
            Ok(true)
        })
        .await
}

/// `nodectl update ...`.
pub async fn update(ctx: &Ctx, cmd: UpdateCmd) -> Result<(), String> {
    match cmd {
        UpdateCmd::Approve => {
            let v = ctx.client.call("PUT", "/v1/update/approve", None).await?;
            print_status(ctx.output, &v);
            Ok(())
        }
        UpdateCmd::Watch => update_watch(ctx).await,
    }
}

/// What `update watch` remembers of a VM.
#[derive(Clone, PartialEq)]
struct Seen {
    phase: String,
    version: String,
    outdated: bool,
}

/// Whether the update is over: no VM outdated, none moving.
fn settled(vms: &BTreeMap<String, Value>) -> bool {
    vms.values().all(|v| {
        v["outdated"] != true
            && !matches!(
                v["phase"].as_str(),
                Some("Migrating" | "Evicting" | "Stopping")
            )
    })
}

/// The pause of the VM's newest finished migration, for the progress line.
async fn last_pause(ctx: &Ctx, name: &str) -> Option<String> {
    let recs = ctx
        .client
        .call("GET", &format!("/v1/vms/{name}/migrations"), None)
        .await
        .ok()?;
    let last = recs
        .as_array()?
        .iter()
        .find(|r| r["outcome"] != "Running")?;
    let r = &last["report"];
    let d = r["downtime_ms"].as_f64().or(r["downtimeMs"].as_f64())?;
    Some(format!("{} (pause {d:.2} ms)", s(&last["outcome"])))
}

/// `nodectl update watch`: streams the VMs and prints each move (with its pause) until
/// the update in progress ends; started before an update, it waits for one.
async fn update_watch(ctx: &Ctx) -> Result<(), String> {
    let st = ctx.client.call("GET", "/v1/status", None).await?;
    let total = st["virtualMachines"].as_u64().unwrap_or(0) as usize;
    if total == 0 {
        println!("No VMs on this node: nothing to update");
        return Ok(());
    }
    let mut target = s(&st["approvedLauncherVersion"]);
    let mut w = ctx.client.open_watch("/v1/vms").await?;
    let mut vms: BTreeMap<String, Value> = BTreeMap::new();
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut listed = false;
    let mut updating = false;
    let headers = ["TIME", "VM", "PHASE", "VERSION", "DETAIL"];
    let mut rows: Vec<Vec<String>> = Vec::new();
    while let Some(ev) = w.next().await? {
        let obj = ev["object"].clone();
        let name = s(&obj["name"]);
        if ev["type"] == "DELETED" {
            vms.remove(&name);
            seen.remove(&name);
            continue;
        }
        vms.insert(name.clone(), obj.clone());
        let now_seen = Seen {
            phase: s(&obj["phase"]),
            version: s(&obj["launcherVersion"]),
            outdated: obj["outdated"] == true,
        };
        let before = seen.insert(name.clone(), now_seen.clone());
        if before.as_ref() == Some(&now_seen) {
            continue;
        }
        let was_migrating = before.as_ref().is_some_and(|b| b.phase == "Migrating");
        let detail = if was_migrating && now_seen.phase == "Running" {
            last_pause(ctx, &name).await.unwrap_or_default()
        } else {
            obj["reason"]
                .as_str()
                .or(obj["message"].as_str())
                .unwrap_or("")
                .to_string()
        };
        rows.push(vec![now(), name, now_seen.phase, now_seen.version, detail]);
        if !listed && vms.len() < total {
            continue;
        }
        if !updating && !settled(&vms) {
            updating = true;
            let st = ctx.client.call("GET", "/v1/status", None).await?;
            target = s(&st["approvedLauncherVersion"]);
            println!(
                "Update to launcher {target}: {} outdated VM(s) of {}",
                s(&st["outdatedVirtualMachineInstanceWorkloads"]),
                s(&st["virtualMachines"])
            );
        }
        // Fixed columns, so that rows printed as they come line up under the header.
        let w = vms.keys().map(String::len).max().unwrap_or(2).max(2);
        let line = |r: &[String]| {
            format!(
                "{:<24}  {:<w$}  {:<16}  {:<8}  {}",
                r[0], r[1], r[2], r[3], r[4]
            )
            .trim_end()
            .to_string()
        };
        if !listed {
            let h: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
            println!("{}", line(&h));
        }
        for r in rows.drain(..) {
            println!("{}", line(&r));
        }
        if !listed {
            listed = true;
            if !updating {
                println!("No update in progress (every VM runs launcher {target}); waiting for one. Ctrl-C stops.");
            }
        }
        if updating && settled(&vms) {
            println!("Update complete: every VM runs launcher {target}");
            return Ok(());
        }
    }
    Err("noded ended the watch before the update completed".into())
}

/// `nodectl config ...`.
pub async fn config(ctx: &Ctx, cmd: ConfigCmd) -> Result<(), String> {
    let v = match cmd {
        ConfigCmd::Get => ctx.client.call("GET", "/v1/config", None).await?,
        ConfigCmd::Set { file, dry_run } => {
            let q = if dry_run { "?dryRun=true" } else { "" };
            ctx.client
                .call("PUT", &format!("/v1/config{q}"), Some(&read_doc(&file)?))
                .await?
        }
    };
    if let Some(w) = v["warning"].as_str() {
        eprintln!("nodectl: warning: {w}");
    }
    if !print_structured(ctx.output, "config", &v) {
        if v["dryRun"] == true {
            println!("# dry run: nothing was changed");
        }
        print!("{}", yaml(&v));
    }
    Ok(())
}

fn migration_row(m: &Value) -> Vec<String> {
    let r = &m["report"];
    let f = |snake: &str, camel: &str| {
        let v = if r[snake].is_null() {
            &r[camel]
        } else {
            &r[snake]
        };
        // Milliseconds for people: two decimals.
        v.as_f64()
            .map(|ms| format!("{ms:.2}"))
            .unwrap_or_else(|| s(v))
    };
    vec![
        s(&m["startedAt"]),
        s(&m["finishedAt"]),
        s(&m["outcome"]),
        s(&m["sourceVersion"]),
        s(&m["targetVersion"]),
        f("downtime_ms", "downtimeMs"),
        f("total_ms", "totalMs"),
        r["error"].as_str().unwrap_or("").to_string(),
    ]
}

const MIGRATION_HEADERS: &[&str] = &[
    "STARTED",
    "FINISHED",
    "OUTCOME",
    "FROM",
    "TO",
    "DOWNTIME-MS",
    "TOTAL-MS",
    "ERROR",
];

/// `nodectl migrations NAME [-w]`.
pub async fn migrations(ctx: &Ctx, name: &str, watch: bool) -> Result<(), String> {
    let path = format!("/v1/vms/{name}/migrations");
    let o = ctx.output;
    if watch {
        let mut header = false;
        return ctx
            .client
            .watch(&path, |ev| {
                if print_event(o, "migration", &ev) {
                    return Ok(true);
                }
                let t = table_text(MIGRATION_HEADERS, &[migration_row(&ev["object"])]);
                let mut lines = t.lines();
                let h = lines.next().unwrap_or("");
                if !std::mem::replace(&mut header, true) {
                    println!("{h}");
                }
                println!("{}", lines.next().unwrap_or(""));
                Ok(true)
            })
            .await;
    }
    let v = ctx.client.call("GET", &path, None).await?;
    if print_structured(o, "migration", &v) {
        return Ok(());
    }
    let rows: Vec<_> = v
        .as_array()
        .map(|a| a.iter().map(migration_row).collect())
        .unwrap_or_default();
    table(MIGRATION_HEADERS, &rows);
    Ok(())
}

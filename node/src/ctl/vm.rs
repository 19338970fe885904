//! `nodectl vm ...`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Value};

use super::output::{print_event, print_structured, rows, s, table, table_text, yaml, Output};
use super::{parse_duration, read_doc, Ctx};

/// `nodectl vm` subcommands.
#[derive(Subcommand)]
pub enum VmCmd {
    /// Create a VM from a YAML or JSON spec.
    Create {
        /// Spec file (`-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Validate the spec and show the VM that would be created; create nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List VMs.
    List {
        /// Stream changes until interrupted.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Show one VM.
    Get {
        /// VM name.
        name: String,
        /// Stream changes until interrupted (or the VM is deleted).
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Show a VM in full: spec, status, conditions and its recent events.
    Describe {
        /// VM name.
        name: String,
    },
    /// Change a VM's spec (full spec, same name). A running VM takes runStrategy,
    /// evictionStrategy and terminationGracePeriodSeconds at once; other changes
    /// (machineType, memory, kernel, disks ...) wait for its next restart (restartRequired).
    Update {
        /// Spec file (`-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Validate and show the result; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Start a stopped VM.
    Start {
        /// VM name.
        name: String,
        /// Wait until it runs (fails if its launcher keeps failing).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (90s, 5m, ...).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Stop a VM (graceful, then forced after terminationGracePeriodSeconds).
    Stop {
        /// VM name.
        name: String,
        /// Wait until it has stopped.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (90s, 5m, ...).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Stop and delete a VM.
    Delete {
        /// VM name.
        name: String,
    },
    /// Wait for a VM from another node: start an incoming launcher listening on
    /// `--listen` with mutual TLS (phase Receiving); the VM runs here once the source node
    /// migrated it (`nodectl vm migrate` there).
    Receive {
        /// The VM's spec (as on the source node; `-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Where the incoming launcher listens: `tcp:IP:PORT` (an address of this node).
        #[arg(long)]
        listen: String,
        /// TLS directory (ca.pem, cert.pem, key.pem) of this node.
        #[arg(long)]
        tls_dir: PathBuf,
    },
    /// Live-migrate a running VM to another node that waits for it (`nodectl vm
    /// receive` there), over TCP with mutual TLS; waits for the outcome. On success the
    /// VM is MovedAway here (never restarted); on failure it keeps running here.
    Migrate {
        /// VM name.
        name: String,
        /// The destination: `tcp:IP:PORT` (the other node's `--listen`).
        #[arg(long)]
        to: String,
        /// TLS directory (ca.pem, cert.pem, key.pem) of this node.
        #[arg(long)]
        tls_dir: PathBuf,
        /// Name the destination's certificate must carry (default: the address's host).
        #[arg(long)]
        tls_server_name: Option<String>,
        /// Return at once instead of waiting for the outcome.
        #[arg(long)]
        no_wait: bool,
    },
    /// Answer for a VM left paused by a migration to another node whose outcome is
    /// unknown (the connection broke after the switch-over began). Look at the
    /// destination first (`nodectl vm get NAME` on that node): a VM must never run twice.
    /// Outside a cluster only; in a cluster the target node's answer decides.
    #[command(group(clap::ArgGroup::new("outcome").required(true).args(["resume", "moved_away"])))]
    Resolve {
        /// VM name.
        name: String,
        /// The destination does not run the VM: resume the paused copy here (no reboot).
        #[arg(long)]
        resume: bool,
        /// The destination runs the VM: drop the paused copy here (it becomes MovedAway).
        #[arg(long)]
        moved_away: bool,
    },
}

const HEADERS: &[&str] = &[
    "NAME",
    "PHASE",
    "VERSION",
    "OUTDATED",
    "MIGRATABLE",
    "MACHINE-TYPE",
    "RUN-STRATEGY",
    "RESTART-REQUIRED",
    "REASON",
];
const WIDE_EXTRA: &[&str] = &["PID", "CREATED", "MESSAGE"];

/// The REASON column: why a stopped or failing VM is so (its message, which carries the
/// launcher's own error line), else why it is not updated yet.
fn reason(v: &Value) -> String {
    let failing = matches!(
        v["phase"].as_str(),
        Some("CrashLoopBackOff" | "Stopped" | "Starting")
    );
    let pick = if failing {
        v["message"].as_str().or(v["reason"].as_str())
    } else {
        v["reason"].as_str().or(v["message"].as_str())
    };
    pick.unwrap_or("").to_string()
}

/// One VM as a table row.
pub fn row(v: &Value, wide: bool) -> Vec<String> {
    let mut r = vec![
        s(&v["name"]),
        s(&v["phase"]),
        s(&v["launcherVersion"]),
        s(&v["outdated"]),
        s(&v["migratable"]),
        s(&v["machineType"]),
        s(&v["runStrategy"]),
        if v["restartRequired"] == true {
            v["pendingChanges"]
                .as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                .unwrap_or_else(|| "yes".into())
        } else {
            "-".into()
        },
        reason(v),
    ];
    if wide {
        r.extend([
            s(&v["pid"]),
            s(&v["createdAt"]),
            v["message"].as_str().unwrap_or("-").to_string(),
        ]);
    }
    r
}

fn headers(wide: bool) -> Vec<&'static str> {
    let mut h = HEADERS.to_vec();
    if wide {
        h.extend(WIDE_EXTRA);
    }
    h
}

/// Prints VMs in the chosen format.
pub fn print_vms(o: Output, v: &Value) {
    if print_structured(o, "vm", v) {
        return;
    }
    let wide = o == Output::Wide;
    let items = match v {
        Value::Array(a) => a.clone(),
        other => vec![other.clone()],
    };
    let rows: Vec<_> = items.iter().map(|i| row(i, wide)).collect();
    table(&headers(wide), &rows);
}

/// Streams VM events: a table row per change (header first), or structured events.
async fn watch_vms(ctx: &Ctx, path: &str) -> Result<(), String> {
    let o = ctx.output;
    let wide = o == Output::Wide;
    let h: Vec<String> = headers(wide).iter().map(|s| s.to_string()).collect();
    let mut widths: Option<Vec<usize>> = None;
    ctx.client
        .watch(path, |ev| {
            if print_event(o, "vm", &ev) {
                return Ok(true);
            }
            let mut r = row(&ev["object"], wide);
            if ev["type"] == "DELETED" {
                r[1] = "Deleted".into();
            }
            // The widths are fixed by the first row (and only grow), as kubectl does,
            // so that later rows line up under the header printed once.
            let w = widths.get_or_insert_with(|| {
                let w: Vec<usize> = h
                    .iter()
                    .zip(&r)
                    .map(|(h, c)| h.len().max(c.chars().count()))
                    .collect();
                println!("{}", pad(&h, &w));
                w
            });
            for (x, c) in w.iter_mut().zip(&r) {
                *x = (*x).max(c.chars().count());
            }
            println!("{}", pad(&r, w));
            Ok(true)
        })
        .await
}

fn pad(cells: &[String], widths: &[usize]) -> String {
    let mut out = String::new();
    for (i, c) in cells.iter().enumerate() {
        if i + 1 == cells.len() {
            out.push_str(c);
        } else {
            let w = widths.get(i).copied().unwrap_or(0);
            out.push_str(&format!("{c:<w$}  "));
        }
    }
    out.trim_end().to_string()
}

/// Waits (through a watch) until `done` says the VM reached its goal, or fails with
/// what went wrong.
async fn wait_for(
    ctx: &Ctx,
    name: &str,
    timeout: Duration,
    mut done: impl FnMut(&Value) -> Result<bool, String>,
) -> Result<Value, String> {
    let mut last = Value::Null;
    let path = format!("/v1/vms/{name}");
    let watch = ctx.client.watch(&path, |ev| {
        if ev["type"] == "DELETED" {
            return Err(format!("VM {name} was deleted"));
        }
        last = ev["object"].clone();
        Ok(!done(&last)?)
    });
    match tokio::time::timeout(timeout, watch).await {
        Ok(r) => r.map(|()| last),
        Err(_) => Err(format!(
            "VM {name} did not get there within {} (phase {}): {}",
            humantime::format_duration(timeout),
            s(&last["phase"]),
            s(&last["message"])
        )),
    }
}

/// Runs a `vm` subcommand.
pub async fn run(ctx: &Ctx, cmd: VmCmd) -> Result<(), String> {
    let c = &ctx.client;
    let o = ctx.output;
    match cmd {
        VmCmd::Create { file, dry_run } => {
            let q = if dry_run { "?dryRun=true" } else { "" };
            let v = c
                .call("POST", &format!("/v1/vms{q}"), Some(&read_doc(&file)?))
                .await?;
            print_one(o, &v, dry_run)
        }
        VmCmd::List { watch: true } => watch_vms(ctx, "/v1/vms").await,
        VmCmd::List { watch: false } => {
            print_vms(o, &c.call("GET", "/v1/vms", None).await?);
            Ok(())
        }
        VmCmd::Get { name, watch: true } => watch_vms(ctx, &format!("/v1/vms/{name}")).await,
        VmCmd::Get { name, watch: false } => {
            let v = c.call("GET", &format!("/v1/vms/{name}"), None).await?;
            if o == Output::Table {
                // One VM in full is easier to read as YAML, as before.
                print!("{}", yaml(&v));
            } else {
                print_vms(o, &v);
            }
            Ok(())
        }
        VmCmd::Describe { name } => describe(ctx, &name).await,
        VmCmd::Update { file, dry_run } => {
            let spec = read_doc(&file)?;
            let name = spec["name"]
                .as_str()
                .ok_or_else(|| format!("{}: invalid spec: name: required", file.display()))?
                .to_string();
            let q = if dry_run { "?dryRun=true" } else { "" };
            let v = c
                .call("PUT", &format!("/v1/vms/{name}{q}"), Some(&spec))
                .await?;
            print_one(o, &v, dry_run)
        }
        VmCmd::Start {
            name,
            wait,
            timeout,
        } => start(ctx, &name, wait, timeout).await,
        VmCmd::Stop {
            name,
            wait,
            timeout,
        } => {
            let mut v = c.call("PUT", &format!("/v1/vms/{name}/stop"), None).await?;
            if wait {
                v = wait_for(ctx, &name, timeout, |v| Ok(v["phase"] == "Stopped")).await?;
            }
            print_vms(o, &v);
            Ok(())
        }
        VmCmd::Delete { name } => {
            let v = c.call("DELETE", &format!("/v1/vms/{name}"), None).await?;
            if print_structured(o, "vm", &v) {
                return Ok(());
            }
            if v.get("deleting").is_some() {
                println!("VM {name} is stopping and will then be deleted");
            } else {
                println!("VM {name} deleted");
            }
            Ok(())
        }
        VmCmd::Receive {
            file,
            listen,
            tls_dir,
        } => {
            let abs =
                std::path::absolute(&tls_dir).map_err(|e| format!("{}: {e}", tls_dir.display()))?;
            let body = json!({ "spec": read_doc(&file)?, "listen": listen, "tlsDir": abs });
            print_vms(o, &c.call("POST", "/v1/vms/receive", Some(&body)).await?);
            Ok(())
        }
        VmCmd::Migrate {
            name,
            to,
            tls_dir,
            tls_server_name,
            no_wait,
        } => migrate(ctx, &name, &to, &tls_dir, tls_server_name, no_wait).await,
        VmCmd::Resolve { name, resume, .. } => {
            let outcome = if resume { "resume" } else { "movedAway" };
            let body = json!({ "outcome": outcome });
            let v = c
                .call(
                    "PUT",
                    &format!("/v1/vms/{name}/resolve-handover"),
                    Some(&body),
                )
                .await?;
            print_vms(o, &v);
            Ok(())
        }
    }
}

/// Prints the VM a create or update returned (in full, as YAML, for the table format).
fn print_one(o: Output, v: &Value, dry_run: bool) -> Result<(), String> {
    if dry_run && o.tabular() {
        println!("# dry run: nothing was changed");
    }
    if o == Output::Table {
        print!("{}", yaml(v));
    } else {
        print_vms(o, v);
    }
    Ok(())
}

/// `vm describe`: the VM, its conditions and its events, as `kubectl describe` shows.
async fn describe(ctx: &Ctx, name: &str) -> Result<(), String> {
    let c = &ctx.client;
    let v = c.call("GET", &format!("/v1/vms/{name}"), None).await?;
    let events = c
        .call("GET", &format!("/v1/vms/{name}/events"), None)
        .await?;
    if !ctx.output.tabular() {
        let all = json!({ "vm": v, "events": events });
        print_structured(ctx.output, "vm", &all);
        return Ok(());
    }
    let field = |k: &str, val: &Value| println!("{:<20}{}", format!("{k}:"), s(val));
    field("Name", &v["name"]);
    field("Phase", &v["phase"]);
    field("Launcher Version", &v["launcherVersion"]);
    field("PID", &v["pid"]);
    field("Machine Type", &v["machineType"]);
    field("Run Strategy", &v["runStrategy"]);
    field("Outdated", &v["outdated"]);
    if let Some(r) = v["reason"].as_str() {
        field("Reason", &json!(r));
    }
    if let Some(m) = v["message"].as_str() {
        field("Message", &json!(m));
    }
    field("Migratable", &v["migratable"]);
    field("Restart Required", &v["restartRequired"]);
    field("Created", &v["createdAt"]);
    field("Serial Log", &v["serialLog"]);
    println!("Spec:");
    for l in yaml(&v["spec"]).lines() {
        println!("  {l}");
    }
    println!("Conditions:");
    let conds = rows(
        &v["conditions"],
        &["type", "status", "lastTransitionTime", "reason", "message"],
    );
    indent(&table_text(
        &["TYPE", "STATUS", "LAST-TRANSITION", "REASON", "MESSAGE"],
        &conds,
    ));
    println!("Events:");
    let evs = rows(&events, &["time", "type", "reason", "message"]);
    if evs.is_empty() {
        println!("  <none>");
    } else {
        indent(&table_text(&["TIME", "TYPE", "REASON", "MESSAGE"], &evs));
    }
    Ok(())
}

fn indent(text: &str) {
    for l in text.lines() {
        println!("  {l}");
    }
}

/// `vm start [--wait]`: waits for Running, or fails with the VM's message.
async fn start(ctx: &Ctx, name: &str, wait: bool, timeout: Duration) -> Result<(), String> {
    let mut v = ctx
        .client
        .call("PUT", &format!("/v1/vms/{name}/start"), None)
        .await?;
    if wait {
        v = wait_for(ctx, name, timeout, |v| match v["phase"].as_str() {
            Some("Running") => Ok(true),
            Some("CrashLoopBackOff") => {
                Err(format!("VM {name} does not start: {}", s(&v["message"])))
            }
            Some("Stopped") if v["message"].is_string() => {
                Err(format!("VM {name} stopped: {}", s(&v["message"])))
            }
            _ => Ok(false),
        })
        .await?;
    }
    print_vms(ctx.output, &v);
    Ok(())
}

/// `vm migrate`: asks the node to send the VM to another node's listener and, unless
/// `--no-wait`, waits until it moved away.
async fn migrate(
    ctx: &Ctx,
    name: &str,
    to: &str,
    tls_dir: &std::path::Path,
    tls_server_name: Option<String>,
    no_wait: bool,
) -> Result<(), String> {
    let abs = std::path::absolute(tls_dir).map_err(|e| format!("{}: {e}", tls_dir.display()))?;
    let mut body = json!({ "to": to, "tlsDir": abs });
    if let Some(n) = tls_server_name {
        body["tlsServerName"] = json!(n);
    }
    let mut v = ctx
        .client
        .call("PUT", &format!("/v1/vms/{name}/migrate"), Some(&body))
        .await?;
    if !no_wait {
        v = wait_for(ctx, name, Duration::from_secs(24 * 3600), |v| {
            Ok(v["phase"] != "MigratingOut")
        })
        .await?;
        if v["phase"] != "MovedAway" {
            return Err(format!(
                "VM {name} did not move (phase {}): {}",
                s(&v["phase"]),
                s(&v["message"])
            ));
        }
    }
    print_vms(ctx.output, &v);
    Ok(())
}

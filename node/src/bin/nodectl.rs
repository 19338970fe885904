//! `nodectl`: the command line for noded. Every command takes `-o json`; errors are one
//! line on stderr and exit status 1.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use contracts::http::{self, HttpError};
use serde_json::{json, Value};

#[path = "../ctl/cluster.rs"]
mod cluster_ctl;

const DEFAULT_SOCKET: &str = "/var/lib/noded/noded.sock";

#[derive(Parser)]
#[command(name = "nodectl", version = env!("CARGO_PKG_VERSION"), about = "Control noded: VMs, launchers, updates")]
struct Cli {
    /// noded's API socket [env: NODED_SOCKET; default /var/lib/noded/noded.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        command: VmCmd,
    },
    /// Launcher binaries.
    Launcher {
        #[command(subcommand)]
        command: LauncherCmd,
    },
    /// Node status: target version, approval, outdated VMs, conditions.
    Status,
    /// Updates.
    Update {
        #[command(subcommand)]
        command: UpdateCmd,
    },
    /// Node settings (workloadUpdateStrategy, liveMigrationConfig, approvalStrategy).
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// The most recent migration records of a VM.
    Migrations {
        /// VM name.
        name: String,
    },
    /// Cluster nodes: list, cordon, uncordon, drain (noded joined to a cluster).
    Node {
        #[command(subcommand)]
        command: cluster_ctl::NodeCmd,
    },
    /// The cluster: status, VMs of every node, migrations, configuration.
    Cluster {
        #[command(subcommand)]
        command: cluster_ctl::ClusterCmd,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Create a VM from a YAML or JSON spec.
    Create {
        /// Spec file (`-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List VMs.
    List,
    /// Show one VM.
    Get { name: String },
    /// Change a VM's spec (full spec, same name). A running VM takes runStrategy,
    /// evictionStrategy and terminationGracePeriodSeconds at once; other changes
    /// (machineType, memory, kernel, disks ...) wait for its next restart (restartRequired).
    Update {
        /// Spec file (`-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Start a stopped VM.
    Start { name: String },
    /// Stop a VM (graceful, then forced after terminationGracePeriodSeconds).
    Stop { name: String },
    /// Stop and delete a VM.
    Delete { name: String },
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
}

#[derive(Subcommand)]
enum LauncherCmd {
    /// Install a launcher binary (copied into the state directory).
    Install {
        /// The binary.
        #[arg(long)]
        path: PathBuf,
        /// Release channel: stable, or candidate (only nodes following candidate update
        /// to it).
        #[arg(long, default_value = "stable")]
        channel: String,
        /// Install even if it does not support a machine type in use (those VMs then stay
        /// on their current launcher).
        #[arg(long)]
        force: bool,
    },
    /// List installed launchers.
    List,
}

#[derive(Subcommand)]
enum UpdateCmd {
    /// Approve the pending target version (approvalStrategy Manual).
    Approve,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Show the settings.
    Get,
    /// Merge a YAML or JSON settings document into the settings.
    Set {
        /// Settings file (`-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

struct Client {
    socket: PathBuf,
    from_default: bool,
}

impl Client {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        // Installs run `launcher capabilities`; the rest answer at once.
        let timeout = Duration::from_secs(60);
        match http::request_with_timeout(&self.socket, method, path, body, Some(timeout)) {
            Ok((status, v)) if (200..300).contains(&status) => Ok(v),
            Ok((status, v)) => Err(v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("noded answered {status}"))),
            Err(HttpError::Connect { source, .. }) => Err(format!(
                "cannot reach noded at {} ({source}): is it running? Start it with `noded --state-dir DIR`{}",
                self.socket.display(),
                if self.from_default {
                    " and pass --socket DIR/noded.sock (or set NODED_SOCKET)"
                } else {
                    ""
                }
            )),
            Err(e) => Err(format!("talking to noded at {}: {e}", self.socket.display())),
        }
    }
}

fn read_doc(file: &PathBuf) -> Result<Value, String> {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| format!("stdin: {e}"))?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?
    };
    serde_yaml::from_str(&text).map_err(|e| format!("{}: not YAML or JSON: {e}", file.display()))
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        other => other.to_string(),
    }
}

/// Prints rows as a table with aligned columns (the last column is not padded).
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let mut out = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(&c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn vm_row(v: &Value) -> Vec<String> {
    vec![
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
        v["reason"]
            .as_str()
            .or(v["message"].as_str())
            .unwrap_or("")
            .to_string(),
    ]
}

const VM_HEADERS: &[&str] = &[
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

fn print_yaml(v: &Value) {
    match serde_yaml::to_string(v) {
        Ok(t) => print!("{t}"),
        Err(_) => println!("{v:#}"),
    }
}

fn print_status(v: &Value) {
    println!(
        "targetLauncherVersion:    {}",
        s(&v["targetLauncherVersion"])
    );
    println!(
        "approvedLauncherVersion:  {}",
        s(&v["approvedLauncherVersion"])
    );
    println!("channel:                  {}", s(&v["channel"]));
    println!("approvalStrategy:         {}", s(&v["approvalStrategy"]));
    println!("approvalPending:          {}", s(&v["approvalPending"]));
    println!("workloadUpdateMethods:    {}", v["workloadUpdateMethods"]);
    println!("virtualMachines:          {}", s(&v["virtualMachines"]));
    println!(
        "outdatedVirtualMachineInstanceWorkloads: {}",
        s(&v["outdatedVirtualMachineInstanceWorkloads"])
    );
    if let Some(m) = v["message"].as_str() {
        println!("message:                  {m}");
    }
    if let Some(m) = v["untestedUpdatePath"].as_str() {
        println!("untestedUpdatePath:       {m}");
    }
    println!();
    let rows: Vec<Vec<String>> = v["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    vec![
                        s(&c["type"]),
                        s(&c["status"]),
                        s(&c["reason"]),
                        s(&c["message"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["CONDITION", "STATUS", "REASON", "MESSAGE"], &rows);
}

fn run(cli: Cli) -> Result<(), String> {
    let (socket, from_default) = match (&cli.socket, std::env::var_os("NODED_SOCKET")) {
        (Some(p), _) => (p.clone(), false),
        (None, Some(p)) => (PathBuf::from(p), false),
        (None, None) => (PathBuf::from(DEFAULT_SOCKET), true),
    };
    let c = Client {
        socket,
        from_default,
    };
    let json_out = cli.output == Output::Json;
    match &cli.command {
        Cmd::Node { command } => return cluster_ctl::node(&c, command, json_out),
        Cmd::Cluster { command } => return cluster_ctl::cluster(&c, command, json_out),
        _ => {}
    }
    let v = match &cli.command {
        Cmd::Node { .. } | Cmd::Cluster { .. } => Value::Null,
        Cmd::Vm { command } => match command {
            VmCmd::Create { file } => c.call("POST", "/v1/vms", Some(&read_doc(file)?))?,
            VmCmd::List => c.call("GET", "/v1/vms", None)?,
            VmCmd::Get { name } => c.call("GET", &format!("/v1/vms/{name}"), None)?,
            VmCmd::Update { file } => {
                let spec = read_doc(file)?;
                let name = spec["name"]
                    .as_str()
                    .ok_or_else(|| format!("{}: invalid spec: name: required", file.display()))?
                    .to_string();
                c.call("PUT", &format!("/v1/vms/{name}"), Some(&spec))?
            }
            VmCmd::Start { name } => c.call("PUT", &format!("/v1/vms/{name}/start"), None)?,
            VmCmd::Stop { name } => c.call("PUT", &format!("/v1/vms/{name}/stop"), None)?,
            VmCmd::Delete { name } => c.call("DELETE", &format!("/v1/vms/{name}"), None)?,
            VmCmd::Receive {
                file,
                listen,
                tls_dir,
            } => {
                let abs = std::path::absolute(tls_dir)
                    .map_err(|e| format!("{}: {e}", tls_dir.display()))?;
                let body = json!({ "spec": read_doc(file)?, "listen": listen, "tlsDir": abs });
                c.call("POST", "/v1/vms/receive", Some(&body))?
            }
            VmCmd::Migrate {
                name,
                to,
                tls_dir,
                tls_server_name,
                no_wait,
            } => {
                let abs = std::path::absolute(tls_dir)
                    .map_err(|e| format!("{}: {e}", tls_dir.display()))?;
                let mut body = json!({ "to": to, "tlsDir": abs });
                if let Some(n) = tls_server_name {
                    body["tlsServerName"] = json!(n);
                }
                let mut v = c.call("PUT", &format!("/v1/vms/{name}/migrate"), Some(&body))?;
                while !no_wait && v["phase"] == "MigratingOut" {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    v = c.call("GET", &format!("/v1/vms/{name}"), None)?;
                }
                if !no_wait && v["phase"] != "MovedAway" {
                    return Err(format!(
                        "VM {name} did not move (phase {}): {}",
                        s(&v["phase"]),
                        s(&v["message"])
                    ));
                }
                v
            }
        },
        Cmd::Launcher { command } => match command {
            LauncherCmd::Install {
                path,
                channel,
                force,
            } => {
                let abs =
                    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
                c.call(
                    "POST",
                    "/v1/launchers",
                    Some(&json!({ "path": abs, "channel": channel, "force": force })),
                )?
            }
            LauncherCmd::List => c.call("GET", "/v1/launchers", None)?,
        },
        Cmd::Status => c.call("GET", "/v1/status", None)?,
        Cmd::Update {
            command: UpdateCmd::Approve,
        } => c.call("PUT", "/v1/update/approve", None)?,
        Cmd::Config { command } => match command {
            ConfigCmd::Get => c.call("GET", "/v1/config", None)?,
            ConfigCmd::Set { file } => c.call("PUT", "/v1/config", Some(&read_doc(file)?))?,
        },
        Cmd::Migrations { name } => c.call("GET", &format!("/v1/vms/{name}/migrations"), None)?,
    };
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    match &cli.command {
        Cmd::Vm {
            command: VmCmd::List,
        } => {
            let rows: Vec<_> = v
                .as_array()
                .map(|a| a.iter().map(vm_row).collect())
                .unwrap_or_default();
            table(VM_HEADERS, &rows);
        }
        Cmd::Vm {
            command: VmCmd::Get { .. } | VmCmd::Create { .. } | VmCmd::Update { .. },
        } => print_yaml(&v),
        Cmd::Vm {
            command:
                VmCmd::Start { .. } | VmCmd::Stop { .. } | VmCmd::Receive { .. } | VmCmd::Migrate { .. },
        } => table(VM_HEADERS, &[vm_row(&v)]),
        Cmd::Vm {
            command: VmCmd::Delete { name },
        } => {
            if v.get("deleting").is_some() {
                println!("VM {name} is stopping and will then be deleted");
            } else {
                println!("VM {name} deleted");
            }
        }
        Cmd::Launcher { command } => {
            let list = match command {
                LauncherCmd::List => v.as_array().cloned().unwrap_or_default(),
                LauncherCmd::Install { .. } => vec![v.clone()],
            };
            let rows: Vec<_> = list
                .iter()
                .map(|l| {
                    vec![
                        s(&l["version"]),
                        s(&l["channel"]),
                        s(&l["target"]),
                        s(&l["approved"]),
                        s(&l["installedAt"]),
                        l["machineTypes"]
                            .as_array()
                            .map(|m| m.iter().map(s).collect::<Vec<_>>().join(","))
                            .unwrap_or_default(),
                        s(&l["path"]),
                    ]
                })
                .collect();
            table(
                &[
                    "VERSION",
                    "CHANNEL",
                    "TARGET",
                    "APPROVED",
                    "INSTALLED",
                    "MACHINE-TYPES",
                    "PATH",
                ],
                &rows,
            );
        }
        Cmd::Status | Cmd::Update { .. } => print_status(&v),
        Cmd::Config { .. } => {
            if let Some(w) = v["warning"].as_str() {
                eprintln!("nodectl: warning: {w}");
            }
            print_yaml(&v)
        }
        Cmd::Node { .. } | Cmd::Cluster { .. } => {}
        Cmd::Migrations { .. } => {
            let rows: Vec<_> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|m| {
                            let r = &m["report"];
                            vec![
                                s(&m["startedAt"]),
                                s(&m["finishedAt"]),
                                s(&m["outcome"]),
                                s(&m["sourceVersion"]),
                                s(&m["targetVersion"]),
                                // Records from before the camelCase report too.
                                s(first(&r["downtimeMs"], &r["downtime_ms"])),
                                s(first(&r["totalMs"], &r["total_ms"])),
                                r["error"].as_str().unwrap_or("").to_string(),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(
                &[
                    "STARTED",
                    "FINISHED",
                    "OUTCOME",
                    "FROM",
                    "TO",
                    "DOWNTIME-MS",
                    "TOTAL-MS",
                    "ERROR",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodectl: {e}");
            ExitCode::from(1)
        }
    }
}

/// `a`, or `b` when `a` is absent.
fn first<'a>(a: &'a Value, b: &'a Value) -> &'a Value {
    if a.is_null() {
        b
    } else {
        a
    }
}

//! `nodectl`: the command line for noded, with kubectl's habits: `-o
//! table|wide|json|yaml|name` on every read, `-w` to stream changes, `--dry-run`,
//! `--wait`, `vm describe`, and shell completion and man pages.
//!
//! One module per subcommand group ([`vm`], [`launcher`], [`node_status`], [`cluster`]); a new group
//! adds a variant to [`Cmd`] and a module. Errors are one line on stderr and exit
//! status 1; a closed stdout (`nodectl ... | head -1`) ends nodectl quietly, as any
//! Unix tool.

pub mod client;
pub mod cluster;
pub mod completion;
pub mod launcher;
pub mod node_status;
pub mod output;
pub mod vm;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

use client::Client;
use output::Output;

const DEFAULT_SOCKET: &str = "/var/lib/noded/noded.sock";

/// The command line.
#[derive(Parser)]
#[command(name = "nodectl", version = env!("CARGO_PKG_VERSION"), about = "Control noded: VMs, launchers, updates")]
pub struct Cli {
    /// noded's API socket [env: NODED_SOCKET; default /var/lib/noded/noded.sock].
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The command.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommand groups.
#[derive(Subcommand)]
pub enum Cmd {
    /// Virtual machines.
    Vm {
        /// What to do.
        #[command(subcommand)]
        command: vm::VmCmd,
    },
    /// Launcher binaries.
    Launcher {
        /// What to do.
        #[command(subcommand)]
        command: launcher::LauncherCmd,
    },
    /// Node status: target version, approval, outdated VMs, conditions.
    Status {
        /// Stream changes until interrupted.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Updates.
    Update {
        /// What to do.
        #[command(subcommand)]
        command: node_status::UpdateCmd,
    },
    /// Node settings (workloadUpdateStrategy, liveMigrationConfig, approvalStrategy).
    Config {
        /// What to do.
        #[command(subcommand)]
        command: node_status::ConfigCmd,
    },
    /// The most recent migration records of a VM.
    Migrations {
        /// VM name.
        name: String,
        /// Stream new and changed records until interrupted.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Cluster nodes: list, cordon, uncordon, drain (noded joined to a cluster).
    Node {
        /// What to do.
        #[command(subcommand)]
        command: cluster::NodeCmd,
    },
    /// The cluster: status, VMs of every node, migrations, configuration.
    Cluster {
        /// What to do.
        #[command(subcommand)]
        command: cluster::ClusterCmd,
    },
    /// Print a shell completion script: `source <(nodectl completion bash)`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (nodectl.1, nodectl-vm.1, ...) into a directory.
    Man {
        /// The directory (created if needed).
        dir: PathBuf,
    },
}

/// What every command gets.
pub struct Ctx {
    /// noded.
    pub client: Client,
    /// `-o`.
    pub output: Output,
}

/// Parses a `--timeout` value: a Go-style duration (`90s`, `5m`, `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (use e.g. 90s, 5m): {e}"))
}

/// Reads a YAML or JSON document from a file, or stdin for `-`.
pub fn read_doc(file: &PathBuf) -> Result<Value, String> {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| format!("stdin: {e}"))?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?
    };
    serde_norway::from_str(&text).map_err(|e| format!("{}: not YAML or JSON: {e}", file.display()))
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), String> {
    let (socket, from_default) = match (&cli.socket, std::env::var_os("NODED_SOCKET")) {
        (Some(p), _) => (p.clone(), false),
        (None, Some(p)) => (PathBuf::from(p), false),
        (None, None) => (PathBuf::from(DEFAULT_SOCKET), true),
    };
    let ctx = Ctx {
        client: Client {
            socket,
            from_default,
        },
        output: cli.output,
    };
    match cli.command {
        Cmd::Vm { command } => vm::run(&ctx, command).await,
        Cmd::Launcher { command } => launcher::run(&ctx, command).await,
        Cmd::Status { watch } => node_status::status(&ctx, watch).await,
        Cmd::Update { command } => node_status::update(&ctx, command).await,
        Cmd::Config { command } => node_status::config(&ctx, command).await,
        Cmd::Migrations { name, watch } => node_status::migrations(&ctx, &name, watch).await,
        Cmd::Node { command } => {
            cluster::node(&ctx.client, &command, ctx.output == Output::Json).await
        }
        Cmd::Cluster { command } => {
            cluster::cluster(&ctx.client, &command, ctx.output == Output::Json).await
        }
        Cmd::Completion { shell } => {
            completion::completion(shell);
            Ok(())
        }
        Cmd::Man { dir } => completion::man(&dir),
    }
}

/// Restores the default SIGPIPE action, so that writing to a closed pipe ends nodectl
/// quietly (as `head`, `grep -q` expect) instead of panicking in `println!`.
pub fn default_sigpipe() {
    // SAFETY: setting a signal disposition to SIG_DFL at startup, before any thread
    // exists, has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

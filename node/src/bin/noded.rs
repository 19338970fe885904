//! `noded`: the node daemon. Keeps the VMs it is given running, one launcher process per
//! VM, and moves them to newly installed launcher versions (see docs/update-flow.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use node::daemon::{run, Options};

#[derive(Parser)]
#[command(name = "noded", version = env!("CARGO_PKG_VERSION"), about = "Node daemon and launcher update coordinator")]
struct Cli {
    /// State directory (database, installed launchers, VM logs and sockets).
    #[arg(long)]
    state_dir: PathBuf,
    /// API socket [default: STATE_DIR/noded.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Settings file (YAML or JSON), merged over the stored settings at startup.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NODED_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let state_dir = match std::path::absolute(&cli.state_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("noded: {}: {e}", cli.state_dir.display());
            return ExitCode::from(1);
        }
    };
    let socket = cli.socket.unwrap_or_else(|| state_dir.join("noded.sock"));
    let opts = Options {
        state_dir,
        socket,
        config: cli.config,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("noded: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("noded: {e}");
            ExitCode::from(1)
        }
    }
}

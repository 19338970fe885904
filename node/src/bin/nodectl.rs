//! `nodectl`: the command line for noded (see `node::ctl`). Errors are one line on
//! stderr and exit status 1.

use std::process::ExitCode;

use clap::Parser;
use node::ctl::{default_sigpipe, run, Cli};

fn main() -> ExitCode {
    default_sigpipe();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodectl: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodectl: {e}");
            ExitCode::from(1)
        }
    }
}

//! `nodectl`: the command line for noded (see `node::ctl`). Errors are one line on
//! stderr and exit status 1.

use std::process::ExitCode;

use clap::Parser;
use node::ctl::{default_sigpipe, run, Cli};

fn main() -> ExitCode {
    default_sigpipe();
    let cli = Cli::parse();
    node::block_on_main(
        "nodectl",
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        run(cli),
    )
}

//! `launcher migrate`: start a migration through a launcher's API and report it.

use clap::Args;

use crate::launch::LaunchError;

/// Arguments of `launcher migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// API socket of the launcher whose VM moves.
    #[arg(long)]
    pub api_socket: std::path::PathBuf,
    /// Destination: unix:PATH or tcp:HOST:PORT (a launcher started with --incoming).
    #[arg(long)]
    pub to: String,
}

/// Run the command; returns the exit status.
pub fn run(_args: &MigrateArgs) -> Result<i32, LaunchError> {
    Err(LaunchError::Migration("not wired yet".into()))
}

//! `launcher status|pause|resume|shutdown|migrate-status|migrate-cancel --api-socket S`:
//! one call each to a running launcher's API, as `ch-remote` does for Cloud Hypervisor.
//! The reply is printed as one JSON object on stdout; a refusal is one line on stderr
//! and exit status 1.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::launch::LaunchError;
use contracts::http;

/// The socket every API subcommand needs.
#[derive(Args, Debug)]
pub struct ApiArgs {
    /// The launcher's API socket (its `run --api-socket`).
    #[arg(long)]
    pub api_socket: PathBuf,
}

/// The API subcommands.
#[derive(Subcommand, Debug)]
pub enum ApiCmd {
    /// Print the VM's state (running or paused, vCPUs, memory, version).
    Status(ApiArgs),
    /// Pause the VM's vCPUs.
    Pause(ApiArgs),
    /// Resume a paused VM.
    Resume(ApiArgs),
    /// Stop the VM and end the launcher.
    Shutdown(ApiArgs),
    /// Print the progress of the migration in flight.
    MigrateStatus(ApiArgs),
    /// Cancel the migration in flight (the VM keeps running here).
    MigrateCancel(ApiArgs),
}

impl ApiCmd {
    fn request(&self) -> (&ApiArgs, &'static str, &'static str) {
        match self {
            ApiCmd::Status(a) => (a, "GET", "/v1/status"),
            ApiCmd::Pause(a) => (a, "PUT", "/v1/pause"),
            ApiCmd::Resume(a) => (a, "PUT", "/v1/resume"),
            ApiCmd::Shutdown(a) => (a, "PUT", "/v1/shutdown"),
            ApiCmd::MigrateStatus(a) => (a, "GET", "/v1/migrate"),
            ApiCmd::MigrateCancel(a) => (a, "PUT", "/v1/migrate/cancel"),
        }
    }
}

/// Runs one API subcommand; returns the exit status.
pub fn run(cmd: &ApiCmd) -> Result<i32, LaunchError> {
    let (args, method, path) = cmd.request();
    let socket = &args.api_socket;
    let (status, reply) =
        http::request(socket, method, path, None).map_err(|e| LaunchError::Api {
            path: socket.display().to_string(),
            why: format!(
                "{e} (is a launcher running with --api-socket {}?)",
                socket.display()
            ),
        })?;
    if !(200..300).contains(&status) {
        let msg = reply
            .get("error")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        return Err(LaunchError::Api {
            path: socket.display().to_string(),
            why: format!("{method} {path} refused: {msg}"),
        });
    }
    println!("{reply}");
    Ok(0)
}

//! `nodectl launcher ...`.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{json, Value};

use super::output::{print_structured, s, table, Output};
use super::Ctx;

/// `nodectl launcher` subcommands.
#[derive(Subcommand)]
pub enum LauncherCmd {
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

fn print_launchers(o: Output, list: &[Value]) {
    if print_structured(o, "launcher", &Value::Array(list.to_vec())) {
        return;
    }
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

/// Runs a `launcher` subcommand.
pub async fn run(ctx: &Ctx, cmd: LauncherCmd) -> Result<(), String> {
    let c = &ctx.client;
    match cmd {
        LauncherCmd::Install {
            path,
            channel,
            force,
        } => {
            let abs = std::path::absolute(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let v = c
                .call(
                    "POST",
                    "/v1/launchers",
                    Some(&json!({ "path": abs, "channel": channel, "force": force })),
                )
                .await?;
            if ctx.output == Output::Json {
                // One object, as before (scripts read the installed launcher).
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(());
            }
            print_launchers(ctx.output, std::slice::from_ref(&v));
            if ctx.output.tabular() {
                // Say what happens next: an update starts, or waits for approval.
                let st = c.call("GET", "/v1/status", None).await?;
                let outdated = st["outdatedVirtualMachineInstanceWorkloads"]
                    .as_u64()
                    .unwrap_or(0);
                if st["approvalPending"] == true {
                    println!(
                        "\nLauncher {} waits for approval: nodectl update approve",
                        s(&v["version"])
                    );
                } else if outdated > 0 && v["target"] == true {
                    println!(
                        "\nUpdate started: {outdated} VM(s) move to launcher {}. Follow it with: nodectl update watch",
                        s(&v["version"])
                    );
                }
            }
            Ok(())
        }
        LauncherCmd::List => {
            let v = c.call("GET", "/v1/launchers", None).await?;
            print_launchers(ctx.output, v.as_array().map(Vec::as_slice).unwrap_or(&[]));
            Ok(())
        }
    }
}

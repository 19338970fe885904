//! `launcher migrate`: start a migration through a launcher's API, show its
//! progress, and print the report as one JSON object on stdout.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use crate::launch::LaunchError;
use contracts::http;

/// Arguments of `launcher migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// API socket of the launcher whose VM moves.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// Destination: unix:PATH or tcp:HOST:PORT (a launcher started with --incoming).
    #[arg(long)]
    pub to: String,
    /// Same host: hand guest memory over as file descriptors instead of copying it.
    #[arg(long)]
    pub local: bool,
    /// Longest acceptable pause, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Bandwidth cap in bytes per second (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub max_bandwidth: u64,
    /// Throttle the vCPUs when the guest dirties memory faster than the link drains.
    #[arg(long)]
    pub auto_converge: bool,
    /// Give up after this many seconds per GiB of guest memory (0 = never).
    #[arg(long, default_value_t = 150)]
    pub completion_timeout_per_gib: u64,
    /// Give up after this many seconds without the remaining bytes shrinking (0 = never).
    #[arg(long, default_value_t = 150)]
    pub progress_timeout: u64,
    /// TLS for a tcp: destination: a directory with ca.pem, cert.pem and key.pem.
    #[arg(long, conflicts_with = "insecure")]
    pub tls_dir: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the HOST of --to).
    #[arg(long, requires = "tls_dir")]
    pub tls_server_name: Option<String>,
    /// Allow plain, unauthenticated and unencrypted TCP to a tcp: destination.
    #[arg(long)]
    pub insecure: bool,
}

fn api_err(socket: &std::path::Path, e: impl std::fmt::Display) -> LaunchError {
    LaunchError::Api {
        path: socket.display().to_string(),
        why: format!(
            "{e} (is a launcher running with --api-socket {}?)",
            socket.display()
        ),
    }
}

/// Run the command; returns the exit status (0 only when the migration completed).
pub fn run(args: &MigrateArgs) -> Result<i32, LaunchError> {
    let body = json!({
        "to": args.to,
        "local": args.local,
        "downtimeMs": args.downtime_ms,
        "maxBandwidth": args.max_bandwidth,
        "autoConverge": args.auto_converge,
        "completionTimeoutPerGib": args.completion_timeout_per_gib,
        "progressTimeout": args.progress_timeout,
        "insecure": args.insecure,
    });
    let mut body = body;
    if let Some(dir) = &args.tls_dir {
        // The source launcher reads the files: give it a path that does not depend on
        // our working directory.
        let dir = std::path::absolute(dir)
            .map_err(|e| LaunchError::Usage(format!("--tls-dir {}: {e}", dir.display())))?;
        body["tlsDir"] = json!(dir.display().to_string());
    }
    if let Some(name) = &args.tls_server_name {
        body["tlsServerName"] = json!(name);
    }
    // Fail fast with a clear message when nobody listens on the socket.
    http::request(&args.api_socket, "GET", "/v1/status", None)
        .map_err(|e| api_err(&args.api_socket, e))?;
    let socket = args.api_socket.clone();
    let call = std::thread::spawn(move || {
        http::request_with_timeout(&socket, "PUT", "/v1/migrate", Some(&body), None)
    });
    let tty = std::io::stderr().is_terminal();
    let mut last_iter = None;
    while !call.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok((200, p)) = http::request(&args.api_socket, "GET", "/v1/migrate", None) {
            show_progress(&p, tty, &mut last_iter);
        }
    }
    if tty && last_iter.is_some() {
        eprintln!();
    }
    let (status, report) = call
        .join()
        .map_err(|_| LaunchError::Migration("the request thread panicked".into()))?
        .map_err(|e| api_err(&args.api_socket, e))?;
    println!("{report}");
    let completed = report.get("status").and_then(Value::as_str) == Some("completed");
    if !completed {
        let msg = report
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        eprintln!("launcher: migration did not complete (HTTP {status}): {msg}");
    }
    Ok(if completed { 0 } else { 1 })
}

fn show_progress(p: &Value, tty: bool, last_iter: &mut Option<u64>) {
    let Some(iter) = p.get("iteration").and_then(Value::as_u64) else {
        return;
    };
    let mib = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0) as f64 / (1 << 20) as f64;
    let line = format!(
        "iteration {iter}: sent {:.1} MiB, remaining {:.1} MiB, {:.0} MiB/s, expected downtime {}, throttle {}%",
        mib("transferredBytes"),
        mib("remainingBytes"),
        mib("bandwidthBytesPerS"),
        p.get("expectedDowntimeMs")
            .and_then(Value::as_f64)
            .map(|d| format!("{d:.1} ms"))
            .unwrap_or_else(|| "unknown".into()),
        p.get("throttlePercent").and_then(Value::as_u64).unwrap_or(0),
    );
    if *last_iter == Some(iter) {
        return;
    }
    *last_iter = Some(iter);
    if tty {
        eprint!("\r\x1b[2K{line}");
    } else {
        eprintln!("{line}");
    }
}

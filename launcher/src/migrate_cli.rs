//! `launcher migrate`: start a migration through a launcher's API, show its
//! progress, and print the report as one JSON object on stdout.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use contracts::http;
use contracts::launcher::{to_json, MigrateRequest, MigrationProgress};
use contracts::report::{Report, Verdict};

use crate::launch::LaunchError;

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
    #[arg(long, default_value_t = contracts::launcher::DEFAULT_DOWNTIME_MS)]
    pub downtime_ms: u64,
    /// Bandwidth cap in bytes per second, as a Kubernetes quantity (16Mi, 100M; 0 =
    /// unlimited).
    #[arg(long, default_value = "0", value_parser = parse_bandwidth)]
    pub max_bandwidth: u64,
    /// Throttle the vCPUs when the guest dirties memory faster than the link drains.
    #[arg(long)]
    pub auto_converge: bool,
    /// Give up after this many seconds per GiB of guest memory (0 = never).
    #[arg(long, default_value_t = contracts::launcher::DEFAULT_COMPLETION_TIMEOUT_PER_GIB_S)]
    pub completion_timeout_per_gib: u64,
    /// Give up after this many seconds without the remaining bytes shrinking (0 = never).
    #[arg(long, default_value_t = contracts::launcher::DEFAULT_PROGRESS_TIMEOUT_S)]
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

fn parse_bandwidth(s: &str) -> Result<u64, String> {
    contracts::quantity::parse(s).map_err(|e| e.to_string())
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

impl MigrateArgs {
    /// The `PUT /v1/migrate` request these options stand for. The TLS directory is made
    /// absolute: the source launcher reads the files, not this process.
    pub fn request(&self) -> Result<MigrateRequest, LaunchError> {
        let tls_dir = match &self.tls_dir {
            Some(dir) => Some(
                std::path::absolute(dir)
                    .map_err(|e| LaunchError::Usage(format!("--tls-dir {}: {e}", dir.display())))?
                    .display()
                    .to_string(),
            ),
            None => None,
        };
        Ok(MigrateRequest {
            to: self.to.clone(),
            local: self.local,
            downtime_ms: Some(self.downtime_ms),
            max_bandwidth: Some(self.max_bandwidth),
            auto_converge: self.auto_converge,
            completion_timeout_per_gib: Some(self.completion_timeout_per_gib),
            progress_timeout: Some(self.progress_timeout),
            tls_dir,
            tls_server_name: self.tls_server_name.clone(),
            insecure: self.insecure,
        })
    }
}

/// Run the command; returns the exit status (0 only when the migration completed).
pub fn run(args: &MigrateArgs) -> Result<i32, LaunchError> {
    let body = to_json(&args.request()?);
    // Fail fast with a clear message when nobody listens on the socket.
    http::request(&args.api_socket, "GET", "/v1/status", None)
        .map_err(|e| api_err(&args.api_socket, e))?;
    let socket = args.api_socket.clone();
    let call = std::thread::spawn(move || {
        http::request_with_timeout(&socket, "PUT", "/v1/migrate", Some(&body), None)
    });
    // On a terminal: a progress bar (indicatif); otherwise one line per iteration.
    let bar = std::io::stderr().is_terminal().then(progress_bar);
    let mut last_iter = None;
    while !call.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok((200, p)) = http::request(&args.api_socket, "GET", "/v1/migrate", None) {
            if let Ok(p) = serde_json::from_value::<MigrationProgress>(p) {
                show_progress(&p, bar.as_ref(), &mut last_iter);
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let (status, answer) = call
        .join()
        .map_err(|_| LaunchError::Migration("the request thread panicked".into()))?
        .map_err(|e| api_err(&args.api_socket, e))?;
    println!("{answer}");
    let verdict = match serde_json::from_value::<Report>(answer.clone()) {
        Ok(r) => r.verdict(status),
        Err(_) => Verdict::Failed(
            answer
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("the launcher's answer is not a migration report")
                .to_string(),
        ),
    };
    match verdict {
        Verdict::Completed => Ok(0),
        Verdict::Failed(msg) | Verdict::Cancelled(msg) | Verdict::Unknown(msg) => {
            eprintln!("launcher: migration did not complete (HTTP {status}): {msg}");
            Ok(1)
        }
    }
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// On a terminal: the bar (this iteration's sent bytes out of sent plus remaining);
/// otherwise one line per iteration.
fn show_progress(
    p: &MigrationProgress,
    bar: Option<&indicatif::ProgressBar>,
    last_iter: &mut Option<u64>,
) {
    let Some(iter) = p.iteration else {
        return;
    };
    let downtime = p
        .expected_downtime_ms
        .map(|d| format!("{d:.1} ms"))
        .unwrap_or_else(|| "unknown".into());
    if let Some(b) = bar {
        let sent = p.transferred_bytes.unwrap_or(0);
        b.set_length(sent + p.remaining_bytes.unwrap_or(0));
        b.set_position(sent);
        b.set_message(format!(
            "iteration {iter}, expected downtime {downtime}, throttle {}%",
            p.throttle_percent.unwrap_or(0)
        ));
        return;
    }
    if *last_iter == Some(iter) {
        return;
    }
    *last_iter = Some(iter);
    let mib = |v: Option<u64>| v.unwrap_or(0) as f64 / (1 << 20) as f64;
    eprintln!(
        "iteration {iter}: sent {:.1} MiB, remaining {:.1} MiB, {:.0} MiB/s, expected downtime {downtime}, throttle {}%",
        mib(p.transferred_bytes),
        mib(p.remaining_bytes),
        mib(p.bandwidth_bytes_per_s),
        p.throttle_percent.unwrap_or(0),
    );
}

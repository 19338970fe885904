//! The `launcher` process: one VM, its control API, snapshots and migrations.
//!
//! [`runtime::Runtime`] owns the VM and its lifecycle state; the main thread
//! waits for the VM to end, the API thread ([`api`]) serves the control socket,
//! and a migration runs on the API thread that received the request, holding
//! the pause guard for the switch-over.

pub mod api;
pub mod lifecycle;
pub mod runtime;
pub mod seccomp;
pub mod signals;

/// The launcher version, stamped at build time from `LAUNCHER_VERSION`.
pub const VERSION: &str = env!("LAUNCHER_VERSION");

/// Exit status of a launcher whose VM was migrated away (it now runs elsewhere).
pub const EXIT_MIGRATED: i32 = 64;

/// Errors of the launcher process.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A command-line value is wrong.
    #[error("{0}")]
    Usage(String),
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    File {
        /// What we were doing.
        what: &'static str,
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The VM could not be created or continued.
    #[error(transparent)]
    Machine(#[from] vmm::MachineError),
    /// A snapshot could not be read or written.
    #[error(transparent)]
    Snapshot(#[from] vmm::snapshot::SnapshotError),
    /// The API socket.
    #[error("API socket {path}: {why}")]
    Api {
        /// The socket path.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migration(String),
}

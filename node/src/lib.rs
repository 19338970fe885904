//! noded, the node daemon, and the pieces nodectl shares with it. The launcher is a
//! separate program: noded starts it and talks to it only through the `contracts` crate.
//!
//! Layout: [`spec`] (VM specs), [`settings`] (coordinator settings), [`launchers`]
//! (installed launcher binaries, channels), [`coordinator`] (pure decisions),
//! [`vm_state`] (per-VM states, runStrategy), [`store`] (SQLite), [`supervisor`]
//! (launcher processes), [`daemon`] (the reconciliation loop), [`adopt`] (adoption after
//! a restart), [`requests`] (what the loop answers), [`status`] (node status and
//! metrics), [`api`] (the HTTP API), [`views`] (the JSON shapes the API returns),
//! [`metrics`], [`remote`] (live migration to and from another node), [`dry_run`]
//! (checks before acting, `?dryRun`), [`events`] (per-VM events for `vm describe`),
//! [`watch`] (`?watch=true` streams), [`ctl`] (nodectl).

pub mod adopt;
pub mod api;
pub mod cluster;
pub mod coordinator;
pub mod ctl;
pub mod daemon;
pub mod dry_run;
pub mod events;
pub mod fencing;
pub mod handover;
pub mod launchers;
pub mod metrics;
pub mod remote;
pub mod requests;
pub mod settings;
pub mod spec;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod views;
pub mod vm_state;
pub mod watch;

/// Runs a program's async main on a tokio runtime and turns its outcome into the exit
/// status: 0, or 1 with `PROGRAM: error` on stderr (also when the runtime cannot start).
pub fn block_on_main<E: std::fmt::Display>(
    program: &str,
    runtime: std::io::Result<tokio::runtime::Runtime>,
    main: impl std::future::Future<Output = Result<(), E>>,
) -> std::process::ExitCode {
    let rt = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

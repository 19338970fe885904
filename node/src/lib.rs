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

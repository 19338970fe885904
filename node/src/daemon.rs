//! The reconciliation loop: the single owner of every VM's state machine.
//!
//! API handlers only send it [`Command`]s; process watchers and jobs send it
//! [`Event`]s; a timer makes it re-plan. Each step writes the new state to the store
//! *before* acting on it, so a daemon killed at any instant restarts into a state it can
//! reconcile ([`Daemon::adopt`]).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::coordinator::{
    after_exit, migration_backoff_ms, plan, BatchWindow, ExitKind, Inputs, Millis, Plan, StopCause,
    Target, VmInput, VmState,
};
use super::launchers::{compare_versions, InstalledLauncher};
use super::metrics::Counters;
use super::settings::{ApprovalStrategy, NodeSettings, SettingsError};
use super::spec::VmSpec;
use super::store::{Store, StoreError};
use super::supervisor::{self, Event, MigrationJob, MigrationResult};
use super::views::now_ms;
use super::{api, requests};

/// Startup failures of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The `--config` file.
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        source: SettingsError,
    },
    /// File system trouble.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Another noded serves the socket.
    #[error("another noded is already serving {0}")]
    SocketInUse(String),
    /// Unix socket paths are limited to 107 bytes.
    #[error("path too long for a unix socket (max 107 bytes): {0}")]
    PathTooLong(String),
    /// Another noded uses the state directory (through another socket).
    #[error("another noded ({holder}) already uses the state directory {dir}: stop it first, or give this one another --state-dir")]
    StateDirInUse {
        /// The state directory.
        dir: String,
        /// Who holds it, as its lock file says.
        holder: String,
    },
}

/// Takes the state directory's lock (`noded.lock`, an exclusive `flock`), held for as long
/// as the returned value lives: two nodeds on one state directory would both supervise
/// (and restart, and migrate) the same launchers. The holder's pid is written into the
/// file for the message a second noded gives.
pub fn lock_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("noded.lock");
    let io = |source| DaemonError::Io {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0).map_err(io)?;
            lock.rewind().map_err(io)?;
            write!(lock, "pid {}", std::process::id()).map_err(io)?;
            Ok(lock)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Err(DaemonError::StateDirInUse {
                dir: dir.display().to_string(),
                holder: if holder.trim().is_empty() {
                    "pid unknown".into()
                } else {
                    holder.trim().to_string()
                },
            })
        }
        Err((_, e)) => Err(io(std::io::Error::from(e))),
    }
}

/// Command-line options of `noded`.
#[derive(Debug, Clone)]
pub struct Options {
    /// State directory.
    pub state_dir: PathBuf,
    /// API socket.
    pub socket: PathBuf,
    /// Settings file merged over the stored settings at startup.
    pub config: Option<PathBuf>,
    /// Join an etcd cluster (`--cluster-endpoints` and the options that go with it).
    pub cluster: Option<crate::cluster::ClusterOptions>,
    /// Also serve `/metrics` over TCP here (`--metrics-address`).
    pub metrics_address: Option<std::net::SocketAddr>,
}

/// A request from the API, with the channel for its reply.
pub struct Command {
    /// What is asked.
    pub req: requests::Req,
    /// Where the answer goes.
    pub reply: oneshot::Sender<requests::Reply>,
}

/// One VM in memory.
pub(crate) struct Vm {
    pub(crate) spec: VmSpec,
    pub(crate) status: super::coordinator::VmStatus,
    pub(crate) serial_log: PathBuf,
    pub(crate) created_at: Millis,
    /// When the current launcher started (for crash-loop timing).
    pub(crate) launched_at: Millis,
    /// Exit of the source launcher seen during a migration, applied when it ends.
    pub(crate) source_exit: Option<ExitKind>,
    /// Exit of the target launcher seen during a migration.
    pub(crate) target_exit: Option<ExitKind>,
}

/// The loop's state.
pub struct Daemon {
    pub(crate) dir: PathBuf,
    pub(crate) store: Store,
    pub(crate) settings: NodeSettings,
    /// Sorted by version, oldest first.
    pub(crate) launchers: Vec<InstalledLauncher>,
    pub(crate) approved: Option<String>,
    pub(crate) batch: BatchWindow,
    pub(crate) vms: BTreeMap<String, Vm>,
    pub(crate) counters: Counters,
    pub(crate) events: mpsc::UnboundedSender<Event>,
    /// In a cluster, the VMs the leader allows to be updated now (same-node handover or
    /// eviction for an update); `None` on a single node, where the node decides alone.
    pub(crate) grants: Option<BTreeSet<String>>,
    /// In a cluster, what the node last knew of it (`/v1/status`, metrics).
    pub(crate) cluster_status: Option<serde_json::Value>,
    /// In a cluster, nothing starts while the lease is not surely alive (fencing.rs).
    pub(crate) held: bool,
    /// This node fenced itself, and why; nothing starts until it rejoined (fencing.rs).
    pub(crate) fenced: Option<String>,
    /// In a cluster, the watchdog file every launcher is started with.
    pub(crate) watchdog: Option<PathBuf>,
}

/// Longest path a unix socket may have.
pub const MAX_SOCKET_PATH: usize = 107;

impl Daemon {
    /// Opens the state directory and loads everything.
    pub fn open(
        opts: &Options,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Daemon, DaemonError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| DaemonError::Io { path: p, source }
        };
        for d in [
            opts.state_dir.clone(),
            opts.state_dir.join("vms"),
            opts.state_dir.join("launchers"),
        ] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        std::fs::set_permissions(&opts.state_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&opts.state_dir))?;
        let store = Store::open(&opts.state_dir.join("state.db"))?;
        store.init_events()?;
        let mut settings: NodeSettings = store.get("settings")?.unwrap_or_default();
        if let Some(path) = &opts.config {
            let text = std::fs::read_to_string(path).map_err(io(path))?;
            settings = super::settings::apply_text(&settings, &text).map_err(|source| {
                DaemonError::Config {
                    path: path.display().to_string(),
                    source,
                }
            })?;
        }
        store.set("settings", &settings)?;
        let mut launchers = store.launchers()?;
        launchers.sort_by(|a, b| compare_versions(&a.version, &b.version));
        let approved = store.get("approved")?;
        let batch = store.get("batch")?.unwrap_or_default();
        let now = now_ms();
        let vms = store
            .load_vms()?
            .into_iter()
            .map(|r| {
                (
                    r.spec.name.clone(),
                    Vm {
                        spec: r.spec,
                        status: r.status,
                        serial_log: PathBuf::from(r.serial_log),
                        created_at: r.created_at,
                        launched_at: now,
                        source_exit: None,
                        target_exit: None,
                    },
                )
            })
            .collect();
        Ok(Daemon {
            dir: opts.state_dir.clone(),
            store,
            settings,
            launchers,
            approved,
            batch,
            vms,
            counters: Counters::default(),
            events,
            grants: None,
            cluster_status: None,
            held: false,
            fenced: None,
            watchdog: None,
        })
    }

    /// Whether a launcher is on a channel this node follows (only those become targets).
    pub(crate) fn on_channel(&self, l: &InstalledLauncher) -> bool {
        self.settings.channel.follows(l.channel)
    }

    /// The newest installed launcher of the node's channel: what VMs are measured against.
    pub(crate) fn newest(&self) -> Option<&InstalledLauncher> {
        self.launchers.iter().rev().find(|l| self.on_channel(l))
    }

    /// The launcher VMs are moved to and started on: the newest, or under Manual approval
    /// the last approved one.
    pub(crate) fn effective(&self) -> Option<&InstalledLauncher> {
        match self.settings.approval_strategy {
            ApprovalStrategy::Automatic => self.newest(),
            // The newest launcher of the channel not newer than the approved version (the
            // approved one itself unless the node left its channel), so that a channel
            // switch never promotes an unapproved version; nothing approved yet (first
            // install): the newest.
            ApprovalStrategy::Manual => match &self.approved {
                Some(a) => self
                    .launchers
                    .iter()
                    .rev()
                    .find(|l| {
                        self.on_channel(l) && compare_versions(&l.version, a) != Ordering::Greater
                    })
                    .or_else(|| self.newest()),
                None => self.newest(),
            },
        }
    }

    /// A newer launcher waits for approval.
    pub(crate) fn approval_pending(&self) -> bool {
        match (self.effective(), self.newest()) {
            (Some(e), Some(n)) => e.version != n.version,
            _ => false,
        }
    }

    pub(crate) fn launcher(&self, version: &str) -> Option<&InstalledLauncher> {
        self.launchers.iter().find(|l| l.version == version)
    }

    /// The planner's view of an installed launcher.
    pub(crate) fn planner_view(&self, l: &InstalledLauncher) -> Target {
        Target {
            version: l.version.clone(),
            machine_types: l.capabilities.machine_types.clone(),
            migration_protocol: l.capabilities.migration_protocol,
            on_channel: self.on_channel(l),
        }
    }

    /// The coordinator's plan for the current state (pure; nothing is executed).
    pub(crate) fn plan(&self, now: Millis) -> Plan {
        let target = self.effective().map(|l| self.planner_view(l));
        let launchers: Vec<Target> = self
            .launchers
            .iter()
            .map(|l| self.planner_view(l))
            .collect();
        let newest = self.newest().map(|l| l.version.clone());
        let inp = Inputs {
            now,
            settings: &self.settings,
            newest: newest.as_deref(),
            target: target.as_ref(),
            approval_pending: self.approval_pending(),
            batch: self.batch,
            launchers: &launchers,
            channel: self.settings.channel.as_str(),
            vms: self
                .vms
                .values()
                .map(|v| VmInput {
                    spec: &v.spec,
                    status: &v.status,
                })
                .collect(),
        };
        plan(&inp)
    }

    pub(crate) fn vm_dir(&self, name: &str) -> PathBuf {
        self.dir.join("vms").join(name)
    }

    /// Writes a VM's status; on failure the caller must not act.
    pub(crate) fn persist(&self, name: &str) -> bool {
        let Some(vm) = self.vms.get(name) else {
            return false;
        };
        match self.store.update_status(name, &vm.status, now_ms()) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(vm = name, error = %e, "cannot record state; not acting");
                false
            }
        }
    }

    /// Re-plans and executes the actions.
    pub fn reconcile(&mut self) {
        let now = now_ms();
        let p = self.plan(now);
        if p.batch != self.batch {
            self.batch = p.batch;
            if let Err(e) = self.store.set("batch", &self.batch) {
                tracing::error!(error = %e, "cannot record the eviction batch");
                return;
            }
        }
        // A VM in backoff that is no longer outdated (its target went away) runs normally.
        let settled: Vec<String> = self
            .vms
            .iter()
            .filter(|(n, v)| {
                matches!(v.status.state, VmState::Backoff { .. })
                    && !p.verdicts.get(*n).is_some_and(|x| x.outdated)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in settled {
            if let Some(vm) = self.vms.get_mut(&name) {
                vm.status.state = VmState::Running {
                    since: vm.launched_at,
                };
                vm.status.migration_failures = 0;
            }
            self.persist(&name);
        }
        if !self.may_start() {
            // In a cluster whose lease is not surely alive, or after a fence: what runs
            // goes on, nothing new starts (fencing.rs).
            return;
        }
        for action in p.actions {
            // In a cluster, updates wait for the leader's grant (cluster-wide limits,
            // canary, waves); starts are the node's own business.
            if let (
                Some(grants),
                super::coordinator::Action::Migrate { vm, .. }
                | super::coordinator::Action::Evict { vm, .. },
            ) = (&self.grants, &action)
            {
                if !grants.contains(vm) {
                    continue;
                }
            }
            match action {
                super::coordinator::Action::Start { vm, version } => self.start_vm(&vm, &version),
                super::coordinator::Action::Migrate {
                    vm,
                    attempt,
                    version,
                } => self.start_migration(&vm, attempt, &version),
                super::coordinator::Action::Evict { vm, version } => self.evict(&vm, &version),
            }
        }
    }

    fn start_vm(&mut self, name: &str, version: &str) {
        let now = now_ms();
        let Some(bin) = self.launcher(version).map(|l| PathBuf::from(&l.path)) else {
            return;
        };
        let dir = self.vm_dir(name);
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        // A pending spec change (machine type, kernel, disks ...) takes effect now, at a
        // start, and never during a migration.
        let applied = vm.status.pending.take();
        if let Some(p) = applied.clone() {
            tracing::info!(vm = name, machine_type = %p.machine_type, "applying the pending spec change at restart");
            vm.spec = p;
        }
        vm.status.generation += 1;
        vm.status.migration_failures = 0;
        let g = vm.status.generation;
        let api_socket = dir.join(format!("api-{g}.sock"));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::remove_file(&api_socket);
        vm.status.api_socket = Some(api_socket.display().to_string());
        vm.status.launcher_version = Some(version.to_string());
        vm.status.pid = None;
        let options = supervisor::run_options(&vm.spec, &vm.serial_log, &api_socket);
        let spec = vm.spec.clone();
        let args = self.launch_argv(options);
        // Spec first, then status: a crash in between restarts with the new spec and a
        // still-pending copy of it, which applies the same change again.
        if applied.is_some() {
            if let Err(e) = self.store.update_spec(&spec) {
                tracing::error!(vm = name, error = %e, "cannot record the spec; not starting");
                return;
            }
        }
        if !self.persist(name) {
            return;
        }
        let log = dir.join(format!("launcher-{g}.log"));
        let result = supervisor::spawn(&bin, &args, &log);
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        match result {
            Ok(child) => {
                let pid = child.id().unwrap_or(0);
                tracing::info!(vm = name, version, pid, "launcher started");
                let what = if applied.is_some() {
                    format!("launcher {version} started (pid {pid}) with the pending spec change")
                } else {
                    format!("launcher {version} started (pid {pid})")
                };
                vm.status.pid = Some(pid);
                vm.status.state = VmState::Running { since: now };
                vm.launched_at = now;
                self.counters.starts.inc();
                supervisor::watch_child(child, name.to_string(), pid, self.events.clone());
                self.event(name, false, "Started", what);
            }
            Err(e) => {
                tracing::error!(vm = name, error = %e, "cannot start launcher");
                self.event(
                    name,
                    true,
                    "FailedStart",
                    format!("cannot start launcher {version}: {e}"),
                );
                let Some(vm) = self.vms.get_mut(name) else {
                    return;
                };
                vm.status.state = VmState::Stopped {
                    cause: StopCause::StartFailed(e.to_string()),
                };
                vm.status.last_error = Some(e.to_string());
                vm.status.api_socket = None;
                vm.status.launcher_version = None;
            }
        }
        self.persist(name);
    }

    fn start_migration(&mut self, name: &str, attempt: u32, version: &str) {
        let now = now_ms();
        let Some(bin) = self.launcher(version).map(|l| PathBuf::from(&l.path)) else {
            return;
        };
        let dir = self.vm_dir(name);
        let Some(vm) = self.vms.get(name) else {
            return;
        };
        let (Some(source_pid), Some(source_socket)) = (vm.status.pid, vm.status.api_socket.clone())
        else {
            return;
        };
        let source_version = vm.status.launcher_version.clone().unwrap_or_default();
        let record = match self
            .store
            .migration_started(name, &source_version, version, now)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(vm = name, error = %e, "cannot record migration; not starting it");
                return;
            }
        };
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.status.generation += 1;
        let g = vm.status.generation;
        let target_socket = dir.join(format!("api-{g}.sock"));
        let incoming = dir.join(format!("migrate-{g}.sock"));
        let _ = std::fs::remove_file(&target_socket);
        let _ = std::fs::remove_file(&incoming);
        vm.status.state = VmState::Migrating {
            attempt,
            target_version: version.to_string(),
            started_at: now,
            target_generation: g,
            target_api_socket: target_socket.display().to_string(),
            incoming: incoming.display().to_string(),
            target_pid: None,
            record,
        };
        vm.source_exit = None;
        vm.target_exit = None;
        let options = supervisor::incoming_options(&incoming, &vm.serial_log, &target_socket);
        let memory_bytes = vm.spec.memory_bytes;
        let args = self.launch_argv(options);
        if !self.persist(name) {
            return;
        }
        tracing::info!(vm = name, from = %source_version, to = version, attempt, "migration starting");
        self.event(
            name,
            false,
            "MigrationStarted",
            format!("live migration {source_version} -> {version} (attempt {attempt})"),
        );
        match supervisor::spawn(&bin, &args, &dir.join(format!("launcher-{g}.log"))) {
            Ok(child) => {
                let pid = child.id().unwrap_or(0);
                if let Some(VmState::Migrating { target_pid, .. }) =
                    self.vms.get_mut(name).map(|v| &mut v.status.state)
                {
                    *target_pid = Some(pid);
                }
                self.persist(name);
                supervisor::watch_child(child, name.to_string(), pid, self.events.clone());
                supervisor::migrate(
                    MigrationJob {
                        vm: name.to_string(),
                        record,
                        source_socket: PathBuf::from(source_socket),
                        source_pid,
                        target_socket,
                        target_pid: pid,
                        incoming,
                        memory_bytes,
                        config: self.settings.live_migration_config.clone(),
                        resume: false,
                    },
                    self.events.clone(),
                );
            }
            Err(e) => {
                let _ = self.events.send(Event::MigrationDone {
                    vm: name.to_string(),
                    record,
                    result: MigrationResult::Failed {
                        outcome: "Failed".into(),
                        error: e.to_string(),
                        report: serde_json::Value::Null,
                    },
                });
            }
        }
    }

    fn evict(&mut self, name: &str, version: &str) {
        let now = now_ms();
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let (Some(pid), Some(sock)) = (vm.status.pid, vm.status.api_socket.clone()) else {
            return;
        };
        vm.status.state = VmState::Evicting {
            since: now,
            target_version: version.to_string(),
        };
        let grace = Duration::from_secs(vm.spec.termination_grace_period_seconds);
        if !self.persist(name) {
            return;
        }
        tracing::info!(vm = name, to = version, "evicting for update");
        self.event(
            name,
            false,
            "Evicted",
            format!("shut down for the update to launcher {version} (not live-migratable)"),
        );
        self.counters.evictions.inc();
        supervisor::shutdown(PathBuf::from(sock), pid, grace);
    }

    /// Handles a process or job event.
    pub fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Exited { vm, pid, kind } => self.on_exit(&vm, pid, kind),
            Event::MigrationDone { vm, record, result } => {
                self.on_migration_done(&vm, record, result)
            }
            Event::RemoteDone { vm, record, result } => self.on_remote_done(&vm, record, result),
        }
    }

    fn on_exit(&mut self, name: &str, pid: u32, kind: ExitKind) {
        let now = now_ms();
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        if let VmState::Migrating { target_pid, .. } = &vm.status.state {
            if vm.status.pid == Some(pid) {
                vm.source_exit = Some(kind);
            } else if *target_pid == Some(pid) {
                vm.target_exit = Some(kind);
            }
            return;
        }
        if vm.status.pid != Some(pid) {
            return;
        }
        // During a migration to another node, only exit 64 is conclusive; any other end
        // waits for the migration job's verdict (see remote.rs). After a verdict of
        // "outcome unknown", the paused launcher's end leaves the VM stopped here, never
        // restarted: it may run on the target.
        if let VmState::MigratingOut {
            to,
            outcome_unknown,
            ..
        } = &vm.status.state
        {
            if kind != ExitKind::MigratedAway {
                if outcome_unknown.is_none() {
                    vm.source_exit = Some(kind);
                    return;
                }
                let why = format!(
                    "the paused launcher ended ({kind:?}) while the handover to {to} had an unknown outcome; check the destination before starting it here"
                );
                vm.status.pid = None;
                vm.status.api_socket = None;
                vm.status.launcher_version = None;
                vm.status.last_error = Some(why.clone());
                vm.status.state = VmState::Stopped {
                    cause: StopCause::Failed(why),
                };
                self.persist(name);
                return;
            }
        }
        let generation = vm.status.generation;
        let kind = self.exit_recorded(name, pid, generation, kind);
        self.apply_exit(name, &kind, now);
    }

    pub(crate) fn apply_exit(&mut self, name: &str, kind: &ExitKind, now: Millis) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let deleting = matches!(vm.status.state, VmState::Stopping { delete: true, .. });
        if let Some(s) = &vm.status.api_socket {
            let _ = std::fs::remove_file(s);
        }
        vm.status = after_exit(&vm.status, &vm.spec, kind, now - vm.launched_at, now);
        if deleting {
            self.remove_vm(name);
        } else {
            self.persist(name);
        }
    }

    pub(crate) fn remove_vm(&mut self, name: &str) {
        if let Err(e) = self.store.delete_vm(name) {
            tracing::error!(vm = name, error = %e, "cannot delete VM record");
            return;
        }
        if let Err(e) = self.store.delete_events(name) {
            tracing::warn!(vm = name, error = %e, "cannot delete the VM's events");
        }
        self.vms.remove(name);
        let _ = std::fs::remove_dir_all(self.vm_dir(name));
        tracing::info!(vm = name, "deleted");
    }

    fn on_migration_done(&mut self, name: &str, record: i64, result: MigrationResult) {
        let now = now_ms();
        let backoff_settings = self.settings.clone();
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let VmState::Migrating {
            target_pid,
            target_api_socket,
            target_version,
            record: current,
            incoming,
            ..
        } = vm.status.state.clone()
        else {
            return;
        };
        if current != record {
            return;
        }
        let (outcome, report) = result.record();
        if let Err(e) = self
            .store
            .migration_finished(record, now, &outcome, &report)
        {
            tracing::error!(vm = name, error = %e, "cannot record migration outcome");
        }
        // Reports recorded before the contract was camelCase say `downtime_ms`.
        let downtime = report["downtimeMs"]
            .as_f64()
            .or_else(|| report["downtime_ms"].as_f64());
        self.counters.migration(
            &outcome,
            super::metrics::MigrationFigures::from_report(&report),
        );
        self.migration_event(name, &result, &outcome, &target_version, downtime);
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        match result {
            MigrationResult::Completed { .. } => {
                tracing::info!(vm = name, to = %target_version, downtime_ms = %downtime.map(|d| format!("{d:.2}")).unwrap_or_else(|| "unknown".into()), "migration completed");

                // The old launcher's socket and the handover socket are not needed any more.
                for stale in [vm.status.api_socket.as_deref(), Some(incoming.as_str())]
                    .into_iter()
                    .flatten()
                {
                    let _ = std::fs::remove_file(stale);
                }
                vm.status.pid = target_pid;
                vm.status.api_socket = Some(target_api_socket);
                vm.status.launcher_version = Some(target_version);
                vm.status.state = VmState::Running { since: now };
                vm.status.migration_failures = 0;
                vm.status.last_error = None;
                vm.launched_at = now;
                vm.source_exit = None;
                if let Some(kind) = vm.target_exit.take() {
                    self.apply_exit(name, &kind, now);
                    return;
                }
            }
            MigrationResult::Failed { error, .. } | MigrationResult::Unknown { error, .. } => {
                tracing::warn!(vm = name, error = %error, "migration failed");
                vm.status.migration_failures += 1;
                vm.status.last_error = Some(format!("migration failed: {error}"));
                vm.target_exit = None;
                if let Some(kind) = vm.source_exit.take() {
                    vm.status.state = VmState::Running {
                        since: vm.launched_at,
                    };
                    self.apply_exit(name, &kind, now);
                    return;
                }
                let until =
                    now + migration_backoff_ms(&backoff_settings, vm.status.migration_failures);
                vm.status.state = VmState::Backoff {
                    until,
                    last_error: error,
                };
            }
        }
        self.persist(name);
    }
}

/// Runs noded until SIGTERM/SIGINT. Launchers keep running after noded exits.
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    // (Each VM's socket paths are checked when it is created, with its real name.)
    if opts.socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(DaemonError::PathTooLong(opts.socket.display().to_string()));
    }
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(64);
    let (call_tx, mut call_rx) = mpsc::channel::<crate::cluster::local::LocalCall>(64);
    // Bind first: a second noded on the same socket must not touch the state.
    let listener = api::bind(&opts.socket)?;
    // Then the state directory: a second noded with another socket must not either.
    let _state_lock = match lock_state_dir(&opts.state_dir) {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&opts.socket);
            return Err(e);
        }
    };
    let mut d = match Daemon::open(&opts, ev_tx) {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(&opts.socket);
            return Err(e);
        }
    };
    // In a cluster: the fence marker and the start gate first, then adoption.
    d.init_fencing(opts.cluster.is_some());
    d.adopt().await;
    // In a cluster, no update runs before the leader grants it.
    let cluster = match opts.cluster.clone() {
        Some(mut c) => {
            c.watchdog_file = d.watchdog_file();
            c.state_dir = Some(opts.state_dir.clone());
            d.grants = Some(BTreeSet::new());
            tracing::info!(node = %c.node_name, endpoints = ?c.endpoints, "joining the cluster");
            Some(crate::cluster::Cluster::start(c, call_tx).await)
        }
        None => None,
    };
    tracing::info!(socket = %opts.socket.display(), state_dir = %opts.state_dir.display(), "noded serving");
    let (changed, changes) = tokio::sync::watch::channel(0u64);
    let state = api::ApiState {
        cmds: cmd_tx,
        launchers_dir: opts.state_dir.join("launchers"),
        changes,
        cluster,
    };
    tokio::spawn(api::serve(listener, state.clone()));
    if let Some(addr) = opts.metrics_address {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Io {
                path: format!("--metrics-address {addr}"),
                source,
            })?;
        tracing::info!(address = %addr, "serving /metrics over TCP");
        tokio::spawn(super::metrics::serve_tcp(tcp, state));
    }
    // Watchers re-read when this moves (see watch.rs); read-only requests do not move it.
    let bump = || changed.send_modify(|n| *n = n.wrapping_add(1));
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| DaemonError::Io {
            path: "SIGTERM handler".into(),
            source,
        })?;
    loop {
        tokio::select! {
            Some(cmd) = cmd_rx.recv() => {
                let writes = !cmd.req.is_read_only();
                let reply = d.handle(cmd.req);
                let _ = cmd.reply.send(reply);
                d.reconcile();
                if writes {
                    bump();
                }
            }
            Some(ev) = ev_rx.recv() => {
                d.on_event(ev);
                d.reconcile();
                bump();
            }
            _ = tick.tick() => {
                d.reconcile();
                bump();
            }
            Some(call) = call_rx.recv() => {
                d.on_local_call(call);
                d.reconcile();
                bump();
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("noded stopping; launchers keep running and will be adopted at the next start");
    let _ = std::fs::remove_file(&opts.socket);
    Ok(())
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_state_directory_is_refused_until_the_first_goes() {
        let dir = std::env::temp_dir().join(format!("noded-lock-{}", std::process::id()));
        let first = lock_state_dir(&dir).unwrap();
        let e = lock_state_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("already uses the state directory"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        assert!(lock_state_dir(&dir).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The launcher's VM and its lifecycle: boot, restore, reboot, stop. One lock guards the
//! lifecycle state ([`super::lifecycle`]) and the VM, and every API action on the VM
//! (pause, resume, migrate) checks and changes the state under it.

use std::fs::OpenOptions;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use contracts::launcher::Phase;
use vmm::{Vm, VmConfig, VmStop};

use super::lifecycle::{describe, transition, Event, Refused};
pub use super::lifecycle::{MigrationEnd, State};
use super::{LaunchError, EXIT_MIGRATED};

/// Where the guest's console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialTarget {
    /// This process's standard output.
    Stdio,
    /// A file, appended to so that a console log continues across launchers.
    File(String),
}

impl SerialTarget {
    /// Parse `stdio` or a path.
    pub fn parse(s: &str) -> Self {
        if s == "stdio" {
            Self::Stdio
        } else {
            Self::File(s.to_string())
        }
    }

    /// Open a sink for the serial device.
    pub fn open(&self) -> Result<vmm::devices::serial::SerialOut, LaunchError> {
        match self {
            Self::Stdio => Ok(Box::new(std::io::stdout())),
            Self::File(path) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| LaunchError::File {
                        what: "cannot open serial log",
                        path: path.clone(),
                        source,
                    })?;
                Ok(Box::new(f))
            }
        }
    }
}

/// Why an API request on the VM's lifecycle was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No VM runs here now (waiting for an incoming one, or rebooting).
    #[error("no VM runs here now: the VM is {0}")]
    NoVm(&'static str),
    /// The state machine refuses the request in this state (HTTP 409).
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The VMM failed to carry it out (HTTP 500); the state is unchanged.
    #[error(transparent)]
    Machine(#[from] vmm::MachineError),
}

impl RuntimeError {
    /// The HTTP status for it.
    pub fn status(&self) -> u16 {
        match self {
            RuntimeError::NoVm(_) | RuntimeError::Refused(_) => 409,
            RuntimeError::Machine(_) => 500,
        }
    }
}

/// The kernel and initrd of a booted VM, kept for a guest reset.
pub type BootFiles = (Vec<u8>, Option<Vec<u8>>);

/// Proof that a migration was started through [`Runtime::begin_migration`].
#[must_use = "end the migration with Runtime::end_migration"]
pub struct MigrationTicket(());

/// Everything the lifecycle lock protects: the state and the VM it is about.
struct Inner {
    state: State,
    vm: Option<Arc<Vm>>,
    exit: Option<i32>,
    /// The guest reset itself during a migration: the VM is held paused, the migration
    /// cancelled, and the reboot happens when the migration has ended.
    reset_deferred: bool,
    /// Cancels the migration in progress (set by [`Runtime::begin_migration`]).
    cancel: Option<Arc<AtomicBool>>,
    /// `--net` options of an incoming launcher (its side's TAPs; see
    /// `migration::receiver::ReceiveOptions`).
    incoming_nets: Vec<(vmm::config::NetConfig, bool)>,
}

/// The VM of this launcher and its lifecycle ([`super::lifecycle`]), under one lock.
pub struct Runtime {
    inner: Mutex<Inner>,
    serial: SerialTarget,
}

impl Runtime {
    /// A runtime for `vm` (None while waiting for an incoming migration).
    pub fn new(vm: Option<Vm>, serial: SerialTarget) -> Arc<Self> {
        let state = if vm.is_some() {
            State::Running
        } else {
            State::Incoming
        };
        Arc::new(Self {
            inner: Mutex::new(Inner {
                state,
                vm: vm.map(Arc::new),
                exit: None,
                reset_deferred: false,
                cancel: None,
                incoming_nets: Vec::new(),
            }),
            serial,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM, if one runs here.
    pub fn vm(&self) -> Option<Arc<Vm>> {
        self.inner().vm.clone()
    }

    /// Install the VM (after an incoming migration completes).
    pub fn set_vm(&self, vm: Arc<Vm>) {
        let mut g = self.inner();
        match transition(g.state, Event::VmArrived) {
            Ok(s) => {
                g.state = s;
                g.vm = Some(vm);
            }
            // Stopping while the VM arrived: it is dropped with this process.
            Err(e) => tracing::warn!(error = %e, "incoming VM not installed"),
        }
    }

    /// Record the `--net` options of an incoming launcher.
    pub fn set_incoming_nets(&self, nets: Vec<(vmm::config::NetConfig, bool)>) {
        self.inner().incoming_nets = nets;
    }

    /// The `--net` options of an incoming launcher.
    pub fn incoming_nets(&self) -> Vec<(vmm::config::NetConfig, bool)> {
        self.inner().incoming_nets.clone()
    }

    /// The serial target.
    pub fn serial(&self) -> &SerialTarget {
        &self.serial
    }

    /// The lifecycle state.
    pub fn state(&self) -> State {
        self.inner().state
    }

    /// Why no VM is here now, for messages.
    pub fn no_vm(&self) -> RuntimeError {
        RuntimeError::NoVm(describe(self.state()))
    }

    /// What the API reports.
    pub fn phase(&self) -> Phase {
        self.state().phase()
    }

    /// `PUT /v1/pause`: the check, the pause and the new state under one lock, so two
    /// concurrent pauses cannot both succeed (the second is refused: already paused).
    pub fn pause(&self) -> Result<(), RuntimeError> {
        let mut g = self.inner();
        let vm = g.vm.clone().ok_or(RuntimeError::NoVm(describe(g.state)))?;
        let next = transition(g.state, Event::Pause)?;
        vm.hold_pause()?;
        g.state = next;
        Ok(())
    }

    /// `PUT /v1/resume`: undoes the one API pause.
    pub fn resume(&self) -> Result<(), RuntimeError> {
        let mut g = self.inner();
        let vm = g.vm.clone().ok_or(RuntimeError::NoVm(describe(g.state)))?;
        let next = transition(g.state, Event::Resume)?;
        vm.resume()?;
        g.state = next;
        Ok(())
    }

    /// The VM to snapshot, if the state allows one (not while migrating, rebooting,
    /// waiting for an incoming VM or stopping).
    pub fn snapshot_vm(&self) -> Result<Arc<Vm>, RuntimeError> {
        let g = self.inner();
        let vm = g.vm.clone().ok_or(RuntimeError::NoVm(describe(g.state)))?;
        transition(g.state, Event::Snapshot)?;
        Ok(vm)
    }

    /// A migration starts; `cancel` is what cancels it (a guest reset does, see
    /// [`Runtime::main_loop`]).
    pub fn begin_migration(
        &self,
        cancel: Arc<AtomicBool>,
    ) -> Result<MigrationTicket, RuntimeError> {
        let mut g = self.inner();
        if g.vm.is_none() {
            return Err(RuntimeError::NoVm(describe(g.state)));
        }
        g.state = transition(g.state, Event::MigrationStarted)?;
        g.cancel = Some(cancel);
        Ok(MigrationTicket(()))
    }

    /// The migration ended. Returns true when a guest reset during the migration
    /// cancelled it (the main loop reboots the VM now).
    pub fn end_migration(&self, _ticket: MigrationTicket, end: MigrationEnd) -> bool {
        let mut g = self.inner();
        g.cancel = None;
        match transition(g.state, Event::MigrationEnded(end)) {
            Ok(s) => g.state = s,
            Err(e) => tracing::error!(error = %e, "migration end in an unexpected state"),
        }
        if end == MigrationEnd::MigratedAway {
            // The VM runs elsewhere now; this process must never run it again.
            g.exit.get_or_insert(EXIT_MIGRATED);
        }
        g.reset_deferred
    }

    /// Ask the main loop to exit with `code` (the first request wins).
    pub fn request_exit(&self, code: i32) {
        let mut g = self.inner();
        if let Ok(s) = transition(g.state, Event::Stop) {
            g.state = s;
        }
        g.exit.get_or_insert(code);
    }

    /// The requested exit code, if any.
    pub fn exit_requested(&self) -> Option<i32> {
        self.inner().exit
    }

    /// A guest reset: reboot now (returns the VM to rebuild), or, during a migration,
    /// hold the VM paused so the guest does not run past its reset, cancel the migration
    /// and reboot once it has ended (returns None).
    fn reset(&self, vm: &Arc<Vm>) -> Option<Arc<Vm>> {
        let mut g = self.inner();
        if let State::Migrating { .. } = g.state {
            if !g.reset_deferred {
                tracing::info!("guest reset during a migration: cancelling the migration");
                g.reset_deferred = true;
                if let Err(e) = vm.hold_pause() {
                    tracing::warn!(error = %e, "cannot hold the resetting VM paused");
                }
                if let Some(c) = &g.cancel {
                    c.store(true, Ordering::SeqCst);
                }
            }
            return None;
        }
        match transition(g.state, Event::Reset) {
            Ok(s) => {
                g.state = s;
                g.reset_deferred = false;
                g.vm.take()
            }
            Err(e) => {
                tracing::warn!(error = %e, "guest reset ignored");
                None
            }
        }
    }

    /// A reset deferred by a migration that has ended with the VM still here and running:
    /// the VM to rebuild. Not while paused: after a migration whose outcome is unknown the
    /// destination may run the VM, and only a resume (whoever drives the migration found
    /// that it does not) makes the source its owner again.
    fn deferred_reset_due(&self) -> Option<Arc<Vm>> {
        let mut g = self.inner();
        if !g.reset_deferred || g.state != State::Running {
            return None;
        }
        let s = transition(g.state, Event::Reset).ok()?;
        g.state = s;
        g.reset_deferred = false;
        g.vm.take()
    }

    fn reset_pending(&self) -> bool {
        self.inner().reset_deferred
    }

    /// Run until the VM ends; returns the process exit status.
    pub fn main_loop(&self, kernel_for_reboot: Option<BootFiles>) -> Result<i32, LaunchError> {
        loop {
            if let Some(code) = self.exit_requested() {
                return Ok(code);
            }
            if super::signals::stop_requested() {
                tracing::info!("stop requested by signal");
                return Ok(0);
            }
            if let Some(old) = self.deferred_reset_due() {
                self.reboot(old, kernel_for_reboot.as_ref())?;
                continue;
            }
            let Some(vm) = self.vm() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            match vm.wait_stop(Duration::from_millis(50)) {
                None => {}
                Some(VmStop::Reset) => {
                    if let Some(old) = self.reset(&vm) {
                        drop(vm);
                        self.reboot(old, kernel_for_reboot.as_ref())?;
                    }
                }
                // What the guest did after a reset it asked for does not count.
                Some(stop) if self.reset_pending() && !matches!(stop, VmStop::Error(_)) => {
                    tracing::debug!(?stop, "ignored: the guest reset before");
                }
                Some(VmStop::PowerOff) => {
                    tracing::info!("guest powered off");
                    return Ok(self.exit_requested().unwrap_or(0));
                }
                Some(VmStop::DebugExit(v)) => {
                    tracing::info!(code = v, "guest wrote the debug-exit port");
                    return Ok(i32::from(v));
                }
                Some(VmStop::Error(e)) => {
                    if self.exit_requested() == Some(EXIT_MIGRATED) {
                        return Ok(EXIT_MIGRATED);
                    }
                    eprintln!("launcher: the VM stopped: {e}");
                    return Ok(1);
                }
            }
        }
    }

    /// Rebuild the VM after a guest reset. The old VM is dropped first, and waited for
    /// while another thread still holds it (a migration that just ended), so that its
    /// disk locks and TAPs are free for the new one.
    fn reboot(&self, old: Arc<Vm>, files: Option<&BootFiles>) -> Result<(), LaunchError> {
        tracing::info!("guest reset: rebooting");
        let config: VmConfig = old.config().clone();
        let mut old = Some(old);
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(o) = old.take() {
            match Arc::try_unwrap(o) {
                Ok(vm) => drop(vm),
                Err(o) if Instant::now() < deadline => {
                    old = Some(o);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => {
                    return Err(LaunchError::Usage(
                        "guest reset: the old VM is still in use after 30 s; cannot reboot".into(),
                    ))
                }
            }
        }
        let (kernel, initrd) = match files {
            Some(k) => k.clone(),
            None => read_boot_files(&config)?,
        };
        let new = Vm::boot(config, &kernel, initrd.as_deref(), self.serial.open()?)?;
        let mut g = self.inner();
        g.vm = Some(Arc::new(new));
        if let Ok(s) = transition(g.state, Event::Rebooted) {
            g.state = s;
        }
        Ok(())
    }
}

/// Read the kernel and initrd named in a configuration.
pub fn read_boot_files(config: &VmConfig) -> Result<BootFiles, LaunchError> {
    let kernel = std::fs::read(&config.kernel).map_err(|source| LaunchError::File {
        what: "cannot read kernel",
        path: config.kernel.clone(),
        source,
    })?;
    let initrd = match &config.initrd {
        Some(p) => Some(std::fs::read(p).map_err(|source| LaunchError::File {
            what: "cannot read initrd",
            path: p.clone(),
            source,
        })?),
        None => None,
    };
    Ok((kernel, initrd))
}

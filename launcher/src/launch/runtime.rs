//! The launcher's VM and its lifecycle: boot, restore, reboot, stop.

use std::fs::OpenOptions;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm::sync::lock;
use vmm::{Vm, VmConfig, VmStop};

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

/// What the API reports as the VM's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Guest code runs.
    Running,
    /// Paused through the API.
    Paused,
    /// A migration is under way (the guest runs until the switch-over).
    Migrating,
    /// Waiting for an incoming migration.
    Incoming,
}

impl Phase {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Migrating => "migrating",
            Phase::Incoming => "incoming",
        }
    }
}

/// The VM of this launcher and what the outside asked of it.
pub struct Runtime {
    vm: Mutex<Option<Arc<Vm>>>,
    phase: Mutex<Phase>,
    exit: Mutex<Option<i32>>,
    serial: SerialTarget,
    /// `--net` options of an incoming launcher (its side's TAPs; see
    /// `migration::receiver::ReceiveOptions`).
    incoming_nets: Mutex<Vec<(vmm::config::NetConfig, bool)>>,
}

impl Runtime {
    /// A runtime for `vm` (None while waiting for an incoming migration).
    pub fn new(vm: Option<Vm>, serial: SerialTarget) -> Arc<Self> {
        let phase = if vm.is_some() {
            Phase::Running
        } else {
            Phase::Incoming
        };
        Arc::new(Self {
            vm: Mutex::new(vm.map(Arc::new)),
            phase: Mutex::new(phase),
            exit: Mutex::new(None),
            serial,
            incoming_nets: Mutex::new(Vec::new()),
        })
    }

    /// The VM, if one runs here.
    pub fn vm(&self) -> Option<Arc<Vm>> {
        lock(&self.vm).clone()
    }

    /// Install the VM (after an incoming migration completes).
    pub fn set_vm(&self, vm: Arc<Vm>) {
        *lock(&self.vm) = Some(vm);
        self.set_phase(Phase::Running);
    }

    /// Record the `--net` options of an incoming launcher.
    pub fn set_incoming_nets(&self, nets: Vec<(vmm::config::NetConfig, bool)>) {
        *lock(&self.incoming_nets) = nets;
    }

    /// The `--net` options of an incoming launcher.
    pub fn incoming_nets(&self) -> Vec<(vmm::config::NetConfig, bool)> {
        lock(&self.incoming_nets).clone()
    }

    /// The serial target.
    pub fn serial(&self) -> &SerialTarget {
        &self.serial
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    /// Change the phase.
    pub fn set_phase(&self, p: Phase) {
        *lock(&self.phase) = p;
    }

    /// Ask the main loop to exit with `code`.
    pub fn request_exit(&self, code: i32) {
        let mut e = lock(&self.exit);
        if e.is_none() {
            *e = Some(code);
        }
    }

    /// The requested exit code, if any.
    pub fn exit_requested(&self) -> Option<i32> {
        *lock(&self.exit)
    }

    /// Run until the VM ends; returns the process exit status.
    pub fn main_loop(
        &self,
        kernel_for_reboot: Option<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<i32, LaunchError> {
        loop {
            if let Some(code) = self.exit_requested() {
                return Ok(code);
            }
            if super::signals::stop_requested() {
                tracing::info!("stop requested by signal");
                return Ok(0);
            }
            let Some(vm) = self.vm() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            match vm.wait_stop(Duration::from_millis(50)) {
                None => {}
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
                Some(VmStop::Reset) => {
                    tracing::info!("guest reset: rebooting");
                    let config: VmConfig = vm.config().clone();
                    drop(vm);
                    *lock(&self.vm) = None;
                    let (kernel, initrd) = match &kernel_for_reboot {
                        Some(k) => k.clone(),
                        None => read_boot_files(&config)?,
                    };
                    let new = Vm::boot(config, &kernel, initrd.as_deref(), self.serial.open()?)?;
                    *lock(&self.vm) = Some(Arc::new(new));
                }
            }
        }
    }
}

/// Read the kernel and initrd named in a configuration.
pub fn read_boot_files(config: &VmConfig) -> Result<(Vec<u8>, Option<Vec<u8>>), LaunchError> {
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

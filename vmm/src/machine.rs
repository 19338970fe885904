//! `Vm`: a running virtual machine, assembled from memory, KVM, devices and vCPUs.
//!
//! Field order matters for teardown: vCPU threads stop first, then the KVM VM
//! goes, and guest memory is unmapped last.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, BootError, BootSource};
use crate::config::{ConfigError, VmConfig};
use crate::devices::platform::{Platform, PlatformError};
use crate::devices::serial::SerialOut;
use crate::devices::virtio::{VirtioDevices, VirtioError};
use crate::layout;
use crate::state::VmState;
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{self, VcpuContext, VcpuError, VcpuHandle, VmStop};
use crate::vstate::vm::{KvmVm, VmError};

mod live;
pub use live::{DirtyTracking, RamRange};

/// Errors creating, controlling or saving a VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM VM-level failure.
    #[error(transparent)]
    Kvm(#[from] VmError),
    /// vCPU failure.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Devices.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// virtio devices and their disks.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// ACPI tables.
    #[error("cannot build ACPI tables: {0}")]
    Acpi(String),
    /// The restored state does not match the memory or the host.
    #[error("cannot restore the VM: {0}")]
    Restore(String),
    /// Host resources (eventfd, ...).
    #[error("host resource error: {0}")]
    Host(String),
}

/// A live VM.
pub struct Vm {
    vcpus: Vec<VcpuHandle>,
    platform: Platform,
    /// Data disks; their ownership locks are held whenever the vCPUs run.
    virtio: VirtioDevices,
    kvm: KvmVm,
    ram: GuestRam,
    config: VmConfig,
    stop_rx: Mutex<Receiver<VmStop>>,
    /// Nesting depth of pause guards; vCPUs run only at 0.
    pause_depth: Mutex<usize>,
    /// The vCPU threads run at real-time priority ([`Vm::pause_boosted`]); undone
    /// before they run guest code again.
    vcpus_boosted: std::sync::atomic::AtomicBool,
}

/// Pauses every vCPU while alive, resumes them when dropped (crosvm style), so that
/// every error path of a caller restores the VM. [`PauseGuard::keep_paused`]
/// disarms it for the one path where the VM must never run here again.
pub struct PauseGuard<'a> {
    vm: &'a Vm,
    armed: bool,
}

impl PauseGuard<'_> {
    /// Leave the VM paused for good (it now runs elsewhere).
    pub fn keep_paused(mut self) {
        self.armed = false;
    }

    /// The paused VM.
    pub fn vm(&self) -> &Vm {
        self.vm
    }
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.vm.release_pause() {
                tracing::error!("cannot resume vCPUs: {e}");
            }
        }
    }
}

/// Start one thread per vCPU (index order), each with the buses, the stop channel, its
/// CPUID and the MSRs to save. Booting starts them running, a restore paused.
fn spawn_vcpus(
    fds: Vec<(kvm_ioctls::VcpuFd, Vec<kvm_bindings::kvm_cpuid_entry2>)>,
    platform: &Platform,
    stop: &Sender<VmStop>,
    msr_list: &[u32],
    start_paused: bool,
) -> Result<Vec<VcpuHandle>, MachineError> {
    let mut vcpus = Vec::with_capacity(fds.len());
    for (id, (fd, cpuid)) in fds.into_iter().enumerate() {
        let ctx = VcpuContext {
            pio: platform.pio_bus().clone(),
            mmio: platform.mmio_bus().clone(),
            stop: stop.clone(),
            cpuid,
            msr_list: msr_list.to_vec(),
            start_paused,
        };
        vcpus.push(VcpuHandle::spawn(id as u8, fd, ctx)?);
    }
    Ok(vcpus)
}

fn serial_irq() -> Result<EventFd, MachineError> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| MachineError::Host(format!("eventfd: {e}")))
}

impl Vm {
    /// Create a VM and boot `kernel` in it. vCPUs run when this returns.
    pub fn boot(
        config: VmConfig,
        kernel: &[u8],
        initrd: Option<&[u8]>,
        serial_out: SerialOut,
    ) -> Result<Self, MachineError> {
        config.validate()?;
        let ram = GuestRam::new(config.memory_bytes)?;
        let mut kvm = KvmVm::new()?;
        kvm.record_slots(&ram)?;
        let (stop_tx, stop_rx) = channel();
        // KVM_SET_USER_MEMORY_REGION runs on a helper thread meanwhile (see `map_slots`).
        let (platform, virtio, fds, msr_list) = std::thread::scope(|s| {
            let mapping = s.spawn(|| kvm.map_slots());
            let setup = (|| -> Result<_, MachineError> {
                let irq = serial_irq()?;
                kvm.fd()
                    .register_irqfd(&irq, layout::COM1_IRQ)
                    .map_err(|e| MachineError::Host(format!("irqfd: {e}")))?;
                let mut platform = Platform::new(irq, serial_out)?;
                let mut virtio =
                    VirtioDevices::create(&config.disks, None, ram.memory(), &kvm, &mut platform)?;
                virtio.create_nets(&config.nets, None, ram.memory(), &kvm, &mut platform, false)?;
                virtio.lock_disks()?;
                let rsdp = crate::acpi::create_acpi_tables(ram.memory(), config.vcpus)
                    .map_err(|e| MachineError::Acpi(e.to_string()))?;
                let entry = boot::load(
                    ram.memory(),
                    &BootSource {
                        kernel,
                        initrd,
                        cmdline: &config.cmdline,
                    },
                    vm_memory::Address::raw_value(&rsdp),
                )?;
                // Boot-time writes are not guest writes: start with a clean VMM-side bitmap.
                for i in 0..ram.regions().len() {
                    ram.take_vmm_dirty(i);
                }
                let mut fds = Vec::new();
                for id in 0..config.vcpus {
                    let fd = vcpu::create(kvm.fd(), id)?;
                    kvm.attach_vcpu(&fd)?;
                    let cpuid = vcpu::build_cpuid(kvm.kvm(), id, config.vcpus)?;
                    vcpu::configure(&fd, id, &cpuid)?;
                    if id == 0 {
                        boot::regs::setup_boot_cpu(&fd, ram.memory(), entry)?;
                    }
                    fds.push((fd, cpuid));
                }
                let msr_list = vcpu::saveable_msrs(kvm.kvm(), &fds[0].0);
                Ok((platform, virtio, fds, msr_list))
            })();
            let mapped = mapping
                .join()
                .map_err(|_| MachineError::Host("the memory-slot thread panicked".into()))?;
            mapped?;
            setup
        })?;
        let vcpus = spawn_vcpus(fds, &platform, &stop_tx, &msr_list, false)?;
        tracing::info!(
            memory = config.memory_bytes,
            vcpus = config.vcpus,
            machine = %config.machine_type,
            "VM booted"
        );
        Ok(Self {
            vcpus,
            platform,
            virtio,
            kvm,
            ram,
            config,
            stop_rx: Mutex::new(stop_rx),
            pause_depth: Mutex::new(0),
            vcpus_boosted: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Rebuild a VM from a saved state and its memory. The vCPUs start paused:
    /// call [`Vm::start_restored`] to let them run.
    pub fn restore(
        state: VmState,
        ram: GuestRam,
        serial_out: SerialOut,
    ) -> Result<Self, MachineError> {
        let vcpus = state.config.vcpus;
        Self::prepare(ram, vcpus)?.restore(state, serial_out)
    }

    /// The expensive half of a restore, done before the state exists: create the KVM
    /// VM, register `ram`, create `vcpus` vCPUs. An incoming migration does this while
    /// the source still runs, so that the pause only pays for loading registers.
    pub fn prepare(ram: GuestRam, vcpus: u8) -> Result<PreparedVm, MachineError> {
        let mut kvm = KvmVm::new()?;
        kvm.register_memory(&ram)?;
        let irq = serial_irq()?;
        kvm.fd()
            .register_irqfd(&irq, layout::COM1_IRQ)
            .map_err(|e| MachineError::Host(format!("irqfd: {e}")))?;
        let mut fds = Vec::new();
        for id in 0..vcpus {
            let fd = vcpu::create(kvm.fd(), id)?;
            kvm.attach_vcpu(&fd)?;
            fds.push(fd);
        }
        Ok(PreparedVm { kvm, ram, irq, fds })
    }

    /// Let a restored VM run (it starts paused with depth 1). Takes the data disks'
    /// ownership locks first; if one is held elsewhere this fails and the VM stays paused.
    pub fn start_restored(&self) -> Result<(), MachineError> {
        self.release_pause()?;
        // The guest may sit behind another port or host now: tell the network (RARP).
        self.virtio.announce_nets();
        Ok(())
    }

    /// Pause every vCPU until the guard is dropped. Nested pauses are counted.
    pub fn pause(&self) -> Result<PauseGuard<'_>, MachineError> {
        self.hold_pause()?;
        Ok(PauseGuard {
            vm: self,
            armed: true,
        })
    }

    /// [`Vm::pause`] for a migration's switch-over: the vCPU threads first move to
    /// real-time priority, so that on a busy host they answer the pause at once instead of
    /// waiting for a slice of a core; they are back at the normal policy before they run
    /// guest code again (any resume). Also says whether the boost was allowed.
    pub fn pause_boosted(&self) -> Result<(PauseGuard<'_>, bool), MachineError> {
        let boosted = self.vcpus.iter().all(|v| v.set_boost(true));
        self.vcpus_boosted
            .store(true, std::sync::atomic::Ordering::SeqCst);
        match self.pause() {
            Ok(g) => Ok((g, boosted)),
            Err(e) => {
                self.unboost_vcpus();
                Err(e)
            }
        }
    }

    fn unboost_vcpus(&self) {
        if self
            .vcpus_boosted
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            for v in &self.vcpus {
                v.set_boost(false);
            }
        }
    }

    /// Pause without a guard (an API client's explicit pause); undo with [`Vm::resume`].
    pub fn hold_pause(&self) -> Result<(), MachineError> {
        let mut depth = self.pause_depth.lock().unwrap_or_else(|e| e.into_inner());
        if *depth == 0 {
            for (i, v) in self.vcpus.iter().enumerate() {
                if let Err(e) = v.pause() {
                    // Undo the partial pause so the VM keeps running.
                    for v in &self.vcpus[..i] {
                        let _ = v.resume();
                    }
                    return Err(e.into());
                }
            }
            // No request in flight from here on: the device workers finished the ones
            // they were on and take no new one; frames wait in the TAPs.
            self.virtio.pause();
        }
        *depth += 1;
        Ok(())
    }

    /// Release one [`Vm::hold_pause`]; vCPUs run again when no pause is held.
    pub fn resume(&self) -> Result<(), MachineError> {
        self.release_pause()
    }

    fn release_pause(&self) -> Result<(), MachineError> {
        let mut depth = self.pause_depth.lock().unwrap_or_else(|e| e.into_inner());
        if *depth == 0 {
            return Ok(());
        }
        if *depth == 1 {
            // One owner: the guest runs only while this launcher holds its disks. If a lock
            // cannot be (re)taken the VM stays paused and the caller learns why.
            self.virtio.lock_disks()?;
        }
        *depth -= 1;
        if *depth == 0 {
            // Guest code never runs at real-time priority.
            self.unboost_vcpus();
            self.virtio.resume();
            for v in &self.vcpus {
                v.resume()?;
            }
        }
        Ok(())
    }

    /// Release the ownership locks of the data disks (migration switch-over: after the
    /// destination is Ready, before Go). The guard proves the VM is paused; the locks are
    /// taken again before its vCPUs next run ([`Vm::resume`], a dropped guard), and if
    /// that fails the VM stays paused.
    pub fn release_disk_locks(&self, _paused: &PauseGuard<'_>) -> Result<(), MachineError> {
        Ok(self.virtio.unlock_disks()?)
    }

    /// Take the ownership locks of the data disks now (idempotent). Resuming does this by
    /// itself; call it to learn early whether a paused VM could run here again.
    pub fn acquire_disk_locks(&self) -> Result<(), MachineError> {
        Ok(self.virtio.lock_disks()?)
    }

    /// True when every data disk's ownership lock is held (also true without disks).
    pub fn holds_disk_locks(&self) -> bool {
        self.virtio.disks_locked()
    }

    /// The TAP descriptors of the network interfaces, in `config().nets` order (a local
    /// migration hands them to the next launcher).
    pub fn net_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.virtio.net_fds()
    }

    /// Frame counters of the network interfaces.
    pub fn net_counters(&self) -> Vec<crate::devices::virtio::net::NetCounters> {
        self.virtio.net_counters()
    }

    /// True while at least one pause guard is alive.
    pub fn is_paused(&self) -> bool {
        *self.pause_depth.lock().unwrap_or_else(|e| e.into_inner()) > 0
    }

    /// Save the whole state (memory aside). The guard proves the VM is paused.
    pub fn save_state(&self, _paused: &PauseGuard<'_>) -> Result<VmState, MachineError> {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.save())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmState {
            config: self.config.clone(),
            vcpus,
            kvm: self.kvm.save()?,
            platform: self.platform.state(),
            devices: self.virtio.state(),
        })
    }

    /// Wait up to `timeout` for a reason to stop.
    pub fn wait_stop(&self, timeout: Duration) -> Option<VmStop> {
        let rx = self.stop_rx.lock().unwrap_or_else(|e| e.into_inner());
        match rx.recv_timeout(timeout) {
            Ok(s) => Some(s),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                Some(VmStop::Error("every vCPU thread has exited".into()))
            }
        }
    }

    /// Take `slice` of guest time from every vCPU (auto-converge throttling).
    pub fn throttle(&self, slice: Duration) {
        for v in &self.vcpus {
            let _ = v.throttle(slice);
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The platform devices.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }
}

/// A VM shell without state: KVM VM, registered memory and vCPUs, nothing running.
/// Made by [`Vm::prepare`]; becomes a [`Vm`] with [`PreparedVm::restore`].
pub struct PreparedVm {
    fds: Vec<kvm_ioctls::VcpuFd>,
    kvm: KvmVm,
    ram: GuestRam,
    irq: EventFd,
}

impl PreparedVm {
    /// Load `state` and create the devices; the vCPUs start paused.
    pub fn restore(self, state: VmState, serial_out: SerialOut) -> Result<Vm, MachineError> {
        let Self { fds, kvm, ram, irq } = self;
        state.config.validate()?;
        if ram.size() != state.config.memory_bytes {
            return Err(MachineError::Restore(format!(
                "memory is {} bytes but the state describes {}",
                ram.size(),
                state.config.memory_bytes
            )));
        }
        if state.vcpus.len() != state.config.vcpus as usize || fds.len() != state.vcpus.len() {
            return Err(MachineError::Restore(format!(
                "state has {} vCPUs, the configuration says {} and {} were prepared",
                state.vcpus.len(),
                state.config.vcpus,
                fds.len()
            )));
        }
        let mut platform = Platform::from_state(irq, serial_out, &state.platform)?;
        // Disks are opened here but locked only when the vCPUs first run (start_restored):
        // an incoming migration's source still owns them until Go.
        let mut virtio = VirtioDevices::create(
            &state.config.disks,
            Some(&state.devices),
            ram.memory(),
            &kvm,
            &mut platform,
        )?;
        // TAPs attached now, read only once the vCPUs run (start_restored).
        virtio.create_nets(
            &state.config.nets,
            Some(&state.devices),
            ram.memory(),
            &kvm,
            &mut platform,
            true,
        )?;
        let (stop_tx, stop_rx) = channel();
        let mut ready = Vec::new();
        for (fd, s) in fds.into_iter().zip(&state.vcpus) {
            vcpu::restore_state(&fd, s)?;
            ready.push((fd, s.cpuid.clone()));
        }
        // Irqchip after the vCPUs' LAPICs exist, as KVM requires for consistent routing.
        kvm.restore(&state.kvm)?;
        let msr_list: Vec<u32> = state.vcpus[0].msrs.iter().map(|m| m.index).collect();
        let vcpus = spawn_vcpus(ready, &platform, &stop_tx, &msr_list, true)?;
        Ok(Vm {
            vcpus,
            platform,
            virtio,
            kvm,
            ram,
            config: state.config,
            stop_rx: Mutex::new(stop_rx),
            pause_depth: Mutex::new(1),
            vcpus_boosted: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Stop the vCPU threads before KVM and memory go away.
        for v in self.vcpus.drain(..) {
            v.stop();
        }
    }
}

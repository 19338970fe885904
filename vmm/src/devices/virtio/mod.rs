//! virtio devices on the PCI bus (virtio 1.x "modern" virtio-pci transport).
//!
//! * [`pci::VirtioPciDevice`] is the transport: PCI configuration space with the virtio
//!   vendor capabilities, and one 32-bit memory BAR (BAR0) holding the common, ISR,
//!   device-specific and notify structures. The VMM assigns BAR0 a fixed address in the
//!   32-bit PCI window ([`bar0_address`]) and routes it on the MMIO bus; the guest may size
//!   the BAR but the device does not move if the guest writes another address.
//! * Interrupts: MSI-X when the driver enables it (one vector per queue plus the
//!   configuration vector, each an irqfd on a GSI with an MSI route, [`msix`]); otherwise
//!   INTx pin A of the device's slot, delivered as an edge through an irqfd on IOAPIC GSI
//!   [`intx_gsi`] (the DSDT's `_PRT` says the same), the ISR register reading and clearing
//!   the cause. Tiny guests may also poll the used ring.
//! * Requests are processed by one worker thread per device ([`worker`]), woken by a KVM
//!   ioeventfd on each queue's notify address, so the vCPU thread never serves I/O. At a
//!   pause the workers finish the request they are on and take no new one
//!   ([`VirtioDevices::pause`]): a saved state holds only queue addresses and indices,
//!   never a half-done request. A restored device makes its own eventfds, registers them
//!   with its KVM VM before any vCPU runs, and looks at every queue when it resumes, so a
//!   notification sent to the previous process is not lost.
//! * `VIRTIO_RING_F_EVENT_IDX` is offered by every device and indirect descriptors by
//!   virtio-blk; virtio-queue implements both.
//! * [`block::Block`]: virtio-blk on a raw file ([`disk::DiskFile`]), slots from
//!   [`FIRST_DISK_SLOT`].
//! * [`net::Net`]: virtio-net on a TAP ([`tap::Tap`]), slots from [`FIRST_NET_SLOT`]; the
//!   worker also watches the TAP and fills RX buffers when frames arrive. Checksum and
//!   TSO offloads through the TAP's vnet header, turned on by
//!   [`VirtioDevice::activate`] at `DRIVER_OK` (and on restore).
//!
//! Every write the devices make into guest memory goes through vm-memory, which marks the
//! VMM-side dirty bitmap that migration merges with KVM's dirty log.

pub mod block;
pub mod disk;
pub mod msix;
pub mod net;
#[cfg(test)]
mod net_tests;
pub mod netcfg;
pub mod pci;
pub mod tap;
#[cfg(test)]
mod tests;
pub mod worker;

use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::block::Block;
use self::disk::DiskError;
use self::msix::Msix;
use self::pci::{TransportMsixState, VirtioPciDevice, BAR0_SIZE, NOTIFY_MULTIPLIER, NOTIFY_OFFSET};
use self::worker::{Worker, WorkerFds};
use super::bus::lock;
use super::pci::PciError;
use super::platform::Platform;
use super::BusError;
use crate::config::DiskConfig;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::KvmVm;

/// PCI slot of the first disk; disk `i` sits in slot `FIRST_DISK_SLOT + i`.
pub const FIRST_DISK_SLOT: u8 = 4;
/// PCI slot of the first network interface; interface `i` sits in slot `FIRST_NET_SLOT + i`.
pub const FIRST_NET_SLOT: u8 = 16;
/// Base of the BAR0 windows: slot `s` decodes at `VIRTIO_MMIO_BASE + s * 64 KiB`.
pub const VIRTIO_MMIO_BASE: u64 = 0xc000_0000;

/// The fixed BAR0 address of the device in `slot`.
pub fn bar0_address(slot: u8) -> u64 {
    VIRTIO_MMIO_BASE + u64::from(slot) * 0x1_0000
}

/// The IOAPIC GSI that INTx pin `pin` (0 = INTA .. 3 = INTD) of `slot` reaches: the
/// eight PCI pins 16..=23, rotated by slot as on a PCI bridge swizzle.
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    16 + (u32::from(slot) + u32::from(pin)) % 8
}

/// Errors of the virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The disk file cannot be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The saved device state does not fit the configuration or the host.
    #[error("cannot restore virtio device: {0}")]
    BadState(String),
    /// PCI slot problem (a layout bug).
    #[error("cannot plug virtio device: {0}")]
    Pci(#[from] PciError),
    /// MMIO overlap (a layout bug).
    #[error("cannot map virtio device: {0}")]
    Bus(#[from] BusError),
    /// One file given as two disks.
    #[error("disk {path} is given twice (it is the same file as disk {first})")]
    Duplicate {
        /// The second occurrence.
        path: String,
        /// The first occurrence.
        first: String,
    },
    /// eventfd or irqfd failure.
    #[error("virtio interrupt setup: {0}")]
    Irq(String),
    /// A network interface's TAP cannot be used.
    #[error("network interface {index}: {source}")]
    Tap {
        /// Index in `VmConfig::nets`.
        index: usize,
        /// Why.
        source: tap::TapError,
    },
    /// Host resources of a network interface (eventfd, thread).
    #[error("network interface {index}: {why}")]
    Net {
        /// Index in `VmConfig::nets`.
        index: usize,
        /// Why.
        why: String,
    },
}

/// A virtio device behind the PCI transport.
pub trait VirtioDevice: Send {
    /// virtio device id (2 = block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (transport bits such as VERSION_1 included).
    fn features(&self) -> u64;
    /// Read the device-specific configuration at `offset` (clipped; zeros past the end).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device-specific configuration (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Complete every available request of queue `index`. Returns true if a used entry
    /// was added. Must never panic on guest input.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// Size of the backing resource, recorded in the state and checked on restore.
    fn backend_size(&self) -> u64;
    /// True when `process_queue` takes every available buffer of queue `index` (so the
    /// transport may suppress notifications while it drains the queue); false for a
    /// queue whose buffers wait for the backend (virtio-net receive).
    fn drains_queue(&self, _index: usize) -> bool {
        true
    }
    /// The driver accepted `features` and set `DRIVER_OK` (or, on restore, had): set the
    /// backend up for them (virtio-net: the TAP offloads). An error makes the transport
    /// set `NEEDS_RESET` (at `DRIVER_OK`) or refuse the restore. Runs on the vCPU thread
    /// that wrote the status (its seccomp filter must allow what this does).
    fn activate(&mut self, _features: u64) -> Result<(), String> {
        Ok(())
    }
    /// The driver reset the device: undo [`VirtioDevice::activate`].
    fn reset(&mut self) {}
    /// Stop (or restart) using the backend; the transport calls this under its lock.
    fn set_paused(&mut self, _paused: bool) {}
    /// Do a due timed action; returns how long until the next one, if any.
    fn timer_step(&mut self) -> Option<std::time::Duration> {
        None
    }
    /// A descriptor the worker watches, and the queue to process when it is readable.
    fn backend_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        None
    }
    /// A queue the worker polls, with the driver's notifications of it off, for this long
    /// after the device last did something (see [`worker`]); None: never.
    fn poll_queue(&self) -> Option<(usize, std::time::Duration)> {
        None
    }
}

/// One virtqueue as saved: `virtio_queue::QueueState` with serde.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QueueSaved {
    /// Size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Enabled by the driver.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use.
    pub event_idx: bool,
}

/// The registers of one virtio-pci device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct VirtioPciState {
    /// PCI slot.
    pub slot: u8,
    /// The 256 bytes of PCI configuration space (command, BAR, interrupt line).
    pub pci_config: Vec<u8>,
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `device_status`.
    pub status: u8,
    /// `config_generation`.
    pub config_generation: u8,
    /// Pending ISR bits.
    pub isr: u8,
    /// `queue_select`.
    pub queue_select: u16,
    /// The queues.
    pub queues: Vec<QueueSaved>,
    /// Size of the backing file when saved (a restore refuses a different size).
    pub backend_size: u64,
}

/// Saved state of all virtio devices.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct VirtioDevicesState {
    /// virtio-blk devices, in `VmConfig::disks` order.
    pub block: Vec<VirtioPciState>,
    /// virtio-net devices, in `VmConfig::nets` order (the MAC is in the configuration).
    #[serde(default)]
    pub net: Vec<VirtioPciState>,
    /// MSI-X of every device, disks then interfaces; empty from a launcher without MSI-X.
    /// Travels as its own `virtio-msix` sections (see `crate::state`), never inside this
    /// struct's bincode, which the unsectioned legacy format still decodes.
    #[serde(skip)]
    pub msix: Vec<TransportMsixState>,
    /// The offloads of every interface, in `VmConfig::nets` order; empty when no driver
    /// negotiated one (and from launchers without offloads). Its own
    /// `virtio-net-offload` sections, as `msix`.
    #[serde(skip)]
    pub net_offload: Vec<net::NetOffloadState>,
}

/// A device plugged in: its worker (stopped first on drop), transport and device.
struct Attached<D> {
    worker: Worker,
    pci: Arc<Mutex<VirtioPciDevice>>,
    dev: Arc<Mutex<D>>,
}

/// The virtio devices of a VM, plugged into its platform.
#[derive(Default)]
pub struct VirtioDevices {
    block: Vec<Attached<Block>>,
    net: Vec<Attached<net::Net>>,
}

impl std::fmt::Debug for VirtioDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioDevices")
            .field("block", &self.block.len())
            .field("net", &self.net.len())
            .finish()
    }
}

/// What [`attach`] needs besides the device.
struct AttachCtx<'a> {
    mem: &'a GuestMemoryMmap,
    kvm: &'a KvmVm,
    platform: &'a mut Platform,
    /// A restored VM that does not run yet: the device takes no request until resumed.
    paused: bool,
}

/// Plug `dev` into `slot`: INTx irqfd, MSI-X vectors, one ioeventfd per queue registered
/// with KVM, the saved registers if any, the PCI and MMIO buses, and its worker thread.
fn attach<D: VirtioDevice + 'static>(
    dev: D,
    slot: u8,
    saved: Option<(&VirtioPciState, Option<&TransportMsixState>)>,
    ctx: &mut AttachCtx<'_>,
    name: String,
) -> Result<Attached<D>, VirtioError> {
    let irq_err = |e: &dyn std::fmt::Display| VirtioError::Irq(e.to_string());
    let backend = dev.backend_fd();
    let poll = dev.poll_queue();
    let nq = dev.queue_max_sizes().len();
    let dev = Arc::new(Mutex::new(dev));
    let vm = ctx.kvm.fd();
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| irq_err(&e))?;
    vm.register_irqfd(&irq, intx_gsi(slot, 0))
        .map_err(|e| irq_err(&e))?;
    let msix = Msix::new(nq + 1, vm, ctx.kvm.router())?;
    let mut queues = Vec::with_capacity(nq);
    for q in 0..nq {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| irq_err(&e))?;
        let addr = bar0_address(slot) + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER);
        // The driver writes the queue index, 16 bits wide (virtio 1.x, 4.1.5.2); any other
        // write reaches the MMIO handler, which signals the same eventfd.
        vm.register_ioevent(&evt, &IoEventAddress::Mmio(addr), q as u16)
            .map_err(|e| irq_err(&format!("ioeventfd: {e}")))?;
        queues.push(evt);
    }
    let control = EventFd::new(EFD_NONBLOCK).map_err(|e| irq_err(&e))?;
    let clone = |e: &EventFd| e.try_clone().map_err(|e| irq_err(&e));
    let transport: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
    let mut pci = VirtioPciDevice::new(slot, transport, ctx.mem.clone(), irq)
        .with_msix(msix)
        .with_notifiers(
            queues.iter().map(clone).collect::<Result<_, _>>()?,
            clone(&control)?,
        );
    if let Some((regs, msix)) = saved {
        pci.restore(regs)?;
        pci.restore_msix(msix)?;
    }
    pci.set_paused(ctx.paused);
    let pci = Arc::new(Mutex::new(pci));
    lock(ctx.platform.pci_bus()).add_device(slot, Box::new(pci::ConfigHandle(pci.clone())))?;
    ctx.platform
        .insert_mmio(pci.clone(), bar0_address(slot), BAR0_SIZE)?;
    let fds = WorkerFds {
        queues,
        control,
        backend,
        poll,
    };
    let worker = Worker::spawn(name, pci.clone(), fds).map_err(|e| irq_err(&e))?;
    Ok(Attached { worker, pci, dev })
}

/// The slot of device `index` of a kind whose first slot is `first`.
fn slot_of(first: u8, index: usize, what: &str) -> Result<u8, VirtioError> {
    u8::try_from(index)
        .ok()
        .and_then(|i| first.checked_add(i))
        .filter(|s| *s < 32)
        .ok_or_else(|| VirtioError::BadState(format!("no PCI slot for {what} {index}")))
}

/// The saved registers of device `index` of `list`, and its MSI-X part (at `msix_index`
/// of `VirtioDevicesState::msix`, when the state has one).
fn saved_of<'a>(
    saved: Option<&'a VirtioDevicesState>,
    list: impl Fn(&'a VirtioDevicesState) -> &'a [VirtioPciState],
    index: usize,
    msix_index: usize,
) -> Option<(&'a VirtioPciState, Option<&'a TransportMsixState>)> {
    saved.map(|s| (&list(s)[index], s.msix.get(msix_index)))
}

impl VirtioDevices {
    /// Open every disk of `disks` (no lock yet), create its virtio-blk device in its slot
    /// and plug it in ([`attach`]). With `saved`, the device registers come from a
    /// snapshot or migration and must match `disks`; the device then starts paused.
    pub fn create(
        disks: &[DiskConfig],
        saved: Option<&VirtioDevicesState>,
        mem: &GuestMemoryMmap,
        kvm: &KvmVm,
        platform: &mut Platform,
    ) -> Result<Self, VirtioError> {
        if let Some(s) = saved {
            if s.block.len() != disks.len() {
                return Err(VirtioError::BadState(format!(
                    "the state has {} disk devices but the configuration lists {} disks",
                    s.block.len(),
                    disks.len()
                )));
            }
            check_msix_count(s)?;
        }
        let mut ctx = AttachCtx {
            mem,
            kvm,
            platform,
            paused: saved.is_some(),
        };
        let mut block = Vec::new();
        let mut seen: Vec<((u64, u64), String)> = Vec::new();
        for (i, cfg) in disks.iter().enumerate() {
            let slot = slot_of(FIRST_DISK_SLOT, i, "disk")?;
            let blk = Block::open(cfg)?;
            // OFD locks of one process conflict too, but say plainly what is wrong.
            if let Some(id) = blk.disk().identity() {
                if let Some((_, first)) = seen.iter().find(|(i, _)| *i == id) {
                    return Err(VirtioError::Duplicate {
                        path: cfg.path.clone(),
                        first: first.clone(),
                    });
                }
                seen.push((id, cfg.path.clone()));
            }
            let s = saved_of(saved, |s| &s.block, i, i);
            block.push(attach(blk, slot, s, &mut ctx, format!("blk{i}"))?);
        }
        Ok(VirtioDevices {
            block,
            net: Vec::new(),
        })
    }

    /// Attach every interface of `nets` to its TAP (by `fd` if set, else by `tap` name),
    /// create its virtio-net device and plug it in. With `saved`, the registers come from
    /// a snapshot or migration. `paused`: a restored VM that does not run yet (the device
    /// leaves the TAP alone until [`VirtioDevices::resume`]).
    pub fn create_nets(
        &mut self,
        nets: &[crate::config::NetConfig],
        saved: Option<&VirtioDevicesState>,
        mem: &GuestMemoryMmap,
        kvm: &KvmVm,
        platform: &mut Platform,
        paused: bool,
    ) -> Result<(), VirtioError> {
        if let Some(s) = saved {
            if !s.net_offload.is_empty() && s.net_offload.len() != s.net.len() {
                return Err(VirtioError::BadState(format!(
                    "the state has offloads for {} network devices but {} devices",
                    s.net_offload.len(),
                    s.net.len()
                )));
            }
            if s.net.len() != nets.len() {
                return Err(VirtioError::BadState(format!(
                    "the state has {} network devices but the configuration lists {}",
                    s.net.len(),
                    nets.len()
                )));
            }
        }
        let mut ctx = AttachCtx {
            mem,
            kvm,
            platform,
            paused,
        };
        for (index, cfg) in nets.iter().enumerate() {
            let slot = slot_of(FIRST_NET_SLOT, index, "net")?;
            let tap = match (cfg.fd, &cfg.tap) {
                (Some(fd), _) => tap::Tap::from_fd(fd),
                (None, Some(name)) => tap::Tap::open_named(name),
                (None, None) => {
                    return Err(VirtioError::Net {
                        index,
                        why: "no TAP given (tap=NAME or fd=N)".into(),
                    })
                }
            }
            .map_err(|source| VirtioError::Tap { index, source })?;
            let name = tap.name().to_string();
            let dev = net::Net::new(tap, cfg.mac, paused).map_err(|e| VirtioError::Net {
                index,
                why: e.to_string(),
            })?;
            let s = saved_of(saved, |s| &s.net, index, self.block.len() + index);
            if let Some((regs, _)) = s {
                check_offload(regs, saved.and_then(|s| s.net_offload.get(index)), index)?;
            }
            let attached = attach(dev, slot, s, &mut ctx, format!("net{index}"))?;
            tracing::info!(
                tap = %name,
                mac = %netcfg::format_mac(&cfg.mac),
                slot,
                "virtio-net attached"
            );
            self.net.push(attached);
        }
        Ok(())
    }

    fn transports(&self) -> impl Iterator<Item = (&Arc<Mutex<VirtioPciDevice>>, &Worker)> {
        let b = self.block.iter().map(|a| (&a.pci, &a.worker));
        b.chain(self.net.iter().map(|a| (&a.pci, &a.worker)))
    }

    /// Returns once every worker has passed its transport's lock: a device write into
    /// guest memory that started before this call has finished, and one that starts after
    /// it sees what this thread stored before the call (the switch-on of the VMM-side
    /// dirty bitmap, `vstate/vmm_dirty.rs`).
    pub fn sync_with_workers(&self) {
        for (pci, _) in self.transports() {
            drop(lock(pci));
        }
    }

    /// Stop taking requests (the vCPUs are paused or about to be). Returns once every
    /// worker finished the request it was on: completed requests are in the used rings,
    /// the others wait in the avail rings (and frames in the TAP queues).
    pub fn pause(&self) {
        for (pci, worker) in self.transports() {
            worker.hold(true);
            lock(pci).set_paused(true);
        }
    }

    /// Take requests again, and look at every queue (notifications may have arrived
    /// while paused, or in the previous process).
    pub fn resume(&self) {
        for (pci, worker) in self.transports() {
            lock(pci).set_paused(false);
            worker.hold(false);
            worker.kick();
        }
    }

    /// Announce every interface's MAC on its TAP (RARP), after a restore or migration.
    pub fn announce_nets(&self) {
        for n in &self.net {
            lock(&n.dev).announce();
            n.worker.kick();
        }
    }

    /// The TAP descriptors, in `VmConfig::nets` order (a local migration hands them over).
    pub fn net_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.net
            .iter()
            .map(|n| lock(&n.dev).tap().raw_fd())
            .collect()
    }

    /// Frame counters of every interface.
    pub fn net_counters(&self) -> Vec<net::NetCounters> {
        self.net.iter().map(|n| lock(&n.dev).counters()).collect()
    }

    /// Save every device's registers. The vCPUs must be paused.
    pub fn state(&self) -> VirtioDevicesState {
        VirtioDevicesState {
            block: self.block.iter().map(|a| lock(&a.pci).state()).collect(),
            net: self.net.iter().map(|a| lock(&a.pci).state()).collect(),
            // All or none (sections are numbered 0..n): none while no driver uses MSI-X,
            // so that a launcher without MSI-X can still load the state.
            msix: if self.transports().any(|(p, _)| lock(p).msix_in_use()) {
                self.transports()
                    .map(|(p, _)| lock(p).msix_state())
                    .collect()
            } else {
                Vec::new()
            },
            // All or none, as MSI-X: none while no driver negotiated an offload, so that
            // a launcher without offloads can still load the state (and refuses it
            // otherwise, see `net::NetOffloadState`).
            // From the transport's negotiated features, not the device's activation: a
            // driver saved between FEATURES_OK and DRIVER_OK has accepted offloads too.
            net_offload: {
                let all: Vec<_> = self
                    .net
                    .iter()
                    .map(|n| {
                        let negotiated = lock(&n.pci).state().driver_features;
                        lock(&n.dev).offload_state(negotiated)
                    })
                    .collect();
                if all.iter().any(|o| o.features != 0) {
                    all
                } else {
                    Vec::new()
                }
            },
        }
    }

    /// Take every disk's ownership lock (idempotent). On failure the locks taken by this
    /// call stay taken; the caller must not run the guest.
    pub fn lock_disks(&self) -> Result<(), VirtioError> {
        for a in &self.block {
            lock(&a.dev).disk_mut().lock()?;
        }
        Ok(())
    }

    /// Release every disk's ownership lock (idempotent). The vCPUs must be paused.
    pub fn unlock_disks(&self) -> Result<(), VirtioError> {
        for a in &self.block {
            lock(&a.dev).disk_mut().unlock()?;
        }
        Ok(())
    }

    /// True when every disk holds its lock.
    pub fn disks_locked(&self) -> bool {
        self.block.iter().all(|a| lock(&a.dev).disk().is_locked())
    }
}

/// The `virtio-net-offload` section of interface `index`, if any, says what its
/// transport's negotiated features say (a mismatch is a corrupt or foreign state).
fn check_offload(
    regs: &VirtioPciState,
    saved: Option<&net::NetOffloadState>,
    index: usize,
) -> Result<(), VirtioError> {
    let negotiated = regs.driver_features & net::OFFLOADS;
    if let Some(o) = saved {
        if o.features != negotiated {
            return Err(VirtioError::BadState(format!(
                "network interface {index}: offloads {:#x} saved but features {negotiated:#x} negotiated",
                o.features
            )));
        }
    }
    Ok(())
}

/// A state with MSI-X parts has one per device.
fn check_msix_count(s: &VirtioDevicesState) -> Result<(), VirtioError> {
    let devices = s.block.len() + s.net.len();
    if !s.msix.is_empty() && s.msix.len() != devices {
        return Err(VirtioError::BadState(format!(
            "the state has MSI-X for {} devices but {devices} devices",
            s.msix.len()
        )));
    }
    Ok(())
}

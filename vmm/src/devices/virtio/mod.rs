//! virtio devices on the PCI bus (virtio 1.x "modern" virtio-pci transport).
//!
//! * [`pci::VirtioPciDevice`] is the transport: PCI configuration space with the virtio
//!   vendor capabilities, and one 32-bit memory BAR (BAR0) holding the common, ISR,
//!   device-specific and notify structures. The VMM assigns BAR0 a fixed address in the
//!   32-bit PCI window ([`bar0_address`]) and routes it on the MMIO bus; the guest may size
//!   the BAR but the device does not move if the guest writes another address.
//! * Interrupts are INTx pin A of the device's slot, delivered as an edge through an irqfd
//!   on IOAPIC GSI [`intx_gsi`] (the DSDT's `_PRT` says the same); the ISR register reads
//!   and clears the cause. There is no MSI-X. Tiny guests poll the used ring instead.
//! * Requests are processed synchronously on the vCPU thread that writes the queue's notify
//!   register. So when the VM is paused no request is in flight: a saved state holds only
//!   queue addresses and indices, never a half-done request.
//! * [`block::Block`]: virtio-blk on a raw file ([`disk::DiskFile`]), slots from
//!   [`FIRST_DISK_SLOT`].
//! * [`net::Net`]: virtio-net on a TAP ([`tap::Tap`]), slots from [`FIRST_NET_SLOT`]. Its
//!   receive side is the one exception to "requests on the vCPU thread": a thread per device
//!   fills RX buffers when frames arrive (see the module), and is stopped at every pause.
//!
//! Every write the devices make into guest memory goes through vm-memory, which marks the
//! VMM-side dirty bitmap that migration merges with KVM's dirty log.

pub mod block;
pub mod disk;
pub mod net;
#[cfg(test)]
mod net_tests;
pub mod netcfg;
pub mod pci;
pub mod tap;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::block::Block;
use self::disk::DiskError;
use self::pci::{VirtioPciDevice, BAR0_SIZE};
use super::bus::lock;
use super::pci::PciError;
use super::platform::Platform;
use super::BusError;
use crate::config::DiskConfig;
use crate::vstate::memory::GuestMemoryMmap;

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
}

/// A virtio-blk device: its transport and the device behind it.
type BlockPair = (Arc<Mutex<VirtioPciDevice>>, Arc<Mutex<Block>>);

/// A virtio-net device: its RX thread (stopped first on drop), transport and device.
struct NetDev {
    _rx: net::RxThread,
    pci: Arc<Mutex<VirtioPciDevice>>,
    dev: Arc<Mutex<net::Net>>,
}

/// The virtio devices of a VM, plugged into its platform.
#[derive(Default)]
pub struct VirtioDevices {
    block: Vec<BlockPair>,
    net: Vec<NetDev>,
}

impl std::fmt::Debug for VirtioDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioDevices")
            .field("block", &self.block.len())
            .field("net", &self.net.len())
            .finish()
    }
}

impl VirtioDevices {
    /// Open every disk of `disks` (no lock yet), create its virtio-blk device in its slot,
    /// map BAR0 and wire INTx through an irqfd. With `saved`, the device registers come
    /// from a snapshot or migration and must match `disks`.
    pub fn create(
        disks: &[DiskConfig],
        saved: Option<&VirtioDevicesState>,
        mem: &GuestMemoryMmap,
        vm: &VmFd,
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
        }
        let mut block = Vec::new();
        let mut seen: Vec<((u64, u64), String)> = Vec::new();
        for (i, cfg) in disks.iter().enumerate() {
            let slot = u8::try_from(i)
                .ok()
                .and_then(|i| FIRST_DISK_SLOT.checked_add(i))
                .filter(|s| *s < 32)
                .ok_or_else(|| VirtioError::BadState(format!("no PCI slot for disk {i}")))?;
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
            let dev = Arc::new(Mutex::new(blk));
            let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VirtioError::Irq(e.to_string()))?;
            vm.register_irqfd(&irq, intx_gsi(slot, 0))
                .map_err(|e| VirtioError::Irq(e.to_string()))?;
            let transport: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
            let mut pci = VirtioPciDevice::new(slot, transport, mem.clone(), irq);
            if let Some(s) = saved {
                pci.restore(&s.block[i])?;
            }
            let pci = Arc::new(Mutex::new(pci));
            platform
                .pci_bus()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add_device(slot, Box::new(pci::ConfigHandle(pci.clone())))?;
            platform.insert_mmio(pci.clone(), bar0_address(slot), BAR0_SIZE)?;
            block.push((pci, dev));
        }
        Ok(VirtioDevices {
            block,
            net: Vec::new(),
        })
    }

    /// Attach every interface of `nets` to its TAP (by `fd` if set, else by `tap` name),
    /// create its virtio-net device and RX thread. With `saved`, the registers come from a
    /// snapshot or migration. `paused`: a restored VM that does not run yet (the RX thread
    /// leaves the TAP alone until [`VirtioDevices::resume_nets`]).
    pub fn create_nets(
        &mut self,
        nets: &[crate::config::NetConfig],
        saved: Option<&VirtioDevicesState>,
        mem: &GuestMemoryMmap,
        vm: &VmFd,
        platform: &mut Platform,
        paused: bool,
    ) -> Result<(), VirtioError> {
        if let Some(s) = saved {
            if s.net.len() != nets.len() {
                return Err(VirtioError::BadState(format!(
                    "the state has {} network devices but the configuration lists {}",
                    s.net.len(),
                    nets.len()
                )));
            }
        }
        for (index, cfg) in nets.iter().enumerate() {
            let slot = u8::try_from(index)
                .ok()
                .and_then(|i| FIRST_NET_SLOT.checked_add(i))
                .filter(|s| *s < 32)
                .ok_or_else(|| VirtioError::BadState(format!("no PCI slot for net {index}")))?;
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
            let host = |e: std::io::Error| VirtioError::Net {
                index,
                why: e.to_string(),
            };
            let name = tap.name().to_string();
            let dev = Arc::new(Mutex::new(
                net::Net::new(tap, cfg.mac, paused).map_err(host)?,
            ));
            let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VirtioError::Irq(e.to_string()))?;
            vm.register_irqfd(&irq, intx_gsi(slot, 0))
                .map_err(|e| VirtioError::Irq(e.to_string()))?;
            let transport: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
            let mut pci = VirtioPciDevice::new(slot, transport, mem.clone(), irq);
            if let Some(s) = saved {
                pci.restore(&s.net[index])?;
            }
            let pci = Arc::new(Mutex::new(pci));
            platform
                .pci_bus()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add_device(slot, Box::new(pci::ConfigHandle(pci.clone())))?;
            platform.insert_mmio(pci.clone(), bar0_address(slot), BAR0_SIZE)?;
            let rx = net::RxThread::spawn(pci.clone(), dev.clone(), format!("net{index}-rx"))
                .map_err(host)?;
            tracing::info!(
                tap = %name,
                mac = %netcfg::format_mac(&cfg.mac),
                slot,
                "virtio-net attached"
            );
            self.net.push(NetDev { _rx: rx, pci, dev });
        }
        Ok(())
    }

    /// Stop reading the TAPs (the vCPUs are paused or about to be). Returns once no RX
    /// pass is in progress: frames are in guest memory or still in the TAP queue.
    pub fn pause_nets(&self) {
        for n in &self.net {
            lock(&n.dev).set_paused(true);
        }
    }

    /// Read the TAPs again.
    pub fn resume_nets(&self) {
        for n in &self.net {
            lock(&n.dev).set_paused(false);
        }
    }

    /// Announce every interface's MAC on its TAP (RARP), after a restore or migration.
    pub fn announce_nets(&self) {
        for n in &self.net {
            lock(&n.dev).announce();
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
            block: self.block.iter().map(|(p, _)| lock(p).state()).collect(),
            net: self.net.iter().map(|n| lock(&n.pci).state()).collect(),
        }
    }

    /// Take every disk's ownership lock (idempotent). On failure the locks taken by this
    /// call stay taken; the caller must not run the guest.
    pub fn lock_disks(&self) -> Result<(), VirtioError> {
        for (_, b) in &self.block {
            lock(b).disk_mut().lock()?;
        }
        Ok(())
    }

    /// Release every disk's ownership lock (idempotent). The vCPUs must be paused.
    pub fn unlock_disks(&self) -> Result<(), VirtioError> {
        for (_, b) in &self.block {
            lock(b).disk_mut().unlock()?;
        }
        Ok(())
    }

    /// True when every disk holds its lock.
    pub fn disks_locked(&self) -> bool {
        self.block.iter().all(|(_, b)| lock(b).disk().is_locked())
    }
}

//! The modern virtio-pci transport (virtio 1.x, section 4.1).
//!
//! Configuration space: vendor 0x1af4, device 0x1040 + device type, revision 1, a 32-bit
//! memory BAR0 of [`BAR0_SIZE`] bytes, INTA, and a capability list of four
//! `virtio_pci_cap` structures pointing into BAR0:
//!
//! | BAR0 offset | structure | capability |
//! |---|---|---|
//! | `0x0000` | common configuration | `cfg_type` 1 at config offset `0x40` |
//! | `0x1000` | ISR status (read clears) | `cfg_type` 3 at `0x50` |
//! | `0x2000` | device-specific configuration | `cfg_type` 4 at `0x60` |
//! | `0x3000` | notify: queue `q` at `0x3000 + 4 q` | `cfg_type` 2 at `0x70`, multiplier 4 |
//! | `0x4000` | MSI-X table, 16 bytes per vector | MSI-X capability at `0x84` |
//! | `0x5000` | MSI-X pending bit array | (same) |
//!
//! **Notifications.** With [`VirtioPciDevice::with_notifiers`], each queue's notify address
//! is a KVM ioeventfd (registered by the owner, see [`super::VirtioDevices`]), so the vCPU
//! writes it without leaving the kernel and the device's worker thread
//! ([`super::worker`]) calls [`VirtioPciDevice::process`]. A notify that still reaches
//! the MMIO handler is forwarded to the same eventfd. Without notifiers (unit tests) the
//! notify is processed at once on the caller's thread.
//!
//! **Interrupts.** A used buffer is signalled on the queue's MSI-X vector when the driver
//! enabled MSI-X ([`super::msix`]), else by setting the ISR and pulsing INTx.
//!
//! **Pause.** Every request is processed under this device's lock and completed (used ring
//! written) before the lock is released; [`VirtioPciDevice::set_paused`] takes the lock and
//! from then on `process` does nothing. So once the pause returns, no request is in flight
//! and the saved queue indices say exactly which requests are done. The notifications
//! that arrive while paused are not lost: the resume processes every queue once.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::msix::{Msix, MsixState};
use super::{bar0_address, intx_gsi, QueueSaved, VirtioDevice, VirtioError, VirtioPciState};
use crate::devices::bus::lock;
use crate::devices::pci::{PciConfigSpace, PciDevice, PCI_CONFIG_SPACE_LEGACY_SIZE};
use crate::devices::{BusDevice, VmEvent};
use crate::vstate::memory::GuestMemoryMmap;

/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
pub(crate) const NOTIFY_OFFSET: u64 = 0x3000;
const REGION_SIZE: u64 = 0x1000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Configuration-space offset of the MSI-X capability (after the 20-byte notify one).
const MSIX_CAP: usize = 0x84;
const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Message control: MSI-X enable, function mask.
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes between two queues' notify addresses.
pub(crate) const NOTIFY_MULTIPLIER: u32 = 4;

const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const PCI_CAP_ID_VNDR: u8 = 0x09;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// "No MSI-X vector".
const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// PCI command register: memory space enable.
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_OFFSET: u16 = 0x04;

/// The virtio-pci function: transport registers around a [`VirtioDevice`].
pub struct VirtioPciDevice {
    slot: u8,
    config: PciConfigSpace,
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    irq: EventFd,
    msix: Option<Msix>,
    /// `msix_config` and each queue's `queue_msix_vector`.
    config_vector: u16,
    queue_vectors: Vec<u16>,
    /// One eventfd per queue (the ioeventfds), and the worker's wake-up.
    notifiers: Option<(Vec<EventFd>, EventFd)>,
    paused: bool,
    queues: Vec<Queue>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    isr: u8,
    queue_select: u16,
}

impl VirtioPciDevice {
    /// A device in its reset state, at `slot`, raising INTx through `irq`.
    pub fn new(
        slot: u8,
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Self {
        let (dtype, sizes) = {
            let d = lock(&device);
            (d.device_type(), d.queue_max_sizes().to_vec())
        };
        let queues = sizes
            .iter()
            .map(|s| Queue::new(*s).unwrap_or_else(|_| Queue::new(256).expect("valid size")))
            .collect();
        VirtioPciDevice {
            slot,
            config: Self::initial_config(slot, dtype),
            device,
            mem,
            irq,
            msix: None,
            config_vector: VIRTIO_MSI_NO_VECTOR,
            queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; sizes.len()],
            notifiers: None,
            paused: false,
            queues,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            isr: 0,
            queue_select: 0,
        }
    }

    /// Give the device MSI-X (one vector per queue plus the configuration vector) and
    /// announce it in the capability list.
    pub fn with_msix(mut self, msix: Msix) -> Self {
        let n = msix.len() as u16;
        let c = &mut self.config;
        // Chain the notify capability (0x70) to MSI-X.
        c.set(0x71, &[MSIX_CAP as u8]);
        c.set(MSIX_CAP, &[PCI_CAP_ID_MSIX, 0]);
        c.set(MSIX_CAP + 2, &(n - 1).to_le_bytes());
        c.set(MSIX_CAP + 4, &(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        c.set(MSIX_CAP + 8, &(MSIX_PBA_OFFSET as u32).to_le_bytes());
        c.set_writable(
            MSIX_CAP + 2,
            &(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes(),
        );
        self.msix = Some(msix);
        self
    }

    /// Serve notifications on a worker thread: `queue_evts[q]` is queue `q`'s ioeventfd,
    /// `kick` wakes the worker to process every queue (the driver became ready).
    pub fn with_notifiers(mut self, queue_evts: Vec<EventFd>, kick: EventFd) -> Self {
        self.notifiers = Some((queue_evts, kick));
        self
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Stop (or restart) processing requests. Pausing takes the device lock, so it waits
    /// for a request being processed; afterwards nothing is in flight until the resume.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        lock(&self.device).set_paused(paused);
    }

    /// The backend's next timed event (see [`VirtioDevice::timer_step`]).
    pub fn device_timer(&mut self) -> Option<std::time::Duration> {
        lock(&self.device).timer_step()
    }

    fn kick_worker(&self) {
        if let Some((_, kick)) = &self.notifiers {
            let _ = kick.write(1);
        }
    }

    fn msix_control(&self) -> (bool, bool) {
        if self.msix.is_none() {
            return (false, false);
        }
        let mut b = [0u8; 2];
        self.config.read(MSIX_CAP as u16 + 2, &mut b);
        let v = u16::from_le_bytes(b);
        (v & MSIX_ENABLE != 0, v & MSIX_FUNCTION_MASK != 0)
    }

    /// A guest read of the PCI configuration space.
    pub fn read_config_space(&self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    /// A guest write to the PCI configuration space (through the write mask); a change
    /// of the MSI-X enable or function-mask bit takes effect at once.
    pub fn write_config_space(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        let (offset, len) = (offset, data.len());
        let ctl = MSIX_CAP as u16 + 2;
        if offset < ctl + 2 && offset + len as u16 > ctl {
            let (enabled, masked) = self.msix_control();
            if let Some(m) = &mut self.msix {
                m.set_control(enabled, masked);
            }
        }
    }

    fn initial_config(slot: u8, dtype: u32) -> PciConfigSpace {
        let mut c = PciConfigSpace::new();
        c.set(0x00, &VIRTIO_PCI_VENDOR_ID.to_le_bytes());
        c.set(
            0x02,
            &(VIRTIO_PCI_DEVICE_ID_BASE + dtype as u16).to_le_bytes(),
        );
        // Command: memory space and bus master, as firmware leaves an assigned device.
        c.set(0x04, &0x0006u16.to_le_bytes());
        // Status: capability list.
        c.set(0x06, &0x0010u16.to_le_bytes());
        // Revision 1 (modern), class: mass storage / other for block, else "other".
        let class: [u8; 4] = if dtype == 2 {
            [0x01, 0x00, 0x80, 0x01]
        } else if dtype == 1 {
            // Network controller, Ethernet.
            [0x01, 0x00, 0x00, 0x02]
        } else {
            [0x01, 0x00, 0x80, 0xff]
        };
        c.set(0x08, &class);
        // BAR0: 32-bit memory, not prefetchable, at its fixed address.
        c.set(0x10, &(bar0_address(slot) as u32).to_le_bytes());
        c.set(0x2c, &VIRTIO_PCI_VENDOR_ID.to_le_bytes());
        c.set(0x2e, &(0x40u16 + dtype as u16).to_le_bytes());
        c.set(0x34, &[0x40]);
        // Interrupt line (the GSI, as firmware would write it) and pin INTA.
        c.set(0x3c, &[intx_gsi(slot, 0) as u8, 1]);
        let caps = [
            (0x40u8, VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, 0x38u32),
            (0x50, VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1),
            (
                0x60,
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_OFFSET,
                REGION_SIZE as u32,
            ),
            (
                0x70,
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                REGION_SIZE as u32,
            ),
        ];
        for (at, cfg_type, offset, length) in caps {
            let next = if at == 0x70 { 0 } else { at + 0x10 };
            let len = if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG {
                20
            } else {
                16
            };
            let at = usize::from(at);
            c.set(at, &[PCI_CAP_ID_VNDR, next, len, cfg_type, 0, 0, 0, 0]);
            c.set(at + 8, &(offset as u32).to_le_bytes());
            c.set(at + 12, &length.to_le_bytes());
            if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG {
                c.set(at + 16, &NOTIFY_MULTIPLIER.to_le_bytes());
            }
        }
        // Guest-writable: command, BAR0 address bits (sizing), interrupt line.
        c.set_writable(0x04, &0x0547u16.to_le_bytes());
        c.set_writable(0x10, &(!(BAR0_SIZE as u32 - 1)).to_le_bytes());
        c.set_writable(0x3c, &[0xff]);
        c
    }

    /// Load registers saved by [`VirtioPciDevice::state`].
    pub fn restore(&mut self, s: &VirtioPciState) -> Result<(), VirtioError> {
        let bad = |why: String| VirtioError::BadState(why);
        if s.slot != self.slot {
            return Err(bad(format!(
                "device saved in PCI slot {} is configured in slot {}",
                s.slot, self.slot
            )));
        }
        if s.pci_config.len() != PCI_CONFIG_SPACE_LEGACY_SIZE {
            return Err(bad(format!(
                "PCI configuration space is {} bytes",
                s.pci_config.len()
            )));
        }
        let size = lock(&self.device).backend_size();
        if s.backend_size != size {
            return Err(bad(format!(
                "the disk in slot {} is {size} bytes here but was {} bytes when the VM was saved",
                self.slot, s.backend_size
            )));
        }
        if s.queues.len() != self.queues.len() {
            return Err(bad(format!("{} queues saved", s.queues.len())));
        }
        let mut queues = Vec::new();
        for (q, cur) in s.queues.iter().zip(&self.queues) {
            if q.max_size != cur.max_size() {
                return Err(bad(format!("queue size {} saved", q.max_size)));
            }
            let st = virtio_queue::QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            queues.push(Queue::try_from(st).map_err(|e| bad(format!("queue: {e}")))?);
        }
        self.config.set(0, &s.pci_config);
        self.queues = queues;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.isr = s.isr;
        self.queue_select = s.queue_select;
        if self.driver_ok() {
            // The backend of this process starts unconfigured (a virtio-net TAP: no
            // offloads): set it up for what the guest's driver negotiated.
            lock(&self.device)
                .activate(self.driver_features)
                .map_err(|e| bad(format!("slot {}: {e}", self.slot)))?;
        }
        Ok(())
    }

    /// Load the MSI-X part saved by [`VirtioPciDevice::msix_state`] (after
    /// [`VirtioPciDevice::restore`], whose configuration space holds the enable bits), and
    /// program the routes of this VM. Absent (a launcher without MSI-X saved the device):
    /// every vector stays unassigned and the driver keeps using INTx.
    pub fn restore_msix(&mut self, s: Option<&TransportMsixState>) -> Result<(), VirtioError> {
        let Some(s) = s else {
            return Ok(());
        };
        let bad = |why: String| VirtioError::BadState(why);
        if s.queue_vectors.len() != self.queues.len() {
            return Err(bad(format!(
                "{} queue vectors saved for {} queues",
                s.queue_vectors.len(),
                self.queues.len()
            )));
        }
        let (enabled, masked) = self.msix_control();
        match (&mut self.msix, &s.msix) {
            (Some(m), Some(saved)) => m.restore(saved, enabled, masked)?,
            (None, None) => {}
            _ => return Err(bad("MSI-X saved on one side only".into())),
        }
        self.config_vector = s.config_vector;
        self.queue_vectors = s.queue_vectors.clone();
        Ok(())
    }

    /// True once the driver touched MSI-X (enabled it, assigned a vector or wrote the
    /// table). A state whose devices are all untouched is written without MSI-X
    /// sections, so that a launcher without MSI-X can still load it.
    pub fn msix_in_use(&self) -> bool {
        let untouched = self.msix.as_ref().is_none_or(|m| {
            let st = m.state();
            st.pba == 0
                && st
                    .table
                    .iter()
                    .all(|e| *e == super::msix::MsixEntry::default())
        });
        self.msix_control().0
            || self.config_vector != VIRTIO_MSI_NO_VECTOR
            || self
                .queue_vectors
                .iter()
                .any(|v| *v != VIRTIO_MSI_NO_VECTOR)
            || !untouched
    }

    /// The MSI-X table, pending bits and vector assignments, for `VmState`.
    pub fn msix_state(&self) -> TransportMsixState {
        TransportMsixState {
            msix: self.msix.as_ref().map(Msix::state),
            config_vector: self.config_vector,
            queue_vectors: self.queue_vectors.clone(),
        }
    }

    /// The registers, for `VmState`.
    pub fn state(&self) -> VirtioPciState {
        VirtioPciState {
            slot: self.slot,
            pci_config: self.config.bytes().to_vec(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            isr: self.isr,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSaved {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
            backend_size: lock(&self.device).backend_size(),
        }
    }

    fn device_features(&self) -> u64 {
        lock(&self.device).features() | (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        lock(&self.device).reset();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.isr = 0;
        self.queue_select = 0;
        self.config_vector = VIRTIO_MSI_NO_VECTOR;
        self.queue_vectors.fill(VIRTIO_MSI_NO_VECTOR);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn driver_ok(&self) -> bool {
        let s = u32::from(self.status);
        s & VIRTIO_CONFIG_S_DRIVER_OK != 0 && s & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = u32::from(v);
        let old = u32::from(self.status);
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && old & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            let offered = self.device_features();
            let accepted = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !accepted {
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            } else {
                let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
                for q in &mut self.queues {
                    q.set_event_idx(event_idx);
                }
            }
        }
        if v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && old & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            let valid = v & VIRTIO_CONFIG_S_FEATURES_OK != 0
                && self
                    .queues
                    .iter()
                    .all(|q| !q.ready() || q.is_valid(&self.mem));
            if !valid {
                tracing::warn!(
                    slot = self.slot,
                    "virtio driver set DRIVER_OK with unusable queues"
                );
                v |= VIRTIO_CONFIG_S_NEEDS_RESET;
            } else if let Err(e) = lock(&self.device).activate(self.driver_features) {
                tracing::warn!(slot = self.slot, "virtio device activation: {e}");
                v |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
        self.status = v as u8;
        if self.driver_ok() {
            // Buffers posted before DRIVER_OK were not processed: look now.
            self.kick_worker();
        }
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select));
        let v: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device_features() & 0xffff_ffff,
                1 => self.device_features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.config_vector),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size())),
            (0x1a, 2) => self
                .queue_vectors
                .get(usize::from(self.queue_select))
                .map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |v| u64::from(*v)),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.ready())),
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20..=0x37, 4 | 8) => {
                let Some(q) = q else {
                    data.fill(0);
                    return;
                };
                let base = match offset & !7 {
                    0x20 => q.desc_table(),
                    0x28 => q.avail_ring(),
                    _ => q.used_ring(),
                };
                if offset & 4 != 0 {
                    base >> 32
                } else {
                    base
                }
            }
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let v32 = v as u32;
        let v16 = v as u16;
        // Queue registers may change only before DRIVER_OK.
        let queue_cfg_allowed = u32::from(self.status) & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v32,
            (0x08, 4) => self.driver_feature_select = v32,
            (0x0c, 4) if u32::from(self.status) & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                    }
                    _ => {}
                }
            }
            (0x10, 2) => self.config_vector = self.valid_vector(v16),
            (0x1a, 2) => {
                let v = self.valid_vector(v16);
                if let Some(slot) = self.queue_vectors.get_mut(usize::from(self.queue_select)) {
                    *slot = v;
                }
            }
            (0x14, 1) => self.set_status(v as u8),
            (0x16, 2) => self.queue_select = v16,
            (0x18, 2) if queue_cfg_allowed => {
                if let Some(q) = self.selected_queue() {
                    // Queue::set_size ignores (and logs) sizes that are not a power of two
                    // or exceed the maximum.
                    q.set_size(v16);
                }
            }
            (0x1c, 2) if queue_cfg_allowed => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v16 == 1);
                }
            }
            (0x20..=0x37, 4 | 8) if queue_cfg_allowed => {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                let (lo, hi) = match (offset & 4 != 0, data.len()) {
                    (false, 8) => (Some(v32), Some((v >> 32) as u32)),
                    (false, _) => (Some(v32), None),
                    (true, _) => (None, Some(v32)),
                };
                match offset & !7 {
                    0x20 => q.set_desc_table_address(lo, hi),
                    0x28 => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => {}
        }
    }

    /// A vector the device has, or "no vector" (which the driver reads back as a refusal).
    fn valid_vector(&self, v: u16) -> u16 {
        match &self.msix {
            Some(m) if usize::from(v) < m.len() => v,
            _ => VIRTIO_MSI_NO_VECTOR,
        }
    }

    /// Complete the available requests of `queue` (a notification arrived), then
    /// interrupt the driver if it asked for it. Does nothing while paused or before the
    /// driver is ready. Notifications are suppressed while the queue is being drained,
    /// and the queue is looked at again if the driver added buffers meanwhile; they are on
    /// when this returns (which also ends a [`Self::poll`] phase). Returns whether
    /// requests were taken.
    pub fn process(&mut self, queue: usize) -> bool {
        self.serve(queue, true)
    }

    /// For a worker that polls `queue` ([`super::worker`]): turn the driver's
    /// notifications of it off while the worker looks at the ring itself. With
    /// `VIRTIO_RING_F_EVENT_IDX` this sets `avail_event` one behind what the device has
    /// taken, an index the driver's next publication never crosses; without,
    /// `VRING_USED_F_NO_NOTIFY`. [`Self::process`] turns them on again.
    pub fn suppress_notifications(&mut self, queue: usize) {
        if self.paused || !self.driver_ok() {
            return;
        }
        if let Some(q) = self.queues.get_mut(queue).filter(|q| q.ready()) {
            suppress(q, &self.mem);
        }
    }

    /// Serve `queue` during a polling phase (after [`Self::suppress_notifications`]): like
    /// [`Self::process`], but notifications stay off. Returns whether requests were taken.
    pub fn poll(&mut self, queue: usize) -> bool {
        self.serve(queue, false)
    }

    fn serve(&mut self, queue: usize, rearm: bool) -> bool {
        if self.paused || !self.driver_ok() {
            return false;
        }
        let Some(q) = self.queues.get_mut(queue) else {
            return false;
        };
        if !q.ready() {
            return false;
        }
        let start = q.next_avail();
        if !rearm
            && q.avail_idx(&self.mem, Ordering::Acquire)
                .is_ok_and(|i| i.0 == start)
        {
            return false; // nothing new: the common case of a polling pass
        }
        let mut dev = lock(&self.device);
        let drains = dev.drains_queue(queue);
        let mut used = false;
        loop {
            if drains {
                let _ = q.disable_notification(&self.mem);
            }
            let before = q.next_avail();
            used |= dev.process_queue(queue, q, &self.mem);
            let progressed = q.next_avail() != before;
            if !rearm {
                suppress(q, &self.mem);
                break;
            }
            // Re-enable (for EVENT_IDX: publish avail_event = next_avail); more buffers
            // may have arrived before the driver could see it. A queue that did not move
            // (a bogus avail index) is left for the next notification.
            match q.enable_notification(&self.mem) {
                Ok(true) if drains && progressed => continue,
                _ => break,
            }
        }
        drop(dev);
        let progressed = q.next_avail() != start;
        if used && q.needs_notification(&self.mem).unwrap_or(true) {
            self.signal(queue);
        }
        progressed
    }

    /// Process every queue (a resume, or the driver became ready).
    pub fn process_all(&mut self) {
        for q in 0..self.queues.len() {
            self.process(q);
        }
    }

    /// Interrupt the driver for `queue`: its MSI-X vector when MSI-X is on, else INTx.
    fn signal(&mut self, queue: usize) {
        let vector = self.queue_vectors.get(queue).copied();
        if let Some(m) = self.msix.as_mut().filter(|m| m.enabled()) {
            if let Some(v) = vector.filter(|v| *v != VIRTIO_MSI_NO_VECTOR) {
                m.signal(usize::from(v));
            }
            return;
        }
        self.isr |= 1;
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(slot = self.slot, "virtio interrupt: {e}");
        }
    }

    /// A write to queue `queue`'s notify address that reached the VMM.
    fn notify(&mut self, queue: usize) {
        match &self.notifiers {
            Some((evts, _)) => {
                if let Some(e) = evts.get(queue) {
                    let _ = e.write(1);
                }
            }
            None => {
                self.process(queue);
            }
        }
    }

    fn decodes_memory(&self) -> bool {
        let mut cmd = [0u8; 2];
        self.config.read(PCI_COMMAND_OFFSET, &mut cmd);
        u16::from_le_bytes(cmd) & PCI_COMMAND_MEMORY != 0
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !self.decodes_memory() {
            data.fill(0xff);
            return;
        }
        match offset {
            o if o < ISR_OFFSET => self.common_read(o - COMMON_OFFSET, data),
            ISR_OFFSET => {
                if let Some(b) = data.first_mut() {
                    *b = self.isr;
                    self.isr = 0;
                }
            }
            o if o < DEVICE_OFFSET => {}
            o if o < NOTIFY_OFFSET => lock(&self.device).read_config(o - DEVICE_OFFSET, data),
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                if let Some(m) = &self.msix {
                    m.read_table(o - MSIX_TABLE_OFFSET, data);
                }
            }
            o if o >= MSIX_PBA_OFFSET => {
                if let Some(m) = &self.msix {
                    m.read_pba(o - MSIX_PBA_OFFSET, data);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmEvent {
        if !self.decodes_memory() {
            return VmEvent::None;
        }
        match offset {
            o if o < ISR_OFFSET => self.common_write(o - COMMON_OFFSET, data),
            o if o < DEVICE_OFFSET => {}
            o if o < NOTIFY_OFFSET => lock(&self.device).write_config(o - DEVICE_OFFSET, data),
            o if o < NOTIFY_OFFSET + REGION_SIZE => {
                let rel = o - NOTIFY_OFFSET;
                if rel.is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) {
                    self.notify((rel / u64::from(NOTIFY_MULTIPLIER)) as usize);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                if let Some(m) = &mut self.msix {
                    m.write_table(o - MSIX_TABLE_OFFSET, data);
                }
            }
            _ => {}
        }
        VmEvent::None
    }
}

/// The configuration-space side of a shared [`VirtioPciDevice`], for the PCI bus.
pub struct ConfigHandle(pub Arc<Mutex<VirtioPciDevice>>);

impl PciDevice for ConfigHandle {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        lock(&self.0).read_config_space(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        lock(&self.0).write_config_space(offset, data);
    }
}

/// The MSI-X side of one transport as saved: table and pending bits, and which vector
/// each queue and the configuration use.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct TransportMsixState {
    /// Table and pending bits; `None` for a device without MSI-X.
    pub msix: Option<MsixState>,
    /// `msix_config`.
    pub config_vector: u16,
    /// `queue_msix_vector` of each queue.
    pub queue_vectors: Vec<u16>,
}

/// Turn the driver's notifications of `q` off (see
/// [`VirtioPciDevice::suppress_notifications`]).
fn suppress(q: &mut Queue, mem: &GuestMemoryMmap) {
    if !q.event_idx_enabled() {
        let _ = q.disable_notification(mem);
        return;
    }
    // avail_event sits after the used ring's entries: flags, idx, size * (id, len).
    let at = q
        .used_ring()
        .checked_add(4 + 8 * u64::from(q.size()))
        .map(GuestAddress);
    if let Some(at) = at {
        let _ = mem.store(
            u16::to_le(q.next_avail().wrapping_sub(1)),
            at,
            Ordering::Release,
        );
    }
}

//! MSI-X for the virtio-pci transport (PCI 3.0 section 6.8.2).
//!
//! Each device has one vector per queue plus one for configuration changes. The table
//! (16 bytes per vector: address low, address high, data, vector control) and the pending
//! bit array live in BAR0 (see [`super::pci`]); the capability in configuration space
//! holds the enable and function-mask bits.
//!
//! Vector `i` is an irqfd on GSI `first_gsi + i`. That GSI carries an MSI route in KVM's
//! table ([`GsiRouter`]) with the entry's address and data while MSI-X is enabled, so a
//! worker thread signals a completion by writing the eventfd: the vCPU is interrupted by
//! KVM directly, without the VMM on the path. While the function or the entry is masked
//! the device sets the pending bit instead and fires when the guest unmasks, as the PCI
//! specification asks.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VirtioError;
use crate::vstate::vm::GsiRouter;

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Vector-control bit 0: the entry is masked.
const ENTRY_MASKED: u32 = 1;
/// At most 64 vectors, so the pending bits fit one `u64`.
pub const MAX_VECTORS: usize = 64;

/// One table entry as the guest wrote it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address (low and high dwords).
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        // Every entry is masked after reset.
        MsixEntry {
            address: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

/// The MSI-X table and pending bits, as saved (enable and mask are in the PCI config).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct MsixState {
    /// The table.
    pub table: Vec<MsixEntry>,
    /// Pending bits, vector `i` at bit `i`.
    pub pba: u64,
}

/// The live MSI-X state of one device: table, pending bits, and one irqfd per vector.
pub struct Msix {
    table: Vec<MsixEntry>,
    pba: u64,
    irqs: Vec<EventFd>,
    first_gsi: u32,
    router: Arc<GsiRouter>,
    /// Mirrors of the capability's enable and function-mask bits.
    enabled: bool,
    masked: bool,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.table.len())
            .field("first_gsi", &self.first_gsi)
            .field("enabled", &self.enabled)
            .finish()
    }
}

impl Msix {
    /// `n` vectors, each an irqfd on a GSI of its own (no route until the guest enables).
    pub fn new(n: usize, vm: &VmFd, router: Arc<GsiRouter>) -> Result<Self, VirtioError> {
        let irq = |e: String| VirtioError::Irq(e);
        if n == 0 || n > MAX_VECTORS {
            return Err(irq(format!("{n} MSI-X vectors (1 to {MAX_VECTORS})")));
        }
        let first_gsi = router.allocate(n as u32).map_err(|e| irq(e.to_string()))?;
        let mut irqs = Vec::with_capacity(n);
        for i in 0..n {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| irq(e.to_string()))?;
            vm.register_irqfd(&fd, first_gsi + i as u32)
                .map_err(|e| irq(e.to_string()))?;
            irqs.push(fd);
        }
        Ok(Msix {
            table: vec![MsixEntry::default(); n],
            pba: 0,
            irqs,
            first_gsi,
            router,
            enabled: false,
            masked: false,
        })
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when the device has no vectors (never: [`Msix::new`] refuses 0).
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// MSI-X is enabled in the capability.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Read `data.len()` bytes of the table at `offset` (aligned dword or qword reads).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset + i as u64;
            let Some(e) = self.table.get((o / ENTRY_SIZE) as usize) else {
                return;
            };
            let dword = match (o % ENTRY_SIZE) / 4 {
                0 => e.address as u32,
                1 => (e.address >> 32) as u32,
                2 => e.data,
                _ => e.control,
            };
            *b = dword.to_le_bytes()[(o % 4) as usize];
        }
    }

    /// Write the table; a change of an unmasked entry's message updates its route, and
    /// unmasking an entry with its pending bit set fires it.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let index = (offset / ENTRY_SIZE) as usize;
        let Some(e) = self.table.get_mut(index) else {
            return;
        };
        for (i, b) in data.iter().enumerate() {
            let o = (offset % ENTRY_SIZE) + i as u64;
            if o >= ENTRY_SIZE {
                break;
            }
            let shift = 8 * (o % 4);
            let set = |v: u32| (v & !(0xff << shift)) | (u32::from(*b) << shift);
            match o / 4 {
                0 => e.address = (e.address & !0xffff_ffff) | u64::from(set(e.address as u32)),
                1 => {
                    e.address =
                        (e.address & 0xffff_ffff) | (u64::from(set((e.address >> 32) as u32)) << 32)
                }
                2 => e.data = set(e.data),
                _ => e.control = set(e.control),
            }
        }
        self.sync_route(index);
        self.fire_pending();
    }

    /// Read the pending bits.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.pba.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// The guest changed the capability's enable or function-mask bit.
    pub fn set_control(&mut self, enabled: bool, masked: bool) {
        if (enabled, masked) == (self.enabled, self.masked) {
            return;
        }
        self.enabled = enabled;
        self.masked = masked;
        self.sync_all_routes();
        self.fire_pending();
    }

    fn vector_masked(&self, v: usize) -> bool {
        self.masked
            || self
                .table
                .get(v)
                .is_none_or(|e| e.control & ENTRY_MASKED != 0)
    }

    /// Signal vector `v`: fire it, or mark it pending while masked. Returns false for a
    /// vector the device does not have.
    pub fn signal(&mut self, v: usize) -> bool {
        if v >= self.table.len() {
            return false;
        }
        if self.vector_masked(v) {
            self.pba |= 1 << v;
        } else if let Err(e) = self.irqs[v].write(1) {
            tracing::warn!(vector = v, "MSI-X irqfd: {e}");
        }
        true
    }

    fn fire_pending(&mut self) {
        if !self.enabled {
            return;
        }
        for v in 0..self.table.len() {
            if self.pba & (1 << v) != 0 && !self.vector_masked(v) {
                self.pba &= !(1 << v);
                if let Err(e) = self.irqs[v].write(1) {
                    tracing::warn!(vector = v, "MSI-X irqfd: {e}");
                }
            }
        }
    }

    fn route(&self, v: usize) -> (u32, Option<(u64, u32)>) {
        let e = &self.table[v];
        let on = self.enabled && e.control & ENTRY_MASKED == 0;
        (self.first_gsi + v as u32, on.then_some((e.address, e.data)))
    }

    fn sync_route(&self, v: usize) {
        if let Err(e) = self.router.set_msi(&[self.route(v)]) {
            tracing::warn!(vector = v, "MSI-X route: {e}");
        }
    }

    /// Program the routes of every vector (after enable, mask, or a restore).
    pub fn sync_all_routes(&self) {
        let routes: Vec<_> = (0..self.table.len()).map(|v| self.route(v)).collect();
        if let Err(e) = self.router.set_msi(&routes) {
            tracing::warn!("MSI-X routes: {e}");
        }
    }

    /// The table and pending bits.
    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pba: self.pba,
        }
    }

    /// Load a saved table (the control bits come from the restored config space) and
    /// program the routes.
    pub fn restore(
        &mut self,
        s: &MsixState,
        enabled: bool,
        masked: bool,
    ) -> Result<(), VirtioError> {
        if s.table.len() != self.table.len() {
            return Err(VirtioError::BadState(format!(
                "{} MSI-X vectors saved, the device has {}",
                s.table.len(),
                self.table.len()
            )));
        }
        self.table = s.table.clone();
        self.pba = s.pba & (u64::MAX >> (64 - self.table.len()));
        self.enabled = enabled;
        self.masked = masked;
        self.sync_all_routes();
        Ok(())
    }
}

//! The narrow interface through which migration and snapshots use a VM's memory: its
//! layout, bulk copies through vm-memory's volatile accessors (the guest and the net RX
//! thread write the same memory concurrently, so no `&[u8]` over live guest RAM is ever
//! made), dirty logging, and loading memory into a VM that does not run yet.

use std::os::fd::RawFd;

use super::{MachineError, PauseGuard, PreparedVm, Vm};
use crate::snapshot::{SnapshotError, SnapshotStats};
use crate::state::VmState;
use crate::vstate::memory::GuestRam;
pub use crate::vstate::vm::DirtyTracking;

/// One RAM region: guest-physical start and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

fn ranges_of(ram: &GuestRam) -> Vec<RamRange> {
    ram.regions()
        .iter()
        .map(|r| RamRange {
            gpa: r.gpa,
            size: r.size,
        })
        .collect()
}

impl Vm {
    /// The RAM regions, in order (the memory layout a migration announces).
    pub fn memory_regions(&self) -> Vec<RamRange> {
        ranges_of(&self.ram)
    }

    /// Total guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.ram.size()
    }

    /// The ranges of region `index` that were ever written, as guest-physical
    /// `[start, end)`; never-written ranges of the memfd are holes and read as zeroes.
    pub fn memory_data_ranges(&self, index: usize) -> Vec<(u64, u64)> {
        self.ram.regions().get(index).map_or_else(Vec::new, |r| {
            r.data_ranges()
                .into_iter()
                .map(|(a, b)| (r.gpa + a, r.gpa + b))
                .collect()
        })
    }

    /// The memfds of the regions, in order, for a local handover (`SCM_RIGHTS`).
    pub fn memory_fds(&self) -> Vec<RawFd> {
        self.ram.raw_fds()
    }

    /// Copy guest memory at `gpa` into `buf`: a stable copy of whatever the guest had
    /// there (it may be writing); the dirty log says when to copy a page again.
    pub fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        Ok(self.ram.read_into(gpa, buf)?)
    }

    /// Turn dirty logging on for every RAM slot and start from a clean slate (what was
    /// written before now is the caller's first full pass). Says which mechanism KVM uses.
    ///
    /// The VMM's own writes are recorded from here on too: the switch goes on, then every
    /// device thread passes its transport's lock, so a device write either finished
    /// before (the caller's full pass reads it) or marks its page (`vstate/vmm_dirty.rs`).
    pub fn start_dirty_log(&self) -> Result<DirtyTracking, MachineError> {
        self.ram.track_vmm_writes(true);
        self.virtio.sync_with_workers();
        if let Err(e) = self.kvm.set_dirty_logging(true) {
            self.ram.track_vmm_writes(false);
            return Err(e.into());
        }
        for i in 0..self.ram.regions().len() {
            self.ram.take_vmm_dirty(i);
        }
        Ok(self.kvm.dirty_tracking())
    }

    /// Turn dirty logging off again (the VMM's own writes are no longer recorded).
    pub fn stop_dirty_log(&self) -> Result<(), MachineError> {
        self.ram.track_vmm_writes(false);
        Ok(self.kvm.set_dirty_logging(false)?)
    }

    /// Pages written since the previous harvest, one bitmap per region (one bit per
    /// 4 KiB page in 64-bit words, as KVM's dirty log): the guest's writes (from KVM's
    /// dirty ring or bitmap) and the VMM's own (device emulation), merged. Copy the pages
    /// only after this returns: a write after the harvest is in the next one.
    pub fn harvest_dirty(&self) -> Result<Vec<Vec<u64>>, MachineError> {
        let mut kvm = self.kvm.harvest_dirty()?;
        for (i, words) in kvm.iter_mut().enumerate() {
            let vmm = self.ram.take_vmm_dirty(i);
            for (w, v) in words.iter_mut().zip(vmm) {
                *w |= v;
            }
        }
        Ok(kvm)
    }

    /// Keep the dirty rings from filling during a long copy (their entries are kept for
    /// the next [`Vm::harvest_dirty`]); nothing to do with the bitmap.
    pub fn drain_dirty_rings(&self) -> Result<(), MachineError> {
        Ok(self.kvm.drain_dirty_rings()?)
    }

    /// Write a snapshot of this paused VM (`state` from [`Vm::save_state`]) to `w`.
    pub fn write_snapshot(
        &self,
        w: &mut impl std::io::Write,
        state: &VmState,
        _paused: &PauseGuard<'_>,
    ) -> Result<SnapshotStats, SnapshotError> {
        crate::snapshot::write(w, state, &self.ram)
    }
}

impl PreparedVm {
    /// The RAM regions, in order.
    pub fn memory_regions(&self) -> Vec<RamRange> {
        ranges_of(&self.ram)
    }

    /// Store verified bytes at `gpa` (an incoming copy migration, before the VM runs).
    /// Refused on memory adopted from another process (a local handover's memfds).
    pub fn load_memory(&self, gpa: u64, data: &[u8]) -> Result<(), MachineError> {
        Ok(self.ram.load(gpa, data)?)
    }

    /// Make `[gpa, gpa+len)` zero, under the same rule as [`PreparedVm::load_memory`].
    pub fn load_zero(&self, gpa: u64, len: u64) -> Result<(), MachineError> {
        Ok(self.ram.load_zero(gpa, len)?)
    }
}

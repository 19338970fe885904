//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`): one ring of dirty-page entries per vCPU,
//! mapped from the vCPU fd, that KVM fills as the guest first writes each write-protected
//! page. Harvesting costs time in proportion to the pages written, where the bitmap
//! (`KVM_GET_DIRTY_LOG`) costs time in proportion to the memory size.
//!
//! Protocol (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING"): an entry whose
//! flags have `DIRTY` set is published by KVM; the harvester reads slot and offset, then
//! sets `RESET`; `KVM_RESET_DIRTY_RINGS` makes KVM re-protect the reset pages and reuse
//! their entries. A vCPU whose ring is full exits with `KVM_EXIT_DIRTY_RING_FULL` and
//! must not run again until the ring was harvested; its thread waits a little and retries.
//! Harvest, then reset, then copy the pages: a write between harvest and reset needs no
//! new entry, because the copy comes after it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::kvm_dirty_gfn;
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

const DIRTY: u32 = 1;
const RESET: u32 = 2;

/// Entries per vCPU ring: 16384 × 16 bytes = 256 KiB per vCPU, 64 MiB of guest writes
/// between two harvests before a vCPU waits.
pub const RING_ENTRIES: u32 = 16384;

/// One vCPU's ring, mapped from its fd.
struct Ring {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    /// Next entry to look at (free-running, taken modulo `entries`).
    fetch: u32,
}

// SAFETY: the mapping is process-wide and lives until `Drop`; entries are accessed only
// through atomic loads/stores of `flags` and plain reads of entries KVM published
// (acquire on `flags`), under the `DirtyRings` mutex.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `base` came from a successful mmap of exactly this length.
        unsafe {
            libc::munmap(
                self.base.cast(),
                self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            );
        }
    }
}

/// The rings of a VM's vCPUs and the pages harvested from them but not yet taken.
pub struct DirtyRings {
    rings: Mutex<Vec<Ring>>,
    /// Per slot: one bit per page, filled by [`DirtyRings::drain`].
    pending: Mutex<Vec<Vec<u64>>>,
}

impl DirtyRings {
    /// Enable the ring on `vm` (before any vCPU exists). `None` when the host lacks it
    /// or refuses the size: the caller falls back to the bitmap.
    pub fn enable(vm: &VmFd, max_bytes: i32) -> Option<Self> {
        let bytes = RING_ENTRIES as usize * std::mem::size_of::<kvm_dirty_gfn>();
        if max_bytes <= 0 || (max_bytes as usize) < bytes {
            return None;
        }
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
            args: [bytes as u64, 0, 0, 0],
            ..Default::default()
        };
        if let Err(e) = vm.enable_cap(&cap) {
            tracing::info!("dirty ring refused ({e}); using the dirty bitmap");
            return None;
        }
        Some(Self {
            rings: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
        })
    }

    /// Map the ring of a new vCPU.
    pub fn attach(&self, vcpu: &VcpuFd) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let len = RING_ENTRIES as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let page = 4096i64;
        // SAFETY: mmap of the vCPU fd at the offset KVM documents for the ring; we check
        // the result and own the mapping from here on.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as i64 * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        self.rings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Ring {
                base: p.cast(),
                entries: RING_ENTRIES,
                fetch: 0,
            });
        Ok(())
    }

    /// Move every published entry into the pending bitmaps (`slot_pages[slot]` pages per
    /// slot) and let KVM reuse them. Cheap when nothing was written: one load per vCPU.
    pub fn drain(&self, vm: &VmFd, slot_pages: &[u64]) -> std::io::Result<()> {
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() != slot_pages.len() {
            *pending = slot_pages
                .iter()
                .map(|&p| vec![0u64; p.div_ceil(64) as usize])
                .collect();
        }
        let mut harvested = 0u64;
        for ring in rings.iter_mut() {
            loop {
                // SAFETY: the index is taken modulo the ring size, inside the mapping.
                let e = unsafe { ring.base.add((ring.fetch % ring.entries) as usize) };
                // SAFETY: `flags` is a u32 inside the live mapping, shared with KVM, which
                // publishes an entry by setting DIRTY with release semantics.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
                if flags.load(Ordering::Acquire) & DIRTY == 0 {
                    break;
                }
                // SAFETY: a published entry is not written by KVM until we reset it.
                let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
                // The slot id is in the low 16 bits, the address space above (we use 0).
                let slot = (slot & 0xffff) as usize;
                match pending.get_mut(slot) {
                    Some(bm) if offset < slot_pages[slot] => {
                        bm[(offset / 64) as usize] |= 1 << (offset % 64);
                    }
                    _ => tracing::warn!(slot, offset, "dirty ring entry outside guest RAM"),
                }
                flags.store(RESET, Ordering::Release);
                ring.fetch = ring.fetch.wrapping_add(1);
                harvested += 1;
            }
        }
        if harvested > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; `vm` is a valid VM fd.
            let rc = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Drain, then take the pending bitmaps (one per slot), leaving them clear.
    pub fn harvest(&self, vm: &VmFd, slot_pages: &[u64]) -> std::io::Result<Vec<Vec<u64>>> {
        self.drain(vm, slot_pages)?;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        Ok(pending
            .iter_mut()
            .map(|bm| std::mem::replace(bm, vec![0u64; bm.len()]))
            .collect())
    }
}

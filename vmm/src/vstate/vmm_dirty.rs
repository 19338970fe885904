//! The VMM-side dirty bitmap: vm-memory's `AtomicBitmap` behind a switch shared by every
//! region of one VM, so that the VMM's own writes into guest memory (used rings, received
//! frames, disk reads) are recorded only while a migration tracks them.
//!
//! Why: the bitmap's `mark_dirty` is a locked `or` per page on every device write, and
//! it showed as 7.8 % of the virtio-net worker's time on this host while nothing ever
//! read those bits outside a migration.
//!
//! The switch-on rule that keeps a pre-copy complete: [`crate::Vm::start_dirty_log`]
//! turns the switch on, then takes every virtio transport's lock once, then the caller
//! makes its first full pass. Every device write happens under its transport's lock, so
//! a write either finished before that lock was taken (the full pass, which starts after,
//! reads it) or starts after it was released (and then sees the switch on and marks the
//! page). A switch that is off only ever skips bits nobody will read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// One region's bitmap and the VM's switch.
#[derive(Debug)]
pub struct SwitchedBitmap {
    bits: AtomicBitmap,
    on: Arc<AtomicBool>,
}

impl SwitchedBitmap {
    /// A bitmap for `len` bytes of guest memory that marks while `on` is set.
    pub fn new(len: usize, on: Arc<AtomicBool>) -> Self {
        Self {
            bits: AtomicBitmap::with_len(len),
            on,
        }
    }

    /// The marked pages, one bit per 4 KiB page in 64-bit words, cleared.
    pub fn take(&self) -> Vec<u64> {
        self.bits.get_and_reset()
    }
}

impl Default for SwitchedBitmap {
    /// Marks always (a bitmap made outside [`crate::vstate::memory::GuestRam`]).
    fn default() -> Self {
        Self {
            bits: AtomicBitmap::default(),
            on: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl<'a> WithBitmapSlice<'a> for SwitchedBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for SwitchedBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        // Relaxed is enough: the switch-on is published to device threads by their
        // transport's lock (module comment).
        if self.on.load(Ordering::Relaxed) {
            self.bits.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bits.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for SwitchedBitmap {
    fn with_len(len: usize) -> Self {
        Self::new(len, Arc::new(AtomicBool::new(true)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_only_while_switched_on() {
        let on = Arc::new(AtomicBool::new(false));
        let b = SwitchedBitmap::new(16 * 4096, on.clone());
        b.mark_dirty(4096, 1);
        assert!(!b.dirty_at(4096));
        assert!(b.take().iter().all(|w| *w == 0));
        on.store(true, Ordering::SeqCst);
        b.mark_dirty(4096, 1);
        b.slice_at(8192).mark_dirty(4096, 4097);
        assert!(b.dirty_at(4096));
        assert_eq!(b.take(), vec![0b1_1010]);
        assert!(b.take().iter().all(|w| *w == 0));
    }
}

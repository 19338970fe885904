//! Dirty page bitmaps: one bit per 4 KiB page of one memory region, in
//! `u64` words laid out as KVM's `KVM_GET_DIRTY_LOG` returns them (bit `i`
//! of word `w` is page `64 * w + i`).
//!
//! The sender keeps one [`DirtyBitmap`] per region, merges (ORs) into it the
//! bitmap KVM returns for guest writes and the VMM's own bitmap for writes it
//! made on the guest's behalf, then walks the dirty [runs](DirtyBitmap::runs)
//! to build memory frames, and clears it.

use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

pub use crate::protocol::PAGE_SIZE;

/// Errors of dirty bitmap operations.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DirtyError {
    #[error("bitmap of {got} words merged into a bitmap of {expected} words ({pages} pages)")]
    LengthMismatch {
        expected: usize,
        got: usize,
        pages: u64,
    },
    #[error("region at {gpa:#x} of {size:#x} bytes is empty or not page-aligned")]
    BadRegion { gpa: u64, size: u64 },
    #[error("page {page} is outside a bitmap of {pages} pages")]
    OutOfRange { page: u64, pages: u64 },
}

/// A contiguous run of dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRun {
    /// Index of the first page in the region.
    pub first_page: u64,
    /// Number of pages, at least 1.
    pub pages: u64,
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Length in bytes (`pages * PAGE_SIZE`).
    pub len: u64,
}

/// Dirty bitmap of one memory region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    base_gpa: u64,
    pages: u64,
    words: Vec<u64>,
}

/// Number of `u64` words for `pages` pages.
pub fn words_for_pages(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

impl DirtyBitmap {
    /// An all-clean bitmap for `pages` pages starting at `base_gpa`.
    pub fn with_pages(base_gpa: u64, pages: u64) -> Self {
        DirtyBitmap {
            base_gpa,
            pages,
            words: vec![0; words_for_pages(pages)],
        }
    }

    /// An all-clean bitmap for the region `[gpa, gpa + size)`, which must be
    /// non-empty and page-aligned.
    pub fn for_region(gpa: u64, size: u64) -> Result<Self, DirtyError> {
        if size == 0 || (gpa | size) & (PAGE_SIZE - 1) != 0 || gpa.checked_add(size).is_none() {
            return Err(DirtyError::BadRegion { gpa, size });
        }
        Ok(Self::with_pages(gpa, size / PAGE_SIZE))
    }

    pub fn base_gpa(&self) -> u64 {
        self.base_gpa
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Mask of the valid bits of the last word.
    fn tail_mask(&self) -> u64 {
        match self.pages % 64 {
            0 => u64::MAX,
            r => (1u64 << r) - 1,
        }
    }

    fn mask_tail(&mut self) {
        let m = self.tail_mask();
        if let Some(last) = self.words.last_mut() {
            *last &= m;
        }
    }

    pub fn is_dirty(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub fn set(&mut self, page: u64) -> Result<(), DirtyError> {
        self.set_range(page, 1)
    }

    /// Marks `count` pages from `first` dirty.
    pub fn set_range(&mut self, first: u64, count: u64) -> Result<(), DirtyError> {
        let end = first
            .checked_add(count)
            .filter(|&e| e <= self.pages)
            .ok_or(DirtyError::OutOfRange {
                page: first.saturating_add(count.saturating_sub(1)),
                pages: self.pages,
            })?;
        let mut p = first;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[(p / 64) as usize] |= mask;
            p += n;
        }
        Ok(())
    }

    /// Marks the pages touched by the guest-physical byte range dirty
    /// (e.g. a device write); bytes outside the region are an error.
    pub fn mark_gpa_range(&mut self, gpa: u64, len: u64) -> Result<(), DirtyError> {
        if len == 0 {
            return Ok(());
        }
        let out = DirtyError::OutOfRange {
            page: gpa.wrapping_sub(self.base_gpa) / PAGE_SIZE,
            pages: self.pages,
        };
        let off = gpa.checked_sub(self.base_gpa).ok_or(out.clone())?;
        let last = off.checked_add(len - 1).ok_or(out)?;
        let first = off / PAGE_SIZE;
        self.set_range(first, last / PAGE_SIZE - first + 1)
    }

    /// Marks every page dirty (iteration 0 sends everything).
    pub fn set_all(&mut self) {
        self.words.fill(u64::MAX);
        self.mask_tail();
    }

    /// ORs in a bitmap of the same size: KVM's dirty log or the VMM's bitmap
    /// as words. Bits beyond the last page are ignored.
    pub fn merge_words(&mut self, other: &[u64]) -> Result<(), DirtyError> {
        if other.len() != self.words.len() {
            return Err(DirtyError::LengthMismatch {
                expected: self.words.len(),
                got: other.len(),
                pages: self.pages,
            });
        }
        for (a, b) in self.words.iter_mut().zip(other) {
            *a |= *b;
        }
        self.mask_tail();
        Ok(())
    }

    /// ORs in KVM's bitmap as returned by `KVM_GET_DIRTY_LOG`.
    pub fn merge_kvm(&mut self, kvm: &[u64]) -> Result<(), DirtyError> {
        self.merge_words(kvm)
    }

    /// ORs in another bitmap of the same region.
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<(), DirtyError> {
        if other.pages != self.pages {
            return Err(DirtyError::LengthMismatch {
                expected: self.words.len(),
                got: other.words.len(),
                pages: self.pages,
            });
        }
        self.merge_words(&other.words)
    }

    /// ORs in an atomic bitmap (the VMM's own, written concurrently by
    /// device threads) and clears it word by word, so that no write that
    /// races with the merge is lost: it lands either in this pass or in the
    /// next one.
    pub fn merge_and_clear_atomic(&mut self, other: &[AtomicU64]) -> Result<(), DirtyError> {
        if other.len() != self.words.len() {
            return Err(DirtyError::LengthMismatch {
                expected: self.words.len(),
                got: other.len(),
                pages: self.pages,
            });
        }
        for (a, b) in self.words.iter_mut().zip(other) {
            *a |= b.swap(0, Ordering::AcqRel);
        }
        self.mask_tail();
        Ok(())
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Dirty bytes (`count() * PAGE_SIZE`).
    pub fn dirty_bytes(&self) -> u64 {
        self.count() * PAGE_SIZE
    }

    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Maximal runs of contiguous dirty pages, in ascending order, each at
    /// most `max_run_pages` long (0 is taken as 1) so that a run fits a frame.
    pub fn runs(&self, max_run_pages: u64) -> DirtyRuns<'_> {
        DirtyRuns {
            bitmap: self,
            next: 0,
            max: max_run_pages.max(1),
        }
    }

    /// Index of the first dirty page at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut w = self.words[wi] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                let p = wi as u64 * 64 + u64::from(w.trailing_zeros());
                return (p < self.pages).then_some(p);
            }
            wi += 1;
            w = *self.words.get(wi)?;
        }
    }

    /// Index of the first clean page at or after `from` (or `pages`).
    fn next_clear(&self, from: u64) -> u64 {
        if from >= self.pages {
            return self.pages;
        }
        let mut wi = (from / 64) as usize;
        let mut w = !self.words[wi] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                return (wi as u64 * 64 + u64::from(w.trailing_zeros())).min(self.pages);
            }
            wi += 1;
            match self.words.get(wi) {
                Some(x) => w = !x,
                None => return self.pages,
            }
        }
    }
}

/// Iterator over the dirty runs of a bitmap, see [`DirtyBitmap::runs`].
pub struct DirtyRuns<'a> {
    bitmap: &'a DirtyBitmap,
    next: u64,
    max: u64,
}

impl Iterator for DirtyRuns<'_> {
    type Item = DirtyRun;

    fn next(&mut self) -> Option<DirtyRun> {
        let first = self.bitmap.next_set(self.next)?;
        let limit = first.saturating_add(self.max).min(self.bitmap.pages);
        let end = self.bitmap.next_clear(first).min(limit);
        self.next = end;
        let pages = end - first;
        Some(DirtyRun {
            first_page: first,
            pages,
            gpa: self.bitmap.base_gpa + first * PAGE_SIZE,
            len: pages * PAGE_SIZE,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn pages_of(b: &DirtyBitmap) -> BTreeSet<u64> {
        b.runs(u64::MAX)
            .flat_map(|r| r.first_page..r.first_page + r.pages)
            .collect()
    }

    fn words_from(pages: u64, set: &BTreeSet<u64>) -> Vec<u64> {
        let mut w = vec![0u64; words_for_pages(pages)];
        for &p in set {
            w[(p / 64) as usize] |= 1 << (p % 64);
        }
        w
    }

    #[test]
    fn basics() {
        let mut b = DirtyBitmap::for_region(0x10_0000, 130 * PAGE_SIZE).unwrap();
        assert_eq!(b.words().len(), 3);
        assert!(b.is_clean());
        b.set_range(60, 10).unwrap();
        b.set(129).unwrap();
        assert!(b.set(130).is_err());
        assert!(b.set_range(129, 2).is_err());
        assert!(b.set_range(u64::MAX, 2).is_err());
        assert_eq!(b.count(), 11);
        let runs: Vec<_> = b.runs(4).map(|r| (r.first_page, r.pages)).collect();
        assert_eq!(runs, vec![(60, 4), (64, 4), (68, 2), (129, 1)]);
        let r = b.runs(100).next().unwrap();
        assert_eq!((r.gpa, r.len), (0x10_0000 + 60 * PAGE_SIZE, 10 * PAGE_SIZE));
        b.set_all();
        assert_eq!(b.count(), 130);
        assert_eq!(b.runs(0).count(), 130);
        assert_eq!(b.runs(1000).collect::<Vec<_>>().len(), 1);
        b.clear();
        assert!(b.is_clean() && b.runs(1).next().is_none());
        assert!(DirtyBitmap::for_region(0, 100).is_err());
        assert!(DirtyBitmap::for_region(0, 0).is_err());
    }

    #[test]
    fn merges() {
        let mut b = DirtyBitmap::with_pages(0, 70);
        assert!(b.merge_kvm(&[1]).is_err());
        // Bits beyond page 70 are dropped.
        b.merge_kvm(&[1, u64::MAX]).unwrap();
        assert_eq!(b.count(), 7);
        let vmm = [AtomicU64::new(1 << 5), AtomicU64::new(0)];
        b.merge_and_clear_atomic(&vmm).unwrap();
        assert_eq!(b.count(), 8);
        assert_eq!(vmm[0].load(Ordering::Relaxed), 0);
        let mut other = DirtyBitmap::with_pages(0, 70);
        other.set(10).unwrap();
        b.merge(&other).unwrap();
        assert!(b.is_dirty(10) && !b.is_dirty(11) && !b.is_dirty(1000));
        assert!(b.merge(&DirtyBitmap::with_pages(0, 200)).is_err());
        b.mark_gpa_range(4095, 2).unwrap();
        assert!(b.is_dirty(1));
        assert!(b.mark_gpa_range(69 * PAGE_SIZE, PAGE_SIZE + 1).is_err());
        let mut hi = DirtyBitmap::with_pages(0x1000, 2);
        assert!(hi.mark_gpa_range(0, 1).is_err());
        hi.mark_gpa_range(0x1000, 0).unwrap();
        assert!(hi.is_clean());
    }

    proptest! {
        #[test]
        fn model(
            pages in 1u64..400,
            kvm in proptest::collection::btree_set(0u64..400, 0..120),
            vmm in proptest::collection::btree_set(0u64..400, 0..120),
            ranges in proptest::collection::vec((0u64..400, 0u64..80), 0..4),
            max_run in 0u64..70,
        ) {
            let kvm: BTreeSet<u64> = kvm.into_iter().filter(|&p| p < pages).collect();
            let vmm: BTreeSet<u64> = vmm.into_iter().filter(|&p| p < pages).collect();
            let mut model: BTreeSet<u64> = kvm.union(&vmm).copied().collect();
            let mut b = DirtyBitmap::with_pages(0x4000_0000, pages);
            b.merge_kvm(&words_from(pages, &kvm)).unwrap();
            let atomic: Vec<AtomicU64> = words_from(pages, &vmm).into_iter().map(AtomicU64::new).collect();
            b.merge_and_clear_atomic(&atomic).unwrap();
            for (first, count) in ranges {
                if first + count <= pages {
                    b.set_range(first, count).unwrap();
                    model.extend(first..first + count);
                } else {
                    prop_assert!(b.set_range(first, count).is_err());
                }
            }
            prop_assert_eq!(b.count(), model.len() as u64);
            prop_assert_eq!(pages_of(&b), model.clone());
            for p in 0..pages + 2 {
                prop_assert_eq!(b.is_dirty(p), model.contains(&p));
            }
            // Runs: ascending, bounded, cover exactly the model, maximal.
            let cap = max_run.max(1);
            let runs: Vec<DirtyRun> = b.runs(max_run).collect();
            let mut covered = BTreeSet::new();
            for (i, r) in runs.iter().enumerate() {
                prop_assert!(r.pages >= 1 && r.pages <= cap);
                prop_assert_eq!(r.gpa, 0x4000_0000 + r.first_page * PAGE_SIZE);
                prop_assert_eq!(r.len, r.pages * PAGE_SIZE);
                if i > 0 {
                    let prev = runs[i - 1];
                    let prev_end = prev.first_page + prev.pages;
                    prop_assert!(r.first_page >= prev_end);
                    if r.first_page == prev_end {
                        prop_assert_eq!(prev.pages, cap, "split run that was not at its cap");
                    }
                }
                covered.extend(r.first_page..r.first_page + r.pages);
            }
            prop_assert_eq!(&covered, &model);
            for r in &runs {
                prop_assert!(!model.contains(&(r.first_page + r.pages)) || r.pages == cap);
            }
            b.clear();
            prop_assert_eq!(b.count(), 0);
        }
    }
}

//! Page-level helpers shared by the two writers of guest memory to a byte stream, the
//! snapshot file (`snapshot.rs`) and the migration sender: zero-page runs and the CRC32
//! over a payload given in parts.

use crate::vstate::memory::PAGE_SIZE;

/// True when every byte of `page` is zero.
pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, mid, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// A run of pages of one kind inside a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Byte offset of the run in the buffer.
    pub offset: usize,
    /// Length in bytes (whole pages, except a short last page of the buffer).
    pub len: usize,
    /// The run is all zeroes.
    pub zero: bool,
}

/// The maximal runs of zero and non-zero 4 KiB pages of `buf`, in order, at most
/// `max_runs` of them (the caller continues after the last run's end).
pub fn page_runs(buf: &[u8], max_runs: usize) -> Vec<PageRun> {
    let page = PAGE_SIZE as usize;
    let zero_at = |off: usize| is_zero(&buf[off..(off + page).min(buf.len())]);
    let mut runs = Vec::new();
    let mut off = 0;
    while off < buf.len() && runs.len() < max_runs {
        let zero = zero_at(off);
        let start = off;
        off = (off + page).min(buf.len());
        while off < buf.len() && zero_at(off) == zero {
            off = (off + page).min(buf.len());
        }
        runs.push(PageRun {
            offset: start,
            len: off - start,
            zero,
        });
    }
    runs
}

/// CRC32 (IEEE) of the concatenation of `parts`, the checksum both stream formats put
/// in front of a payload.
pub fn crc32_of(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_zero_and_data_pages_and_a_short_tail() {
        let p = PAGE_SIZE as usize;
        let mut buf = vec![0u8; 4 * p + 10];
        buf[p + 5] = 1; // page 1 data
        buf[2 * p] = 7; // page 2 data
        buf[4 * p + 9] = 3; // short tail page data
        let runs = page_runs(&buf, usize::MAX);
        let kinds: Vec<_> = runs.iter().map(|r| (r.offset, r.len, r.zero)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, p, true),
                (p, 2 * p, false),
                (3 * p, p, true),
                (4 * p, 10, false)
            ]
        );
        assert_eq!(page_runs(&buf, 2).len(), 2);
        assert!(page_runs(&[], 5).is_empty());
    }

    #[test]
    fn crc_of_parts_is_crc_of_the_whole() {
        assert_eq!(crc32_of(&[b"ab", b"", b"cd"]), crc32fast::hash(b"abcd"));
    }
}

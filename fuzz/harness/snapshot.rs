//! The snapshot loader (`vmm::snapshot::read`) as one function over bytes.
//!
//! Shared by `fuzz/fuzz_targets/snapshot.rs` (cargo-fuzz) and
//! `tests/tests/fuzz_snapshot.rs` (seeded mutations in `cargo test`).
//!
//! Input: one flags byte, then the file. Flag bit 0: recompute every record's
//! CRC32 before loading (so that mutations reach the state decoder and the
//! memory bounds checks instead of stopping at the checksum).

/// Header length (magic, version, flags).
pub const HEADER: usize = 16;
/// Record header length (kind u32, length u64, CRC32 u32).
pub const RECORD: usize = 16;

/// Rewrite the CRC of every record (complete or cut short).
pub fn fix_crcs(buf: &mut [u8]) {
    let mut off = HEADER;
    while off + RECORD <= buf.len() {
        let mut len = [0u8; 8];
        len.copy_from_slice(&buf[off + 4..off + 12]);
        let len = u64::from_le_bytes(len);
        let start = off + RECORD;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .unwrap_or(usize::MAX);
        let crc = crc32fast::hash(&buf[start..end.min(buf.len())]);
        buf[off + 12..off + 16].copy_from_slice(&crc.to_le_bytes());
        if end >= buf.len() {
            break;
        }
        off = end;
    }
}

/// Load `data` (flags byte and file). `Ok(memory bytes)` for a snapshot that
/// loads, else the error's message, which must never be empty.
pub fn run(data: &[u8]) -> Result<u64, String> {
    let Some((&flags, rest)) = data.split_first() else {
        return Ok(0);
    };
    let mut buf = rest.to_vec();
    if flags & 1 != 0 {
        fix_crcs(&mut buf);
    }
    match vmm::snapshot::read(&mut &buf[..]) {
        Ok((state, ram)) => {
            assert_eq!(state.config.memory_bytes, ram.size());
            Ok(ram.size())
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            Err(msg)
        }
    }
}

//! Tiny PVH test guests, written in GNU assembly and freestanding C and built by this
//! crate's `build.rs` with the system `gcc`/`ld`/`objcopy`.
//!
//! Every guest is an ELF64 file holding 32-bit code loaded at 1 MiB, with a PVH entry note
//! (Xen ELF note type 18). See `tests/guests/README.md` for each guest's command-line keys,
//! its exact output lines and its exit codes.

use std::path::Path;

/// Path of the `hello` guest ELF.
pub const HELLO_PATH: &str = concat!(env!("OUT_DIR"), "/hello.elf");
/// Path of the `pattern` (live-migration) guest ELF.
pub const PATTERN_PATH: &str = concat!(env!("OUT_DIR"), "/pattern.elf");
/// Path of the `smp` guest ELF.
pub const SMP_PATH: &str = concat!(env!("OUT_DIR"), "/smp.elf");
/// Path of the `timer` guest ELF.
pub const TIMER_PATH: &str = concat!(env!("OUT_DIR"), "/timer.elf");

/// Path of the `blkjournal` (virtio-blk journal) guest ELF.
pub const BLKJOURNAL_PATH: &str = concat!(env!("OUT_DIR"), "/blkjournal.elf");

/// Path of the `netecho` (virtio-net ARP/ICMP/UDP echo) guest ELF.
pub const NETECHO_PATH: &str = concat!(env!("OUT_DIR"), "/netecho.elf");
/// The `netecho` guest ELF.
pub static NETECHO_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/netecho.elf"));

/// Path of the `netecho` guest ELF.
pub fn netecho_path() -> &'static Path {
    Path::new(NETECHO_PATH)
}

/// Debug-exit value of `netecho` when no usable virtio-net device is found.
pub const NETECHO_EXIT_NO_DEVICE: u8 = 2;
/// Default UDP echo port of `netecho` (key `port=`).
pub const NETECHO_DEFAULT_PORT: u16 = 7;
/// Default IPv4 address of `netecho` (key `ip=`).
pub const NETECHO_DEFAULT_IP: [u8; 4] = [10, 0, 0, 2];
/// Bytes `netecho` puts before the echoed payload of a UDP answer: its running answer
/// counter (u32, big endian, 1 for the first answer since boot) and a boot nonce (u32,
/// big endian, from the TSC at boot).
pub const NETECHO_ANSWER_PREFIX: usize = 8;

/// A `netecho` UDP answer: (counter, boot nonce, echoed payload), or `None` if shorter
/// than the prefix.
pub fn netecho_answer(b: &[u8]) -> Option<(u32, u32, &[u8])> {
    if b.len() < NETECHO_ANSWER_PREFIX {
        return None;
    }
    let w = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Some((w(0), w(4), &b[NETECHO_ANSWER_PREFIX..]))
}

/// The `hello` guest ELF.
pub static HELLO_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.elf"));
/// The `pattern` guest ELF.
pub static PATTERN_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pattern.elf"));
/// The `smp` guest ELF.
pub static SMP_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/smp.elf"));
/// The `timer` guest ELF.
pub static TIMER_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/timer.elf"));

/// The `blkjournal` guest ELF.
pub static BLKJOURNAL_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blkjournal.elf"));

/// Path of the `blkjournal` guest ELF.
pub fn blkjournal_path() -> &'static Path {
    Path::new(BLKJOURNAL_PATH)
}

/// Debug-exit value of `blkjournal` when no usable virtio-blk device is found.
pub const BLKJOURNAL_EXIT_NO_DEVICE: u8 = 2;
/// Debug-exit value of `blkjournal` when the journal on the disk does not verify.
pub const BLKJOURNAL_EXIT_CORRUPT: u8 = 3;
/// Debug-exit value of `blkjournal` when the device completes a request with an error.
pub const BLKJOURNAL_EXIT_IO: u8 = 5;
/// Bytes per `blkjournal` record (one sector).
pub const BLKJOURNAL_RECORD_SIZE: usize = 512;
/// Magic of a `blkjournal` record: the bytes `BJRN` at the start of the sector.
pub const BLKJOURNAL_MAGIC: u32 = 0x4e52_4a42;

/// Checks the `blkjournal` records in a disk image, as the guest does on boot: returns
/// the number of records (the last sequence number), or `Err(sector)` at the first sector
/// that is neither the next record nor blank, or a record after a blank sector.
pub fn blkjournal_verify(disk: &[u8]) -> Result<u32, u64> {
    let fnv = |b: &[u8]| {
        b.iter().fold(2_166_136_261u32, |h, x| {
            (h ^ u32::from(*x)).wrapping_mul(16_777_619)
        })
    };
    let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut records = 0u32;
    let mut ended = false;
    for (k, s) in disk.chunks(BLKJOURNAL_RECORD_SIZE).enumerate() {
        let ok = if !ended && s.len() == BLKJOURNAL_RECORD_SIZE && word(s, 0) == BLKJOURNAL_MAGIC {
            records += 1;
            word(s, 4) as u64 == k as u64 + 1 && word(s, 508) == fnv(&s[..508])
        } else {
            ended = true;
            s.iter().all(|b| *b == 0)
        };
        if !ok {
            return Err(k as u64);
        }
    }
    Ok(records)
}

/// Path of the `hello` guest ELF.
pub fn hello_path() -> &'static Path {
    Path::new(HELLO_PATH)
}

/// Path of the `pattern` guest ELF.
pub fn pattern_path() -> &'static Path {
    Path::new(PATTERN_PATH)
}

/// Path of the `smp` guest ELF.
pub fn smp_path() -> &'static Path {
    Path::new(SMP_PATH)
}

/// Path of the `timer` guest ELF.
pub fn timer_path() -> &'static Path {
    Path::new(TIMER_PATH)
}

/// Guest-physical address of the `pattern` guest's status block:
/// `struct { u32 magic; u32 pass; u32 start_mib; u32 mib; }`, little endian.
pub const PATTERN_STATUS_ADDR: u64 = 0x3000;
/// Value of the status block's `magic` field: the number `0x5041_5454` ("PATT" read as a
/// big-endian word), stored little endian, i.e. the bytes `54 54 41 50` at the address.
pub const PATTERN_STATUS_MAGIC: u32 = 0x5041_5454;
/// Size in bytes of the `pattern` status block.
pub const PATTERN_STATUS_SIZE: usize = 16;
/// Default region start of the `pattern` guest (MiB).
pub const PATTERN_DEFAULT_START_MIB: u32 = 4;
/// Default region size of the `pattern` guest (MiB).
pub const PATTERN_DEFAULT_MIB: u32 = 32;
/// Default `every` of the `pattern` guest (a `pass=` line every that many passes).
pub const PATTERN_DEFAULT_EVERY: u32 = 100;

/// Debug-exit value of `pattern` when it finds a stale page.
pub const PATTERN_EXIT_STALE: u8 = 3;
/// Debug-exit value of `pattern` for a region that is not usable RAM.
pub const PATTERN_EXIT_BAD_REGION: u8 = 2;
/// Debug-exit value of `smp` when not all CPUs checked in before the timeout.
pub const SMP_EXIT_TIMEOUT: u8 = 2;
/// Debug-exit value of `timer` when a source did not reach its count before the timeout.
pub const TIMER_EXIT_TIMEOUT: u8 = 2;
/// Debug-exit value of any guest that takes an unexpected CPU exception.
pub const EXIT_EXCEPTION: u8 = 4;

/// The `pattern` guest's status block, as read from guest memory at [`PATTERN_STATUS_ADDR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatternStatus {
    /// [`PATTERN_STATUS_MAGIC`] once the guest has parsed its configuration.
    pub magic: u32,
    /// The pass in progress: 0 while the region is being zeroed; during pass `p` every page's
    /// first dword is `p - 1` or `p`, and after the pass all are `p`.
    pub pass: u32,
    /// Region start in MiB.
    pub start_mib: u32,
    /// Region size in MiB.
    pub mib: u32,
}

impl PatternStatus {
    /// Decodes the status block from the [`PATTERN_STATUS_SIZE`] bytes at
    /// [`PATTERN_STATUS_ADDR`]. Returns `None` when the magic does not match.
    pub fn from_bytes(b: &[u8; PATTERN_STATUS_SIZE]) -> Option<Self> {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let s = PatternStatus {
            magic: word(0),
            pass: word(4),
            start_mib: word(8),
            mib: word(12),
        };
        (s.magic == PATTERN_STATUS_MAGIC).then_some(s)
    }
}

/// The guests, for tests that iterate over all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// Prints its command line and exits.
    Hello,
    /// Live-migration memory pattern checker.
    Pattern,
    /// Brings up the application processors.
    Smp,
    /// Counts LAPIC timer and PIT interrupts.
    Timer,
}

impl Guest {
    /// All guests.
    pub const ALL: [Guest; 4] = [Guest::Hello, Guest::Pattern, Guest::Smp, Guest::Timer];

    /// The guest's name, which is also the prefix of its output lines.
    pub fn name(self) -> &'static str {
        match self {
            Guest::Hello => "hello",
            Guest::Pattern => "pattern",
            Guest::Smp => "smp",
            Guest::Timer => "timer",
        }
    }

    /// Path of the guest's ELF file.
    pub fn path(self) -> &'static Path {
        match self {
            Guest::Hello => hello_path(),
            Guest::Pattern => pattern_path(),
            Guest::Smp => smp_path(),
            Guest::Timer => timer_path(),
        }
    }

    /// The guest's ELF file contents.
    pub fn elf(self) -> &'static [u8] {
        match self {
            Guest::Hello => HELLO_ELF,
            Guest::Pattern => PATTERN_ELF,
            Guest::Smp => SMP_ELF,
            Guest::Timer => TIMER_ELF,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finds the PVH entry note in an ELF64 file: returns the entry address.
    fn pvh_entry(elf: &[u8]) -> Option<u32> {
        let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELF64");
        let phoff = u64_at(0x20) as usize;
        let phentsize = u16_at(0x36) as usize;
        let phnum = u16_at(0x38) as usize;
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            if u32_at(ph) != 4 {
                continue; // not PT_NOTE
            }
            let off = u64_at(ph + 8) as usize;
            let size = u64_at(ph + 32) as usize;
            let mut p = off;
            while p + 12 <= off + size {
                let namesz = u32_at(p) as usize;
                let descsz = u32_at(p + 4) as usize;
                let ty = u32_at(p + 8);
                let name = &elf[p + 12..p + 12 + namesz];
                let desc = p + 12 + namesz.div_ceil(4) * 4;
                if ty == 18 && name == b"Xen\0" {
                    return Some(u32_at(desc));
                }
                p = desc + descsz.div_ceil(4) * 4;
            }
        }
        None
    }

    #[test]
    fn every_guest_has_a_pvh_note_in_its_image() {
        for g in Guest::ALL {
            let entry = pvh_entry(g.elf()).unwrap_or_else(|| panic!("{}: no PVH note", g.name()));
            assert!(
                (0x10_0000..0x20_0000).contains(&entry),
                "{}: entry {entry:#x}",
                g.name()
            );
            assert_eq!(std::fs::read(g.path()).unwrap(), g.elf());
        }
        assert!(
            pvh_entry(BLKJOURNAL_ELF).is_some(),
            "blkjournal: no PVH note"
        );
        assert!(pvh_entry(NETECHO_ELF).is_some(), "netecho: no PVH note");
    }

    #[test]
    fn status_block_decodes() {
        let mut b = [0u8; PATTERN_STATUS_SIZE];
        b[..4].copy_from_slice(&PATTERN_STATUS_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        b[8..12].copy_from_slice(&4u32.to_le_bytes());
        b[12..16].copy_from_slice(&32u32.to_le_bytes());
        let s = PatternStatus::from_bytes(&b).unwrap();
        assert_eq!((s.pass, s.start_mib, s.mib), (7, 4, 32));
        assert_eq!(PatternStatus::from_bytes(&[0; PATTERN_STATUS_SIZE]), None);
    }
}

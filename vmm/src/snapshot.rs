//! Snapshot files: a checksummed envelope around the `VmState` and the guest
//! pages in use.
//!
//! ```text
//! header : magic "LVMSNAP\0" (8 bytes) | format version u32 LE | flags u32 LE
//! record : kind u32 | payload length u64 | CRC32 of payload u32 | payload
//!          kind 1 = State   payload: the encoded VmState (at most 64 MiB)
//!          kind 2 = Memory  payload: guest-physical address u64 | page bytes (at most 16 MiB)
//!          kind 3 = End     payload: record count u64 | memory bytes u64
//! ```
//! The state comes first (it names the machine type and memory size, so the
//! loader can refuse before reading memory). Pages that are zero are not written
//! (a fresh restore starts from zeroed memory), and never-touched ranges of the
//! memfd are skipped with `SEEK_DATA`/`SEEK_HOLE` without reading them. Every
//! record, memory included, is covered by a CRC: a flipped bit anywhere is refused.
//! A missing End record means the file was truncated.

use std::io::{Read, Write};

use vm_memory::{Bytes, GuestAddress};

use crate::config::resolve_machine_type;
use crate::state::{StateError, VmState, MAX_STATE_BYTES};
use crate::vstate::memory::GuestRam;

/// File magic.
pub const MAGIC: &[u8; 8] = b"LVMSNAP\0";
/// The format this build writes: 2, whose state record holds versioned sections
/// (`crate::state`). Format 1 held the unsectioned state of earlier launchers; both decode
/// through `VmState::from_bytes`. The bump makes an older launcher refuse a new file by
/// its header ("newer than this launcher reads") rather than by a state it cannot decode.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this build reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Largest memory record payload.
pub const MAX_MEMORY_RECORD: u64 = (16 << 20) + 8;

const KIND_STATE: u32 = 1;
const KIND_MEMORY: u32 = 2;
const KIND_END: u32 = 3;

/// Errors reading or writing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// I/O on the file.
    #[error("snapshot I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Not a snapshot at all.
    #[error("not a snapshot file (bad magic)")]
    BadMagic,
    /// Written by a newer launcher.
    #[error("snapshot format {found} is newer than this launcher reads (at most {MIN_FORMAT_VERSION}..={FORMAT_VERSION}); restore it with a newer launcher")]
    NewerFormat {
        /// The file's version.
        found: u32,
    },
    /// Written by a launcher too old to read.
    #[error("snapshot format {found} is older than this launcher reads ({MIN_FORMAT_VERSION}..={FORMAT_VERSION})")]
    OlderFormat {
        /// The file's version.
        found: u32,
    },
    /// The file ends early.
    #[error("snapshot is truncated: {0}")]
    Truncated(&'static str),
    /// A record fails its checksum or bounds.
    #[error("snapshot is corrupted: {0}")]
    Corrupted(String),
    /// The state names a machine type this build cannot run.
    #[error("snapshot is for machine type {0:?}, which this launcher does not support")]
    UnknownMachineType(String),
    /// State encoding.
    #[error(transparent)]
    State(#[from] StateError),
    /// Guest memory for the restored VM.
    #[error("cannot allocate guest memory for the snapshot: {0}")]
    Memory(String),
}

fn write_record(w: &mut impl Write, kind: u32, parts: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    w.write_all(&kind.to_le_bytes())?;
    w.write_all(&(len as u64).to_le_bytes())?;
    w.write_all(&crate::pages::crc32_of(parts).to_le_bytes())?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Write a snapshot of a paused VM (through [`crate::Vm::write_snapshot`]).
pub(crate) fn write(
    w: &mut impl Write,
    state: &VmState,
    ram: &GuestRam,
) -> Result<SnapshotStats, SnapshotError> {
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    w.write_all(&header)?;
    let body = state.to_bytes()?;
    write_record(w, KIND_STATE, &[&body])?;
    let mut records = 1u64;
    let mut memory_bytes = 0u64;
    let chunk = (MAX_MEMORY_RECORD - 8) as usize;
    let mut buf = vec![0u8; chunk];
    for r in ram.regions() {
        for (start, end) in r.data_ranges() {
            let mut off = start;
            while off < end {
                let len = ((end - off) as usize).min(chunk);
                ram.read_into(r.gpa + off, &mut buf[..len])
                    .map_err(|e| SnapshotError::Memory(e.to_string()))?;
                // Runs of non-zero pages become records; zero pages are left out.
                for run in crate::pages::page_runs(&buf[..len], usize::MAX) {
                    if run.zero {
                        continue;
                    }
                    let gpa = r.gpa + off + run.offset as u64;
                    let data = &buf[run.offset..run.offset + run.len];
                    write_record(w, KIND_MEMORY, &[&gpa.to_le_bytes(), data])?;
                    records += 1;
                    memory_bytes += run.len as u64;
                }
                off += len as u64;
            }
        }
    }
    records += 1;
    let mut end = Vec::with_capacity(16);
    end.extend_from_slice(&records.to_le_bytes());
    end.extend_from_slice(&memory_bytes.to_le_bytes());
    write_record(w, KIND_END, &[&end])?;
    w.flush()?;
    Ok(SnapshotStats {
        memory_bytes,
        state_bytes: body.len() as u64,
    })
}

/// What a snapshot contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Bytes of guest memory written (non-zero pages).
    pub memory_bytes: u64,
    /// Size of the serialised state.
    pub state_bytes: u64,
}

fn read_exact_or(
    r: &mut impl Read,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), SnapshotError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            SnapshotError::Truncated(what)
        } else {
            SnapshotError::Io(e)
        }
    })
}

/// Physical memory of this host in bytes (`u64::MAX` if unknown).
fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages > 0 && page > 0 {
        (pages as u64).saturating_mul(page as u64)
    } else {
        u64::MAX
    }
}

/// Decode the state record and allocate the guest memory it describes, refusing an
/// unknown machine type, an invalid configuration or more memory than the host has.
fn load_state(payload: &[u8]) -> Result<(VmState, GuestRam), SnapshotError> {
    let s = VmState::from_bytes(payload)?;
    if resolve_machine_type(&s.config.machine_type).is_err() {
        return Err(SnapshotError::UnknownMachineType(s.config.machine_type));
    }
    s.config
        .validate()
        .map_err(|e| SnapshotError::Corrupted(e.to_string()))?;
    // Refuse before allocating: guest memory (and its dirty bitmaps) sized by
    // an untrusted file could exhaust the host (found by fuzzing).
    let host = host_memory_bytes();
    if s.config.memory_bytes > host {
        return Err(SnapshotError::Corrupted(format!(
            "the state asks for {} MiB of guest memory, more than this host has ({} MiB)",
            s.config.memory_bytes >> 20,
            host >> 20
        )));
    }
    let ram =
        GuestRam::new(s.config.memory_bytes).map_err(|e| SnapshotError::Memory(e.to_string()))?;
    Ok((s, ram))
}

/// Read a snapshot: the state, and guest memory filled from it.
pub fn read(r: &mut impl Read) -> Result<(VmState, GuestRam), SnapshotError> {
    let mut header = [0u8; 16];
    read_exact_or(r, &mut header, "in the header")?;
    if &header[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
    if version > FORMAT_VERSION {
        return Err(SnapshotError::NewerFormat { found: version });
    }
    if version < MIN_FORMAT_VERSION {
        return Err(SnapshotError::OlderFormat { found: version });
    }
    let mut state: Option<VmState> = None;
    let mut ram: Option<GuestRam> = None;
    let mut records = 0u64;
    let mut memory_bytes = 0u64;
    let mut payload = Vec::new();
    loop {
        let mut rh = [0u8; 16];
        read_exact_or(r, &mut rh, "before the end record")?;
        let kind = u32::from_le_bytes(rh[0..4].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(rh[4..12].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(rh[12..16].try_into().unwrap_or_default());
        let limit = match kind {
            KIND_STATE => MAX_STATE_BYTES,
            KIND_MEMORY => MAX_MEMORY_RECORD,
            KIND_END => 16,
            k => return Err(SnapshotError::Corrupted(format!("unknown record kind {k}"))),
        };
        if len > limit {
            return Err(SnapshotError::Corrupted(format!(
                "record of kind {kind} claims {len} bytes, more than the {limit} allowed"
            )));
        }
        payload.resize(len as usize, 0);
        read_exact_or(r, &mut payload, "inside a record")?;
        if crc32fast::hash(&payload) != crc {
            return Err(SnapshotError::Corrupted(format!(
                "record {records} (kind {kind}) fails its CRC32 check"
            )));
        }
        records += 1;
        match kind {
            KIND_STATE => {
                if state.is_some() {
                    return Err(SnapshotError::Corrupted("two state records".into()));
                }
                let (s, r) = load_state(&payload)?;
                ram = Some(r);
                state = Some(s);
            }
            KIND_MEMORY => {
                let ram = ram
                    .as_ref()
                    .ok_or_else(|| SnapshotError::Corrupted("memory before the state".into()))?;
                if payload.len() < 8 {
                    return Err(SnapshotError::Corrupted("memory record too short".into()));
                }
                let gpa = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                let data = &payload[8..];
                let inside = ram.regions().iter().any(|reg| {
                    gpa >= reg.gpa
                        && gpa
                            .checked_add(data.len() as u64)
                            .is_some_and(|end| end <= reg.gpa + reg.size)
                });
                if !inside {
                    return Err(SnapshotError::Corrupted(format!(
                        "memory record at {gpa:#x} (+{:#x}) lies outside guest RAM",
                        data.len()
                    )));
                }
                ram.memory()
                    .write_slice(data, GuestAddress(gpa))
                    .map_err(|e| SnapshotError::Memory(e.to_string()))?;
                memory_bytes += data.len() as u64;
            }
            _ => {
                if payload.len() != 16 {
                    return Err(SnapshotError::Corrupted(
                        "end record has the wrong size".into(),
                    ));
                }
                let count = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                let bytes = u64::from_le_bytes(payload[8..16].try_into().unwrap_or_default());
                if count != records || bytes != memory_bytes {
                    return Err(SnapshotError::Corrupted(format!(
                        "end record counts {count} records / {bytes} bytes, found {records} / {memory_bytes}"
                    )));
                }
                let (Some(state), Some(ram)) = (state, ram) else {
                    return Err(SnapshotError::Corrupted("no state record".into()));
                };
                // Pages the loader wrote are not guest writes: start clean.
                for i in 0..ram.regions().len() {
                    ram.take_vmm_dirty(i);
                }
                return Ok((state, ram));
            }
        }
    }
}

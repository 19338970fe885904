//! The migration stream receiver's parsing, as one function over bytes: the
//! preamble, then frames (header, control, memory, state) exactly as
//! `migration::receiver` reads them, checked against a small two-region layout,
//! with control messages fed through the handshake checks and the receiver's
//! state machine, and state payloads through `VmState::from_bytes`.
//!
//! Shared by `fuzz/fuzz_targets/migration_stream.rs` (cargo-fuzz) and
//! `migration/tests/fuzz_standin.rs` (seeded mutations in `cargo test`).
//!
//! Input: one flags byte, then the stream. Flag bit 0: recompute every frame's
//! CRC before parsing (so that mutations reach the payload parsers instead of
//! stopping at the checksum); bit 1: local mode instead of copy mode.

use migration::frame::{self, FrameError, FrameReader, FrameType, SliceSink, HEADER_LEN};
use migration::protocol::{
    self, Incoming, MemoryLayout, MemoryRegion, MigrationMode, ReceiverCapabilities,
    ReceiverMessage, ReceiverPhase, SenderMessage, SenderPhase, VersionRange, PREAMBLE_LEN,
};

/// Region sizes of the test layout (small, so each run is cheap).
pub const REGION: u64 = 256 << 10;
/// Guest-physical base of the second region.
pub const HIGH: u64 = 1 << 32;
/// At most this many frames per input.
const MAX_FRAMES: usize = 512;

/// The layout memory frames are checked against.
pub fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        MemoryRegion {
            gpa: 0,
            size: REGION,
        },
        MemoryRegion {
            gpa: HIGH,
            size: REGION,
        },
    ])
    .expect("a valid layout")
}

/// Rewrite the CRC field of every complete or partial frame after the preamble.
pub fn fix_crcs(buf: &mut [u8]) {
    let mut off = PREAMBLE_LEN;
    while off + HEADER_LEN <= buf.len() {
        let len =
            u32::from_le_bytes([buf[off + 8], buf[off + 9], buf[off + 10], buf[off + 11]]) as usize;
        let start = off + HEADER_LEN;
        let end = start.saturating_add(len).min(buf.len());
        let crc = crc32fast::hash(&buf[start..end]);
        buf[off + 12..off + 16].copy_from_slice(&crc.to_le_bytes());
        match start.checked_add(len) {
            Some(next) => off = next,
            None => break,
        }
    }
}

/// Parse `data` (flags byte and stream). `Ok(frames)` when the stream ended
/// cleanly between frames (or `MAX_FRAMES` were read), else the first error's
/// message, which must never be empty.
pub fn run(data: &[u8]) -> Result<usize, String> {
    let Some((&flags, rest)) = data.split_first() else {
        return Ok(0);
    };
    let mut buf = rest.to_vec();
    if flags & 1 != 0 {
        fix_crcs(&mut buf);
    }
    let mode = if flags & 2 != 0 {
        MigrationMode::Local
    } else {
        MigrationMode::Copy
    };
    let layout = layout();
    let caps = ReceiverCapabilities {
        accepted_versions: VersionRange::ours(),
        machine_types: vmm::config::MACHINE_TYPES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        max_memory_bytes: 1 << 40,
        max_vcpus: 8,
        local_mode: flags & 2 != 0,
    };
    let mut low = vec![0u8; REGION as usize];
    let mut high = vec![0u8; REGION as usize];
    let mut r = FrameReader::new(&buf[..]);
    let err = |e: FrameError| e.to_string();
    r.read_preamble().map_err(err)?;
    let mut phase = ReceiverPhase::accepted(mode, protocol::PROTOCOL_VERSION);
    let mut sender_phase = SenderPhase::AwaitAccept;
    for n in 0..MAX_FRAMES {
        let h = match r.read_header() {
            Ok(h) => h,
            Err(FrameError::ConnectionClosed) => return Ok(n),
            Err(e) => return Err(err(e)),
        };
        match h.frame_type {
            FrameType::Memory => {
                let _ = phase.advance(Incoming::Memory).map_err(|e| e.to_string());
                let mut sink = SliceSink {
                    regions: vec![(0, &mut low[..]), (HIGH, &mut high[..])],
                };
                r.read_memory(&h, &layout, &mut sink).map_err(err)?;
            }
            FrameType::State => {
                let _ = phase.advance(Incoming::State).map_err(|e| e.to_string());
                let state = r.read_state(&h).map_err(err)?;
                if let Err(e) = vmm::VmState::from_bytes(&state) {
                    assert!(!e.to_string().is_empty());
                }
            }
            FrameType::Control => {
                let payload = r.read_payload(&h).map_err(err)?;
                match frame::decode_control::<SenderMessage>(&payload) {
                    Ok(msg) => {
                        let _ = msg.name();
                        match &msg {
                            SenderMessage::Hello(hello) => {
                                if let Err(reason) = protocol::check_hello(hello, &caps) {
                                    assert!(!reason.to_string().is_empty());
                                }
                            }
                            SenderMessage::MemoryFds { regions } => {
                                let _ = protocol::check_memory_fds(regions, &layout);
                            }
                            _ => {}
                        }
                        if let Err(e) = phase.advance(Incoming::of(&msg)) {
                            assert!(!e.to_string().is_empty());
                        }
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
                // The same bytes as the sender's return path would decode them.
                if let Ok(msg) = frame::decode_control::<ReceiverMessage>(&payload) {
                    if let ReceiverMessage::Refuse { reason } = &msg {
                        assert!(!reason.to_string().is_empty());
                    }
                    let _ = sender_phase.advance(&msg);
                }
            }
        }
    }
    Ok(MAX_FRAMES)
}

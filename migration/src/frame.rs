//! Framing: every frame is a 16-byte header and a checksummed payload.
//!
//! ```text
//! header (little-endian):
//!   magic        u32   FRAME_MAGIC (b"LVMF")
//!   frame type   u16   1 = control, 2 = memory, 3 = state
//!   flags        u16   must be 0 in protocol version 1
//!   payload len  u32   at most FrameType::max_payload()
//!   payload crc  u32   CRC32 (crc32fast, IEEE) of the payload
//! payload
//! ```
//!
//! Control payloads are bincode (fixed-width integers, little-endian, size
//! limit [`MAX_CONTROL_PAYLOAD`], no trailing bytes) of
//! [`SenderMessage`](crate::protocol::SenderMessage) or
//! [`ReceiverMessage`](crate::protocol::ReceiverMessage). State payloads are
//! the caller's opaque bytes (bincode of the VMM's `VmState`).
//!
//! Memory payloads:
//!
//! ```text
//!   count        u32                      number of ranges, 1..=MAX_MEMORY_RANGES
//!   count × { gpa u64, length u64, kind u32 (1 = data, 2 = zero), reserved u32 = 0 }
//!   the bytes of the data ranges, in table order; zero ranges carry no bytes
//! ```
//!
//! Ranges must be non-empty, strictly ascending and non-overlapping, each
//! inside one region of the announced layout, and the data bytes must fill
//! the payload exactly.
//!
//! A reader checks magic, type, flags and the length bound on the header
//! before it allocates or reads the payload, and the CRC before it acts on
//! the payload. After any error the stream is out of step and must be
//! dropped: every error is fatal to the migration.

use std::io::{self, IoSlice, Read, Write};

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::protocol::{self, MemoryLayout, ProtocolError, PREAMBLE_LEN};

/// `b"LVMF"` read as a little-endian `u32`.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"LVMF");
/// Size of the frame header.
pub const HEADER_LEN: usize = 16;
/// Bound on control payloads.
pub const MAX_CONTROL_PAYLOAD: u32 = 1 << 20;
/// Bound on memory payloads (table and data).
pub const MAX_MEMORY_PAYLOAD: u32 = 64 << 20;
/// Bound on state payloads.
pub const MAX_STATE_PAYLOAD: u32 = 32 << 20;
/// Bound on the number of ranges in one memory frame.
pub const MAX_MEMORY_RANGES: u32 = 1 << 16;
/// Size of one range-table entry.
pub const RANGE_ENTRY_LEN: usize = 24;

/// Errors of the framing layer.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("i/o error on the migration stream: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed by the peer")]
    ConnectionClosed,
    #[error("truncated stream: end of stream after {got} of {expected} bytes of the {what}")]
    Truncated {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("bad frame magic {found:#010x} (expected {FRAME_MAGIC:#010x})")]
    BadMagic { found: u32 },
    #[error("unknown frame type {0}")]
    UnknownType(u16),
    #[error("unknown frame flags {0:#06x}")]
    UnknownFlags(u16),
    #[error("{frame_type:?} frame of {len} bytes exceeds the bound of {max} bytes")]
    TooLong {
        frame_type: FrameType,
        len: u64,
        max: u32,
    },
    #[error("CRC mismatch on a {frame_type:?} frame of {len} bytes: header says {expected:#010x}, payload has {actual:#010x}")]
    CrcMismatch {
        frame_type: FrameType,
        len: u32,
        expected: u32,
        actual: u32,
    },
    #[error("expected a {expected:?} frame, got a {got:?} frame")]
    WrongType { expected: FrameType, got: FrameType },
    #[error("invalid memory frame: {0}")]
    InvalidMemoryFrame(String),
    #[error("memory range [{gpa:#x}, +{len:#x}) lies outside the guest memory layout")]
    RangeOutsideLayout { gpa: u64, len: u64 },
    #[error("cannot decode control message: {0}")]
    Decode(String),
    #[error("cannot encode control message: {0}")]
    Encode(String),
    #[error("memory sink refused range [{gpa:#x}, +{len:#x}): {reason}")]
    Sink { gpa: u64, len: u64, reason: String },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameType {
    Control = 1,
    Memory = 2,
    State = 3,
}

impl FrameType {
    pub fn from_u16(v: u16) -> Result<Self, FrameError> {
        match v {
            1 => Ok(FrameType::Control),
            2 => Ok(FrameType::Memory),
            3 => Ok(FrameType::State),
            other => Err(FrameError::UnknownType(other)),
        }
    }

    /// Hard upper bound on the payload length of this type.
    pub fn max_payload(self) -> u32 {
        match self {
            FrameType::Control => MAX_CONTROL_PAYLOAD,
            FrameType::Memory => MAX_MEMORY_PAYLOAD,
            FrameType::State => MAX_STATE_PAYLOAD,
        }
    }
}

/// A decoded and bound-checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub frame_type: FrameType,
    pub flags: u16,
    pub len: u32,
    pub crc: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&(self.frame_type as u16).to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Checks magic, type, flags and the length bound, in that order.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = u32_at(0);
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let frame_type = FrameType::from_u16(u16::from_le_bytes([b[4], b[5]]))?;
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        let len = u32_at(8);
        if len > frame_type.max_payload() {
            return Err(FrameError::TooLong {
                frame_type,
                len: len.into(),
                max: frame_type.max_payload(),
            });
        }
        Ok(FrameHeader {
            frame_type,
            flags,
            len,
            crc: u32_at(12),
        })
    }
}

/// The bincode options used for control messages.
pub fn bincode_options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(u64::from(MAX_CONTROL_PAYLOAD))
        .with_little_endian()
        .with_fixint_encoding()
        .reject_trailing_bytes()
}

/// A complete control frame (header and payload), e.g. to send with
/// `SCM_RIGHTS` through [`crate::transport::send_fds`].
pub fn encode_control_frame<M: Serialize>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let payload = bincode_options()
        .serialize(msg)
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let header = header_for(FrameType::Control, &[&payload])?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a control payload (already length- and CRC-checked).
pub fn decode_control<M: DeserializeOwned>(payload: &[u8]) -> Result<M, FrameError> {
    bincode_options()
        .deserialize(payload)
        .map_err(|e| FrameError::Decode(e.to_string()))
}

fn header_for(frame_type: FrameType, parts: &[&[u8]]) -> Result<FrameHeader, FrameError> {
    let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
    if len > u64::from(frame_type.max_payload()) {
        return Err(FrameError::TooLong {
            frame_type,
            len,
            max: frame_type.max_payload(),
        });
    }
    Ok(FrameHeader {
        frame_type,
        flags: 0,
        len: len as u32,
        crc: vmm::pages::crc32_of(parts),
    })
}

/// Kind of a memory range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RangeKind {
    /// The range's bytes follow the table.
    Data = 1,
    /// The range is all zeroes and carries no bytes.
    Zero = 2,
}

/// One entry of a memory frame's range table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    pub gpa: u64,
    pub len: u64,
    pub kind: RangeKind,
}

impl MemoryRange {
    pub fn data(gpa: u64, len: u64) -> Self {
        MemoryRange {
            gpa,
            len,
            kind: RangeKind::Data,
        }
    }

    pub fn zero(gpa: u64, len: u64) -> Self {
        MemoryRange {
            gpa,
            len,
            kind: RangeKind::Zero,
        }
    }
}

/// Encodes the range table (count and entries).
pub fn encode_range_table(ranges: &[MemoryRange]) -> Vec<u8> {
    let mut t = Vec::with_capacity(4 + ranges.len() * RANGE_ENTRY_LEN);
    t.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for r in ranges {
        t.extend_from_slice(&r.gpa.to_le_bytes());
        t.extend_from_slice(&r.len.to_le_bytes());
        t.extend_from_slice(&(r.kind as u32).to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes());
    }
    t
}

/// Length of the table for `count` entries.
pub fn range_table_len(count: u32) -> u64 {
    4 + u64::from(count) * RANGE_ENTRY_LEN as u64
}

/// Parses and validates a range table (`entries` excludes the count) for a
/// payload of `payload_len` bytes: kinds known, reserved zero, ranges
/// non-empty, ascending, non-overlapping, inside `layout`, and the data
/// lengths adding up to exactly the rest of the payload.
pub fn parse_range_table(
    count: u32,
    entries: &[u8],
    payload_len: u64,
    layout: &MemoryLayout,
) -> Result<Vec<MemoryRange>, FrameError> {
    let bad = |s: String| Err(FrameError::InvalidMemoryFrame(s));
    if count == 0 || count > MAX_MEMORY_RANGES {
        return bad(format!("{count} ranges, 1..={MAX_MEMORY_RANGES} allowed"));
    }
    let table_len = range_table_len(count);
    if table_len > payload_len || entries.len() as u64 != table_len - 4 {
        return bad(format!(
            "a table of {count} ranges needs {table_len} bytes, the payload has {payload_len}"
        ));
    }
    let mut ranges = Vec::with_capacity(count as usize);
    let mut data_total: u64 = 0;
    let mut prev_end: Option<u64> = None;
    for (i, e) in entries.chunks_exact(RANGE_ENTRY_LEN).enumerate() {
        let u64_at = |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(e[o..o + 4].try_into().unwrap_or([0; 4]));
        let (gpa, len, kind, reserved) = (u64_at(0), u64_at(8), u32_at(16), u32_at(20));
        let kind = match kind {
            1 => RangeKind::Data,
            2 => RangeKind::Zero,
            k => return bad(format!("range {i} has unknown kind {k}")),
        };
        if reserved != 0 {
            return bad(format!("range {i} has a non-zero reserved field"));
        }
        if len == 0 {
            return bad(format!("range {i} is empty"));
        }
        let Some(end) = gpa.checked_add(len) else {
            return bad(format!("range {i} [{gpa:#x}, +{len:#x}) overflows"));
        };
        if let Some(p) = prev_end {
            if gpa < p {
                return bad(format!(
                    "range {i} at {gpa:#x} overlaps or precedes the previous range ending at {p:#x}"
                ));
            }
        }
        prev_end = Some(end);
        if layout.region_containing(gpa, len).is_none() {
            return Err(FrameError::RangeOutsideLayout { gpa, len });
        }
        if kind == RangeKind::Data {
            data_total = match data_total.checked_add(len) {
                Some(t) if t <= payload_len - table_len => t,
                _ => {
                    return bad(format!(
                        "data ranges exceed the {} data bytes of the payload",
                        payload_len - table_len
                    ))
                }
            };
        }
        ranges.push(MemoryRange { gpa, len, kind });
    }
    if data_total != payload_len - table_len {
        return bad(format!(
            "data ranges hold {data_total} bytes, the payload carries {}",
            payload_len - table_len
        ));
    }
    Ok(ranges)
}

/// Where the data of a memory frame goes (the receiver's guest memory). The reader
/// calls it only after the whole frame passed its CRC check: nothing unverified ever
/// reaches guest memory.
pub trait MemorySink {
    /// Store the verified bytes of a data range (`data.len() == range.len`).
    fn data(&mut self, range: &MemoryRange, data: &[u8]) -> Result<(), String>;
    /// Make a verified zero range zero.
    fn zero(&mut self, range: &MemoryRange) -> Result<(), String>;
}

/// A [`MemorySink`] over plain slices, one per region (`(gpa, slice)`).
pub struct SliceSink<'a> {
    pub regions: Vec<(u64, &'a mut [u8])>,
}

impl SliceSink<'_> {
    fn find(&mut self, range: &MemoryRange) -> Result<&mut [u8], String> {
        for (gpa, mem) in self.regions.iter_mut() {
            let start = range.gpa.wrapping_sub(*gpa);
            if range.gpa >= *gpa
                && start
                    .checked_add(range.len)
                    .is_some_and(|end| end <= mem.len() as u64)
            {
                return Ok(&mut mem[start as usize..(start + range.len) as usize]);
            }
        }
        Err("no slice holds this range".into())
    }
}

impl MemorySink for SliceSink<'_> {
    fn data(&mut self, range: &MemoryRange, data: &[u8]) -> Result<(), String> {
        self.find(range)?.copy_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, range: &MemoryRange) -> Result<(), String> {
        self.find(range)?.fill(0);
        Ok(())
    }
}

/// Counts of what a memory frame carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryFrameSummary {
    pub ranges: u32,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// Writes frames on a byte stream.
pub struct FrameWriter<W: Write> {
    inner: W,
    bytes_written: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            bytes_written: 0,
        }
    }

    /// Total bytes written so far (headers included).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Writes the stream preamble with this build's protocol version.
    pub fn write_preamble(&mut self) -> Result<(), FrameError> {
        self.write_all_vectored(&mut [IoSlice::new(&protocol::encode_preamble(
            protocol::PROTOCOL_VERSION,
        ))])
    }

    /// Writes a control frame.
    pub fn write_control<M: Serialize>(&mut self, msg: &M) -> Result<(), FrameError> {
        let frame = encode_control_frame(msg)?;
        self.write_all_vectored(&mut [IoSlice::new(&frame)])
    }

    /// Writes a state frame carrying `state`.
    pub fn write_state(&mut self, state: &[u8]) -> Result<(), FrameError> {
        let header = header_for(FrameType::State, &[state])?.encode();
        self.write_all_vectored(&mut [IoSlice::new(&header), IoSlice::new(state)])
    }

    /// Writes a memory frame: `ranges` in order, and `data` the bytes of the
    /// data ranges in table order, as any number of slices whose total length
    /// equals the data ranges' total. The slices are gathered with
    /// `write_vectored`, never copied.
    pub fn write_memory(
        &mut self,
        ranges: &[MemoryRange],
        data: &[&[u8]],
    ) -> Result<(), FrameError> {
        if ranges.is_empty() || ranges.len() > MAX_MEMORY_RANGES as usize {
            return Err(FrameError::InvalidMemoryFrame(format!(
                "{} ranges, 1..={MAX_MEMORY_RANGES} allowed",
                ranges.len()
            )));
        }
        let expected: u64 = ranges
            .iter()
            .filter(|r| r.kind == RangeKind::Data)
            .fold(0u64, |a, r| a.saturating_add(r.len));
        let given: u64 = data.iter().map(|d| d.len() as u64).sum();
        if expected != given {
            return Err(FrameError::InvalidMemoryFrame(format!(
                "data ranges total {expected} bytes but {given} bytes were given"
            )));
        }
        let table = encode_range_table(ranges);
        let mut parts: Vec<&[u8]> = Vec::with_capacity(data.len() + 1);
        parts.push(&table);
        parts.extend(data.iter().copied().filter(|d| !d.is_empty()));
        let header = header_for(FrameType::Memory, &parts)?.encode();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
        slices.push(IoSlice::new(&header));
        slices.extend(parts.iter().map(|p| IoSlice::new(p)));
        self.write_all_vectored(&mut slices)
    }

    pub fn flush(&mut self) -> Result<(), FrameError> {
        Ok(self.inner.flush()?)
    }

    fn write_all_vectored(&mut self, mut bufs: &mut [IoSlice<'_>]) -> Result<(), FrameError> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.inner.write_vectored(bufs) {
                Ok(0) => {
                    return Err(FrameError::Io(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the migration stream accepts no more bytes",
                    )))
                }
                Ok(n) => {
                    self.bytes_written += n as u64;
                    IoSlice::advance_slices(&mut bufs, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Reads frames from a byte stream. Reads exactly the bytes of each frame
/// (no read-ahead), so the underlying stream can be handed on.
pub struct FrameReader<R: Read> {
    inner: R,
    bytes_read: u64,
    /// The data bytes of the memory frame being read, held until its CRC is checked
    /// (reused: allocated once at the size of the largest frame seen, at most
    /// [`MAX_MEMORY_PAYLOAD`]).
    data: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            bytes_read: 0,
            data: Vec::new(),
        }
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads the peer's preamble, refusing a bad magic; returns its version.
    pub fn read_preamble(&mut self) -> Result<u32, FrameError> {
        let mut b = [0u8; PREAMBLE_LEN];
        self.read_exact_or(&mut b, "preamble", true)?;
        Ok(protocol::decode_preamble(&b)?)
    }

    /// Reads and checks the next header. A clean end of stream before its
    /// first byte is [`FrameError::ConnectionClosed`].
    pub fn read_header(&mut self) -> Result<FrameHeader, FrameError> {
        let mut b = [0u8; HEADER_LEN];
        self.read_exact_or(&mut b, "frame header", true)?;
        FrameHeader::decode(&b)
    }

    /// Reads a whole payload and checks its CRC.
    pub fn read_payload(&mut self, h: &FrameHeader) -> Result<Vec<u8>, FrameError> {
        // The length was bound-checked when the header was decoded.
        let mut payload = vec![0u8; h.len as usize];
        self.read_exact_or(&mut payload, "frame payload", false)?;
        check_crc(h, crc32fast::hash(&payload))?;
        Ok(payload)
    }

    /// Reads the payload of a control frame and decodes it.
    pub fn read_control<M: DeserializeOwned>(&mut self, h: &FrameHeader) -> Result<M, FrameError> {
        expect_type(h, FrameType::Control)?;
        decode_control(&self.read_payload(h)?)
    }

    /// Reads the next frame, which must be a control frame.
    pub fn read_control_frame<M: DeserializeOwned>(&mut self) -> Result<M, FrameError> {
        let h = self.read_header()?;
        self.read_control(&h)
    }

    /// Reads the payload of a state frame.
    pub fn read_state(&mut self, h: &FrameHeader) -> Result<Vec<u8>, FrameError> {
        expect_type(h, FrameType::State)?;
        self.read_payload(h)
    }

    /// Reads the payload of a memory frame into `sink`. The table is read and fully
    /// validated against `layout` before any data byte is read; the data bytes are read
    /// into a buffer (bounded by the header's checked length) and handed to the sink only
    /// after the CRC over the whole payload matched.
    pub fn read_memory<S: MemorySink + ?Sized>(
        &mut self,
        h: &FrameHeader,
        layout: &MemoryLayout,
        sink: &mut S,
    ) -> Result<MemoryFrameSummary, FrameError> {
        expect_type(h, FrameType::Memory)?;
        let payload_len = u64::from(h.len);
        if payload_len < 4 {
            return Err(FrameError::InvalidMemoryFrame(format!(
                "a payload of {payload_len} bytes has no range count"
            )));
        }
        let mut hasher = crc32fast::Hasher::new();
        let mut count_b = [0u8; 4];
        self.read_exact_or(&mut count_b, "memory range count", false)?;
        hasher.update(&count_b);
        let count = u32::from_le_bytes(count_b);
        if count == 0 || count > MAX_MEMORY_RANGES || range_table_len(count) > payload_len {
            return Err(FrameError::InvalidMemoryFrame(format!(
                "{count} ranges do not fit a payload of {payload_len} bytes (at most {MAX_MEMORY_RANGES})"
            )));
        }
        let mut entries = vec![0u8; (range_table_len(count) - 4) as usize];
        self.read_exact_or(&mut entries, "memory range table", false)?;
        hasher.update(&entries);
        let ranges = parse_range_table(count, &entries, payload_len, layout)?;
        // parse_range_table checked that the data ranges fill the rest of the payload.
        let data_len = (payload_len - range_table_len(count)) as usize;
        let mut data = std::mem::take(&mut self.data);
        data.resize(data_len, 0);
        let read = Self::read_exact_counted(
            &mut self.inner,
            &mut self.bytes_read,
            &mut data,
            "memory data",
        );
        hasher.update(&data);
        let result = read
            .and_then(|()| check_crc(h, hasher.finalize()))
            .and_then(|()| apply_ranges(&ranges, &data, sink));
        self.data = data;
        result
    }

    fn read_exact_or(
        &mut self,
        buf: &mut [u8],
        what: &'static str,
        at_boundary: bool,
    ) -> Result<(), FrameError> {
        match Self::read_exact_counted(&mut self.inner, &mut self.bytes_read, buf, what) {
            Err(FrameError::Truncated { got: 0, .. }) if at_boundary => {
                Err(FrameError::ConnectionClosed)
            }
            other => other,
        }
    }

    fn read_exact_counted(
        inner: &mut R,
        counter: &mut u64,
        buf: &mut [u8],
        what: &'static str,
    ) -> Result<(), FrameError> {
        let mut got = 0;
        while got < buf.len() {
            match inner.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(FrameError::Truncated {
                        what,
                        expected: buf.len(),
                        got,
                    })
                }
                Ok(n) => {
                    got += n;
                    *counter += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Hands the verified ranges of a memory frame to `sink`, data ranges with their bytes.
fn apply_ranges<S: MemorySink + ?Sized>(
    ranges: &[MemoryRange],
    data: &[u8],
    sink: &mut S,
) -> Result<MemoryFrameSummary, FrameError> {
    let mut summary = MemoryFrameSummary {
        ranges: ranges.len() as u32,
        ..Default::default()
    };
    let mut at = 0usize;
    for r in ranges {
        let sink_err = |reason: String| FrameError::Sink {
            gpa: r.gpa,
            len: r.len,
            reason,
        };
        match r.kind {
            RangeKind::Data => {
                let bytes = &data[at..at + r.len as usize];
                at += r.len as usize;
                sink.data(r, bytes).map_err(sink_err)?;
                summary.data_bytes += r.len;
            }
            RangeKind::Zero => {
                sink.zero(r).map_err(sink_err)?;
                summary.zero_bytes += r.len;
            }
        }
    }
    Ok(summary)
}

fn expect_type(h: &FrameHeader, expected: FrameType) -> Result<(), FrameError> {
    if h.frame_type == expected {
        Ok(())
    } else {
        Err(FrameError::WrongType {
            expected,
            got: h.frame_type,
        })
    }
}

fn check_crc(h: &FrameHeader, actual: u32) -> Result<(), FrameError> {
    if actual == h.crc {
        Ok(())
    } else {
        Err(FrameError::CrcMismatch {
            frame_type: h.frame_type,
            len: h.len,
            expected: h.crc,
            actual,
        })
    }
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;

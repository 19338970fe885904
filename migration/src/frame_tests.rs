use std::io::{self, Cursor, Read};

use proptest::prelude::*;

use super::*;
use crate::protocol::{
    Hello, MemoryRegion, MigrationMode, ReceiverMessage, RefuseReason, SenderMessage, VersionRange,
};

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        MemoryRegion {
            gpa: 0,
            size: 0x10000,
        },
        MemoryRegion {
            gpa: 0x100000,
            size: 0x4000,
        },
    ])
    .unwrap()
}

/// Guest memory matching `layout()`.
struct Mem {
    low: Vec<u8>,
    high: Vec<u8>,
}

impl Mem {
    fn new(fill: u8) -> Self {
        Mem {
            low: vec![fill; 0x10000],
            high: vec![fill; 0x4000],
        }
    }
    fn sink(&mut self) -> SliceSink<'_> {
        SliceSink {
            regions: vec![(0, &mut self.low[..]), (0x100000, &mut self.high[..])],
        }
    }
}

/// Delivers at most one byte per read, with an `Interrupted` every other call.
struct Trickle<R> {
    inner: R,
    toggle: bool,
}

impl<R: Read> Read for Trickle<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.toggle = !self.toggle;
        if self.toggle {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(1);
        self.inner.read(&mut buf[..n])
    }
}

fn hello() -> SenderMessage {
    SenderMessage::Hello(Hello {
        versions: VersionRange::ours(),
        machine_type: "q35".into(),
        memory: layout(),
        vcpus: 1,
        mode: MigrationMode::Copy,
        launcher_version: "0.1.0".into(),
    })
}

fn memory_frame() -> Vec<u8> {
    let a = vec![0xaau8; 4096];
    let b: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
    let mut w = FrameWriter::new(Vec::new());
    w.write_memory(
        &[
            MemoryRange::data(0x1000, 4096),
            MemoryRange::zero(0x3000, 0x2000),
            MemoryRange::data(0x100000, 8192),
        ],
        &[&a, &b[..100], &b[100..]],
    )
    .unwrap();
    w.into_inner()
}

#[test]
fn control_and_state_roundtrip() {
    let mut w = FrameWriter::new(Vec::new());
    w.write_preamble().unwrap();
    w.write_control(&hello()).unwrap();
    w.write_state(b"opaque vm state").unwrap();
    w.write_state(b"").unwrap();
    let refuse = ReceiverMessage::Refuse {
        reason: RefuseReason::Other("x".into()),
    };
    w.write_control(&refuse).unwrap();
    let bytes = w.into_inner();
    for trickle in [false, true] {
        let src: Box<dyn Read> = if trickle {
            Box::new(Trickle {
                inner: Cursor::new(bytes.clone()),
                toggle: false,
            })
        } else {
            Box::new(Cursor::new(bytes.clone()))
        };
        let mut r = FrameReader::new(src);
        assert_eq!(
            r.read_preamble().unwrap(),
            crate::protocol::PROTOCOL_VERSION
        );
        assert_eq!(r.read_control_frame::<SenderMessage>().unwrap(), hello());
        let h = r.read_header().unwrap();
        assert_eq!(r.read_state(&h).unwrap(), b"opaque vm state");
        let h = r.read_header().unwrap();
        assert_eq!(r.read_state(&h).unwrap(), b"");
        assert_eq!(r.read_control_frame::<ReceiverMessage>().unwrap(), refuse);
        assert!(matches!(r.read_header(), Err(FrameError::ConnectionClosed)));
        assert_eq!(r.bytes_read(), bytes.len() as u64);
    }
}

#[test]
fn memory_roundtrip() {
    let bytes = memory_frame();
    let mut mem = Mem::new(0x55);
    let mut r = FrameReader::new(Trickle {
        inner: Cursor::new(bytes),
        toggle: false,
    });
    let h = r.read_header().unwrap();
    let s = r.read_memory(&h, &layout(), &mut mem.sink()).unwrap();
    assert_eq!(
        s,
        MemoryFrameSummary {
            ranges: 3,
            data_bytes: 4096 + 8192,
            zero_bytes: 0x2000
        }
    );
    assert!(mem.low[..0x1000].iter().all(|&b| b == 0x55));
    assert!(mem.low[0x1000..0x2000].iter().all(|&b| b == 0xaa));
    assert!(mem.low[0x2000..0x3000].iter().all(|&b| b == 0x55));
    assert!(mem.low[0x3000..0x5000].iter().all(|&b| b == 0));
    assert!(mem.low[0x5000..].iter().all(|&b| b == 0x55));
    assert!(mem.high[..8192]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == i as u8));
}

#[test]
fn every_bit_flip_is_refused() {
    let good = memory_frame();
    for bit in 0..good.len() * 8 {
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let mut mem = Mem::new(0x55);
        let mut r = FrameReader::new(Cursor::new(bad));
        let res = r
            .read_header()
            .and_then(|h| r.read_memory(&h, &layout(), &mut mem.sink()));
        assert!(res.is_err(), "flip of bit {bit} accepted");
        // Nothing of a refused frame reaches memory: data and zero ranges are applied
        // only after the CRC check.
        assert!(
            mem.low.iter().chain(&mem.high).all(|&b| b == 0x55),
            "bit {bit} changed memory"
        );
    }
    let good = encode_control_frame(&hello()).unwrap();
    for bit in 0..good.len() * 8 {
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let res = FrameReader::new(Cursor::new(bad)).read_control_frame::<SenderMessage>();
        assert!(res.is_err(), "flip of bit {bit} accepted");
    }
}

#[test]
fn truncation_is_reported() {
    let good = memory_frame();
    for cut in 0..good.len() {
        let mut mem = Mem::new(0);
        let mut r = FrameReader::new(Cursor::new(&good[..cut]));
        let res = r
            .read_header()
            .and_then(|h| r.read_memory(&h, &layout(), &mut mem.sink()));
        match res {
            Err(FrameError::ConnectionClosed) => assert_eq!(cut, 0),
            Err(FrameError::Truncated { .. }) => assert!(cut > 0),
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    let mut r = FrameReader::new(Cursor::new(&b"LVMIGR"[..]));
    assert!(matches!(
        r.read_preamble(),
        Err(FrameError::Truncated { got: 6, .. })
    ));
}

fn header_bytes(magic: u32, ty: u16, flags: u16, len: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&magic.to_le_bytes());
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b
}

#[test]
fn header_checks_come_first() {
    let read = |b: Vec<u8>| FrameReader::new(Cursor::new(b)).read_header();
    assert!(matches!(
        read(header_bytes(0x1234, 1, 0, 0)),
        Err(FrameError::BadMagic { found: 0x1234 })
    ));
    assert!(matches!(
        read(header_bytes(FRAME_MAGIC, 9, 0, 0)),
        Err(FrameError::UnknownType(9))
    ));
    assert!(matches!(
        read(header_bytes(FRAME_MAGIC, 1, 4, 0)),
        Err(FrameError::UnknownFlags(4))
    ));
    // A huge length is refused from the header alone, before any allocation.
    for (ty, max) in [
        (1, MAX_CONTROL_PAYLOAD),
        (2, MAX_MEMORY_PAYLOAD),
        (3, MAX_STATE_PAYLOAD),
    ] {
        assert!(matches!(
            read(header_bytes(FRAME_MAGIC, ty, 0, max + 1)),
            Err(FrameError::TooLong { .. })
        ));
        assert!(read(header_bytes(FRAME_MAGIC, ty, 0, max)).is_ok());
    }
    assert!(matches!(
        read(header_bytes(FRAME_MAGIC, 1, 0, u32::MAX)),
        Err(FrameError::TooLong { .. })
    ));
    let mut r = FrameReader::new(Cursor::new(b"GET / HTTP/1.1\r\n".to_vec()));
    assert!(matches!(
        r.read_preamble(),
        Err(FrameError::Protocol(ProtocolError::BadMagic { .. }))
    ));
}

#[test]
fn wrong_type_and_bad_control() {
    let mut w = FrameWriter::new(Vec::new());
    w.write_state(b"xyz").unwrap();
    let mut r = FrameReader::new(Cursor::new(w.into_inner()));
    let h = r.read_header().unwrap();
    assert!(matches!(
        r.read_control::<SenderMessage>(&h),
        Err(FrameError::WrongType { .. })
    ));
    // A valid CRC over bytes that are not a message.
    let payload = [200u8, 0, 0, 0];
    let h = FrameHeader {
        frame_type: FrameType::Control,
        flags: 0,
        len: 4,
        crc: crc32fast::hash(&payload),
    };
    let mut b = h.encode().to_vec();
    b.extend_from_slice(&payload);
    let res = FrameReader::new(Cursor::new(b)).read_control_frame::<SenderMessage>();
    assert!(matches!(res, Err(FrameError::Decode(_))), "{res:?}");
    // Trailing bytes after a valid message are refused.
    let mut payload = bincode_options().serialize(&SenderMessage::Go).unwrap();
    payload.push(0);
    assert!(decode_control::<SenderMessage>(&payload).is_err());
    // A string length prefix far beyond the payload does not allocate.
    let mut payload = 0u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(decode_control::<SenderMessage>(&payload).is_err());
}

fn table(ranges: &[(u64, u64, u32, u32)]) -> (u32, Vec<u8>) {
    let mut b = Vec::new();
    for &(gpa, len, kind, res) in ranges {
        b.extend_from_slice(&gpa.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&kind.to_le_bytes());
        b.extend_from_slice(&res.to_le_bytes());
    }
    (ranges.len() as u32, b)
}

#[test]
fn range_table_validation() {
    let l = layout();
    let parse = |r: &[(u64, u64, u32, u32)], data: u64| {
        let (n, t) = table(r);
        parse_range_table(n, &t, range_table_len(n) + data, &l)
    };
    assert!(parse(&[(0, 4096, 1, 0), (0x100000, 0x4000, 2, 0)], 4096).is_ok());
    let invalid = |r: &[(u64, u64, u32, u32)], data: u64| {
        matches!(parse(r, data), Err(FrameError::InvalidMemoryFrame(_)))
    };
    assert!(invalid(&[(0, 4096, 3, 0)], 4096), "unknown kind");
    assert!(invalid(&[(0, 4096, 1, 1)], 4096), "reserved");
    assert!(invalid(&[(0, 0, 2, 0)], 0), "empty");
    assert!(invalid(&[(0, 4096, 1, 0)], 4095), "short data");
    assert!(invalid(&[(0, 4096, 1, 0)], 4097), "long data");
    assert!(
        invalid(&[(0x2000, 4096, 2, 0), (0x1000, 4096, 2, 0)], 0),
        "descending"
    );
    assert!(
        invalid(&[(0, 8192, 2, 0), (4096, 4096, 2, 0)], 0),
        "overlap"
    );
    assert!(invalid(&[(u64::MAX - 10, 4096, 2, 0)], 0), "overflow");
    assert!(matches!(
        parse(&[(0xf000, 0x2000, 2, 0)], 0),
        Err(FrameError::RangeOutsideLayout { .. })
    ));
    assert!(matches!(
        parse(&[(0x20000, 1, 2, 0)], 0),
        Err(FrameError::RangeOutsideLayout { .. })
    ));
    // Data lengths that would overflow the sum.
    let (n, t) = table(&[(0, 0x8000, 1, 0), (0x100000, 0x4000, 1, 0)]);
    assert!(parse_range_table(n, &t, range_table_len(n) + 100, &l).is_err());
    // Count and table length disagree.
    let (_, t) = table(&[(0, 4096, 2, 0)]);
    assert!(parse_range_table(2, &t, 100, &l).is_err());
    assert!(parse_range_table(0, &[], 4, &l).is_err());
    assert!(parse_range_table(MAX_MEMORY_RANGES + 1, &[], u64::MAX, &l).is_err());
}

#[test]
fn memory_frame_count_bound_checked_before_allocation() {
    let payload = [0xffu8, 0xff, 0xff, 0xff];
    let h = FrameHeader {
        frame_type: FrameType::Memory,
        flags: 0,
        len: 4,
        crc: crc32fast::hash(&payload),
    };
    let mut b = h.encode().to_vec();
    b.extend_from_slice(&payload);
    let mut r = FrameReader::new(Cursor::new(b));
    let h = r.read_header().unwrap();
    let mut mem = Mem::new(0);
    assert!(matches!(
        r.read_memory(&h, &layout(), &mut mem.sink()),
        Err(FrameError::InvalidMemoryFrame(_))
    ));
}

#[test]
fn writer_checks_its_input() {
    let mut w = FrameWriter::new(Vec::new());
    assert!(w.write_memory(&[], &[]).is_err());
    assert!(w
        .write_memory(&[MemoryRange::data(0, 4096)], &[&[0u8; 10]])
        .is_err());
    let big = vec![0u8; MAX_STATE_PAYLOAD as usize + 1];
    assert!(matches!(
        w.write_state(&big),
        Err(FrameError::TooLong { .. })
    ));
    assert_eq!(w.bytes_written(), 0);
}

#[test]
fn sink_errors_are_reported() {
    struct Short;
    impl MemorySink for Short {
        fn data(&mut self, _r: &MemoryRange, _d: &[u8]) -> Result<(), String> {
            Err("no memory here".into())
        }
        fn zero(&mut self, _r: &MemoryRange) -> Result<(), String> {
            Ok(())
        }
    }
    let mut r = FrameReader::new(Cursor::new(memory_frame()));
    let h = r.read_header().unwrap();
    let e = r.read_memory(&h, &layout(), &mut Short).unwrap_err();
    assert!(e.to_string().contains("no memory here"), "{e}");
}

proptest! {
    #[test]
    fn memory_frames_roundtrip(pages in proptest::collection::btree_map(0u64..20, (1u64..3, any::<bool>(), any::<u8>()), 1..10)) {
        // Non-overlapping ranges in the low region from a sorted map of page -> (len, zero, fill).
        let mut ranges = Vec::new();
        let mut data = Vec::new();
        let mut next = 0u64;
        for (&p, &(n, zero, fill)) in &pages {
            let start = p.max(next);
            if start + n > 16 { break; }
            let r = if zero { MemoryRange::zero(start * 4096, n * 4096) } else { MemoryRange::data(start * 4096, n * 4096) };
            if !zero { data.push(vec![fill; (n * 4096) as usize]); }
            ranges.push(r);
            next = start + n;
        }
        prop_assume!(!ranges.is_empty());
        let slices: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
        let mut w = FrameWriter::new(Vec::new());
        w.write_memory(&ranges, &slices).unwrap();
        let mut mem = Mem::new(0x11);
        let mut r = FrameReader::new(Cursor::new(w.into_inner()));
        let h = r.read_header().unwrap();
        r.read_memory(&h, &layout(), &mut mem.sink()).unwrap();
        let mut di = 0;
        for rg in &ranges {
            let got = &mem.low[rg.gpa as usize..(rg.gpa + rg.len) as usize];
            match rg.kind {
                RangeKind::Zero => prop_assert!(got.iter().all(|&b| b == 0)),
                RangeKind::Data => { prop_assert_eq!(got, &data[di][..]); di += 1; }
            }
        }
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), count in 0u32..5) {
        let _ = parse_range_table(count, &bytes, bytes.len() as u64 + 4, &layout());
        let _ = decode_control::<SenderMessage>(&bytes);
        let _ = decode_control::<ReceiverMessage>(&bytes);
        let mut r = FrameReader::new(Cursor::new(bytes));
        let mut mem = Mem::new(0);
        if let Ok(h) = r.read_header() {
            let _ = r.read_memory(&h, &layout(), &mut mem.sink());
        }
    }
}

//! Deterministic stand-in for the `migration_stream` cargo-fuzz target: a few
//! thousand seeded mutations of valid sender and receiver streams go through the
//! same harness (`fuzz/harness/migration_stream.rs`), which must never panic and
//! must end every bad input with a non-empty error. `FUZZ_STANDIN_ITERS` changes
//! the count. Crashes found by the real fuzzer are replayed in `regressions`.

#[path = "../../fuzz/harness/migration_stream.rs"]
mod harness;
#[path = "../../fuzz/harness/mutate.rs"]
mod mutate;

use migration::frame::{FrameWriter, MemoryRange};
use migration::protocol::{
    encode_preamble, FdRegion, Hello, MigrationMode, ReceiverMessage, SenderMessage, VersionRange,
    PROTOCOL_VERSION,
};

fn hello(mode: MigrationMode) -> Hello {
    Hello {
        versions: VersionRange::ours(),
        machine_type: vmm::config::MACHINE_TYPES[0].to_string(),
        memory: harness::layout(),
        vcpus: 1,
        mode,
        launcher_version: "0.1.0".into(),
    }
}

/// A copy-mode sender stream: Hello, memory frames in both regions (data and zero
/// ranges), two iterations, a state frame, Complete and Go. Flags byte first.
fn copy_stream(fix_crcs: bool) -> Vec<u8> {
    let mut w = FrameWriter::new(vec![u8::from(fix_crcs)]);
    w.write_preamble().unwrap();
    w.write_control(&SenderMessage::Hello(hello(MigrationMode::Copy)))
        .unwrap();
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    w.write_memory(
        &[
            MemoryRange::data(0, 4096),
            MemoryRange::zero(8192, 8192),
            MemoryRange::data(harness::HIGH, 4096),
        ],
        &[&page, &page],
    )
    .unwrap();
    w.write_control(&SenderMessage::IterationDone { iteration: 0 })
        .unwrap();
    w.write_memory(&[MemoryRange::data(4096, 8192)], &[&page, &page])
        .unwrap();
    w.write_control(&SenderMessage::IterationDone { iteration: 1 })
        .unwrap();
    w.write_state(b"opaque VmState bytes").unwrap();
    w.write_control(&SenderMessage::Complete).unwrap();
    w.write_control(&SenderMessage::Go).unwrap();
    w.into_inner()
}

/// A local-mode sender stream (MemoryFds, no memory frames).
fn local_stream() -> Vec<u8> {
    let mut w = FrameWriter::new(vec![3u8]);
    w.write_preamble().unwrap();
    w.write_control(&SenderMessage::Hello(hello(MigrationMode::Local)))
        .unwrap();
    let regions = harness::layout()
        .regions
        .iter()
        .map(|r| FdRegion {
            gpa: r.gpa,
            size: r.size,
            file_offset: 0,
        })
        .collect();
    w.write_control(&SenderMessage::MemoryFds { regions })
        .unwrap();
    w.write_state(&[0u8; 64]).unwrap();
    w.write_control(&SenderMessage::Complete).unwrap();
    w.write_control(&SenderMessage::Cancel {
        reason: "because".into(),
    })
    .unwrap();
    w.into_inner()
}

/// A receiver's answers, as the sender's return path reads them.
fn return_path() -> Vec<u8> {
    let mut w = FrameWriter::new(vec![1u8]);
    w.write_preamble().unwrap();
    w.write_control(&ReceiverMessage::Accept {
        version: PROTOCOL_VERSION,
    })
    .unwrap();
    w.write_control(&ReceiverMessage::Ready).unwrap();
    w.write_control(&ReceiverMessage::Started {
        resumed_realtime_ns: 1,
        go_to_resume_us: 2,
    })
    .unwrap();
    w.into_inner()
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        copy_stream(true),
        copy_stream(false),
        local_stream(),
        return_path(),
    ]
}

/// With `FUZZ_WRITE_SEEDS` set, write the seeds to `fuzz/corpus/NAME/` for cargo-fuzz.
fn write_seeds(name: &str, seeds: &[Vec<u8>]) {
    if std::env::var_os("FUZZ_WRITE_SEEDS").is_none() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s).expect("seed");
    }
}

#[test]
fn seeds_parse() {
    write_seeds("migration_stream", &seeds());
    assert_eq!(harness::run(&copy_stream(false)), Ok(8));
    assert_eq!(harness::run(&copy_stream(true)), Ok(8));
    assert_eq!(harness::run(&local_stream()), Ok(5));
    assert_eq!(harness::run(&return_path()), Ok(3));
}

#[test]
fn mutated_streams_fail_cleanly() {
    let iters = mutate::iterations(4000);
    let (ok, err) = mutate::run_mutants(
        "migration_stream",
        &seeds(),
        iters,
        0x5eed_0001,
        1 << 20,
        harness::run,
    );
    eprintln!("migration_stream stand-in: {iters} mutants, {ok} parsed, {err} refused");
    assert!(
        err > iters / 4,
        "most mutants should be refused ({ok} parsed)"
    );
}

/// Inputs the fuzzer (or the stand-in) once found interesting, replayed for ever.
#[test]
fn regressions() {
    // A preamble of another version, then a header announcing 4 GiB: refused on the
    // header alone (no allocation).
    let mut v = vec![0u8];
    v.extend_from_slice(&encode_preamble(PROTOCOL_VERSION + 1));
    v.extend_from_slice(b"LVMF\x02\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00\x00");
    let e = harness::run(&v).unwrap_err();
    assert!(e.contains("exceeds the bound"), "{e}");
    // A memory frame whose range count claims more entries than its payload holds.
    let mut v = vec![1u8];
    v.extend_from_slice(&encode_preamble(PROTOCOL_VERSION));
    v.extend_from_slice(b"LVMF\x02\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00\x00");
    v.extend_from_slice(&u32::MAX.to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    let e = harness::run(&v).unwrap_err();
    assert!(e.contains("invalid memory frame"), "{e}");
    // A control frame that decodes as the receiver's `Refuse` with an empty `Other`
    // reason, which used to display as an empty message (cargo-fuzz, 2026-12-06).
    let v = b"\x01LVMIGR\x00\x00\x01\x00\x00\x00LVMF\x01\x00\x00\x00\x10\x00\x00\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00!";
    let _ = harness::run(v);
    let empty = migration::protocol::RefuseReason::Other(String::new());
    assert!(empty.to_string().contains("no reason"), "{empty}");
}

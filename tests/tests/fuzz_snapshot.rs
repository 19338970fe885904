//! Deterministic stand-in for the `snapshot` cargo-fuzz target: a real snapshot of
//! the `pattern` guest (taken through the API), cut down to its state record, one
//! memory record and the end record, is mutated a few thousand times (seeded PRNG)
//! and loaded through the same harness (`fuzz/harness/snapshot.rs`): the loader must
//! never panic and must end every bad file with a non-empty error.
//! `FUZZ_STANDIN_ITERS` changes the count; `FUZZ_WRITE_SEEDS=1` also writes the seed
//! to `fuzz/corpus/snapshot/` for the real fuzzer.

#[path = "../../fuzz/harness/snapshot.rs"]
mod harness;
#[path = "../../fuzz/harness/mutate.rs"]
mod mutate;

use integration_tests::{api, guests, last_pass, path_str, wait_console_until, Launcher, TempDir};

/// A small valid snapshot: header, the state record, the first memory record cut
/// to one page, and an end record that counts them.
fn small_snapshot() -> Vec<u8> {
    let dir = TempDir::new("fuzz-snap");
    let sock = dir.join("api.sock");
    // The kernel is given relative to the launcher's directory, so that the state (and
    // the committed seed) records `pattern.elf`, not a path of the machine that made it.
    std::fs::copy(guests::pattern_path(), dir.join("pattern.elf")).expect("copy pattern.elf");
    let mut l = Launcher::run_in(
        Some(dir.path()),
        &[
            "--kernel",
            "pattern.elf",
            "--memory",
            "32Mi",
            "--cmdline",
            "mib=1 every=50",
        ],
        &dir.join("console.log"),
        Some(&sock),
    );
    l.wait_api();
    wait_console_until(&mut l, "a pass", |c| last_pass(c) >= 50);
    let file = dir.join("vm.snap");
    let body = format!(r#"{{"path": "{}", "stop": true}}"#, path_str(&file));
    let (status, v) = api(&sock, "PUT", "/v1/snapshot", Some(&body));
    assert_eq!(status, 200, "snapshot: {v}");
    let full = std::fs::read(&file).expect("snapshot file");
    let _ = l.wait();

    let rec = |off: usize| -> (u32, usize) {
        let kind = u32::from_le_bytes(full[off..off + 4].try_into().unwrap());
        let len = u64::from_le_bytes(full[off + 4..off + 12].try_into().unwrap()) as usize;
        (kind, len)
    };
    let mut out = full[..harness::HEADER].to_vec();
    let mut off = harness::HEADER;
    let (kind, len) = rec(off);
    assert_eq!(kind, 1, "the state record comes first");
    out.extend_from_slice(&full[off..off + harness::RECORD + len]);
    off += harness::RECORD + len;
    let (kind, _) = rec(off);
    assert_eq!(kind, 2, "then memory");
    let page = &full[off + harness::RECORD..off + harness::RECORD + 8 + 4096];
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&(page.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(page).to_le_bytes());
    out.extend_from_slice(page);
    let mut end = 3u64.to_le_bytes().to_vec();
    end.extend_from_slice(&4096u64.to_le_bytes());
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&16u64.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&end).to_le_bytes());
    out.extend_from_slice(&end);
    out
}

#[test]
fn mutated_snapshots_fail_cleanly() {
    let snap = small_snapshot();
    let seeds: Vec<Vec<u8>> = [0u8, 1]
        .iter()
        .map(|&f| {
            let mut v = vec![f];
            v.extend_from_slice(&snap);
            v
        })
        .collect();
    for s in &seeds {
        assert_eq!(harness::run(s), Ok(32 << 20), "the seed must load");
    }
    if std::env::var_os("FUZZ_WRITE_SEEDS").is_some() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/snapshot");
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join("seed-small"), &seeds[1]).expect("seed");
    }
    regression_huge_memory(&snap);
    let iters = mutate::iterations(3000);
    let (ok, err) = mutate::run_mutants(
        "snapshot",
        &seeds,
        iters,
        0x5eed_0002,
        1 << 20,
        harness::run,
    );
    eprintln!("snapshot stand-in: {iters} mutants, {ok} loaded, {err} refused");
    assert!(err > iters / 4, "{ok} loaded, {err} refused");
}

/// Found by this stand-in: a state claiming an absurd memory size (CRCs recomputed,
/// as a crafted file would) made the loader allocate a dirty bitmap for it and abort
/// the process. It is now refused before anything is allocated.
fn regression_huge_memory(snap: &[u8]) {
    let len = u64::from_le_bytes(
        snap[harness::HEADER + 4..harness::HEADER + 12]
            .try_into()
            .unwrap(),
    );
    let state = harness::HEADER + harness::RECORD..harness::HEADER + harness::RECORD + len as usize;
    let needle = (32u64 << 20).to_le_bytes();
    let at = snap[state.clone()]
        .windows(8)
        .position(|w| w == needle)
        .expect("memory_bytes in the state")
        + state.start;
    for claim in [!0xfffu64, 1 << 50] {
        let mut v = vec![1u8];
        v.extend_from_slice(snap);
        v[1 + at..1 + at + 8].copy_from_slice(&claim.to_le_bytes());
        let e = harness::run(&v).unwrap_err();
        assert!(e.contains("more than this host has"), "{e}");
    }
}

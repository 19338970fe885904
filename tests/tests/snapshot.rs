//! Snapshots: `launcher snapshot` of a running `pattern` guest continues in a new
//! process exactly where it stopped; damaged, truncated or foreign snapshot files are
//! refused with one clear line; only the pages in use are written.
//!
//! The file format is documented at the top of `vmm/src/snapshot.rs`:
//! a 16-byte header (magic, format version u32 at offset 8, flags), then records of
//! `kind u32 | payload length u64 | CRC32 u32 | payload` (1 = state, 2 = memory, 3 = end).

use std::path::{Path, PathBuf};

use integration_tests::{
    api, guests, launcher_cmd, pattern_boots, pattern_passes, wait_console_until, Launcher, TempDir,
};

/// The `pattern` guest prints a `pass=` line every this many passes.
const EVERY: u64 = 20;

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Boot `pattern` with an API socket; returns once the API answers and the guest has
/// printed at least `passes` `pass=` lines.
fn boot_pattern(dir: &TempDir, log: &str, memory: &str, mib: u32, min_passes: usize) -> Launcher {
    let serial = dir.join(log);
    let sock = dir.join(&format!("{log}.sock"));
    let cmdline = format!("mib={mib} every={EVERY}");
    let mut l = Launcher::run(
        &[
            "--kernel",
            path(guests::pattern_path()),
            "--memory",
            memory,
            "--cmdline",
            &cmdline,
        ],
        &serial,
        Some(&sock),
    );
    l.wait_api();
    wait_console_until(&mut l, &format!("{min_passes} pass= lines"), |c| {
        passes(c).len() >= min_passes
    });
    l
}

/// The `pass=` numbers in the complete lines of `console` (a running guest may be in the
/// middle of printing the last one).
fn passes(console: &str) -> Vec<u64> {
    pattern_passes(complete(console))
}

/// `console` up to and including its last newline.
fn complete(console: &str) -> &str {
    console.rfind('\n').map_or("", |i| &console[..=i])
}

/// `launcher snapshot --api-socket S FILE [--stop]`, asserting it succeeds.
fn snapshot(l: &Launcher, file: &Path, stop: bool) {
    let sock = l.api.as_ref().expect("API socket");
    let mut args = vec!["snapshot", "--api-socket", path(sock), path(file)];
    if stop {
        args.push("--stop");
    }
    let out = launcher_cmd(&args);
    assert!(
        out.status.success(),
        "launcher {args:?} failed ({}): {}\nVM stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        l.stderr()
    );
}

/// Check the `pattern` console invariants over `console` (which may hold one boot and
/// any number of continuations): every `pass=N` line comes after exactly N `B` markers
/// since the banner, the numbers go up by `EVERY`, and no page was stale.
fn assert_pattern_consistent(console: &str) {
    assert!(!console.contains("STALE"), "stale page:\n{console}");
    integration_tests::assert_pass_markers(console, EVERY);
}

/// Restore `file` into a new launcher with its console appended to `serial`.
fn restore(file: &Path, serial: &Path, sock: &Path) -> Launcher {
    let mut l = Launcher::run(&["--restore", path(file)], serial, Some(sock));
    l.wait_api();
    l
}

/// Stop a launcher through its API and check it exits 0.
fn shutdown(l: &mut Launcher) {
    let sock = l.api.clone().expect("API socket");
    let (status, body) = api(&sock, "PUT", "/v1/shutdown", None);
    assert_eq!(status, 200, "shutdown refused: {body}");
    let st = l.wait();
    assert_eq!(st.code(), Some(0), "stderr: {}", l.stderr());
}

#[test]
fn snapshot_with_stop_continues_in_a_new_process() {
    let dir = TempDir::new("snap-stop");
    let file = dir.join("vm.snap");
    let mut first = boot_pattern(&dir, "console.log", "64Mi", 8, 3);
    snapshot(&first, &file, true);
    let status = first.wait();
    assert_eq!(
        status.code(),
        Some(0),
        "the snapshotted launcher should exit 0 after --stop; stderr: {}",
        first.stderr()
    );
    let before = first.console();
    let last_before = *passes(&before).last().expect("passes before");
    assert_eq!(pattern_boots(&before), 1, "{before}");

    // Same console file: the restored guest's output is appended to the old one.
    let sock2 = dir.join("restored.sock");
    let mut second = restore(&file, &first.serial, &sock2);
    let all = wait_console_until(&mut second, "three passes after the restore", |c| {
        c.len() >= before.len()
            && passes(&c[before.len()..])
                .iter()
                .filter(|&&p| p > last_before)
                .count()
                >= 3
    });
    let after = &all[before.len()..];
    let restored = passes(after);
    assert!(
        restored.iter().all(|&p| p > last_before),
        "restored passes {restored:?} do not all follow {last_before}:\n{all}"
    );
    // The snapshot may cut a `pass=` line in two; across the whole log the pass
    // numbers must still run on without a gap or a repeat.
    let every_pass = passes(complete(&all));
    let expected: Vec<u64> = (1..=every_pass.len() as u64).map(|i| i * EVERY).collect();
    assert_eq!(
        every_pass, expected,
        "pass numbers skip or repeat across the restore (last before: {last_before}):\n{all}"
    );
    assert_eq!(
        pattern_boots(after),
        0,
        "the restored guest booted again instead of continuing:\n{all}"
    );
    shutdown(&mut second);
    assert_pattern_consistent(complete(&second.console()));
}

#[test]
fn snapshot_without_stop_keeps_the_vm_running_and_restores_too() {
    let dir = TempDir::new("snap-live");
    let file = dir.join("vm.snap");
    let mut first = boot_pattern(&dir, "console.log", "64Mi", 8, 2);
    let seen_before = *passes(&first.console()).last().expect("passes");
    snapshot(&first, &file, false);
    assert!(
        first.alive(),
        "the VM stopped after a snapshot without --stop"
    );
    let at_snapshot = *passes(&first.console()).last().expect("passes");
    wait_console_until(&mut first, "more passes after the snapshot", |c| {
        passes(c)
            .last()
            .is_some_and(|&p| p >= at_snapshot + 2 * EVERY)
    });
    shutdown(&mut first);
    assert_pattern_consistent(complete(&first.console()));

    let serial2 = dir.join("restored.log");
    let mut second = restore(&file, &serial2, &dir.join("restored.sock"));
    let console = wait_console_until(&mut second, "two passes after the restore", |c| {
        passes(c).len() >= 2
    });
    let restored = passes(&console);
    assert!(
        restored[0] > seen_before,
        "restored guest printed pass={} but pass={seen_before} had been printed before the snapshot:\n{console}",
        restored[0]
    );
    assert!(
        restored.windows(2).all(|w| w[1] == w[0] + EVERY),
        "{console}"
    );
    assert_eq!(pattern_boots(&console), 0, "booted again:\n{console}");
    assert!(!console.contains("STALE"), "{console}");
    shutdown(&mut second);
}

#[test]
fn snapshot_of_a_mostly_idle_vm_holds_only_the_pages_in_use() {
    let dir = TempDir::new("snap-small");
    let file = dir.join("vm.snap");
    let memory: u64 = 512 << 20;
    let mut l = boot_pattern(&dir, "console.log", "512Mi", 1, 1);
    snapshot(&l, &file, true);
    assert_eq!(l.wait().code(), Some(0), "stderr: {}", l.stderr());
    let size = std::fs::metadata(&file).expect("snapshot file").len();
    // The guest touches its image, page tables and a 1 MiB region: a few MiB at most.
    assert!(
        size < memory / 32,
        "snapshot of a 512 MiB guest using ~1 MiB is {size} bytes; only pages in use should be written"
    );
    // And it is still a complete snapshot.
    let mut r = restore(&file, &dir.join("restored.log"), &dir.join("r.sock"));
    let console = wait_console_until(&mut r, "a pass after the restore", |c| {
        !passes(c).is_empty()
    });
    assert!(!console.contains("STALE"), "{console}");
    shutdown(&mut r);
}

// ---------------------------------------------------------------------------------------
// Refusals.

/// One record of a snapshot file.
#[derive(Clone, Copy, Debug)]
struct Record {
    kind: u32,
    /// Offset of the record header.
    at: usize,
    /// Offset of the payload.
    payload: usize,
    /// Payload length.
    len: usize,
}

const HEADER: usize = 16;
const RECORD_HEADER: usize = 16;

fn records(bytes: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut at = HEADER;
    while at + RECORD_HEADER <= bytes.len() {
        let kind = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let len = u64::from_le_bytes(bytes[at + 4..at + 12].try_into().unwrap()) as usize;
        out.push(Record {
            kind,
            at,
            payload: at + RECORD_HEADER,
            len,
        });
        at += RECORD_HEADER + len;
    }
    assert_eq!(at, bytes.len(), "snapshot records do not tile the file");
    out
}

/// CRC-32 (IEEE, reflected), as `crc32fast` computes it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A stopped, valid snapshot of a small `pattern` VM, and its bytes.
fn good_snapshot(dir: &TempDir) -> (PathBuf, Vec<u8>) {
    let file = dir.join("good.snap");
    let mut l = boot_pattern(dir, "source.log", "32Mi", 1, 1);
    snapshot(&l, &file, true);
    assert_eq!(l.wait().code(), Some(0), "stderr: {}", l.stderr());
    let bytes = std::fs::read(&file).expect("read snapshot");
    let recs = records(&bytes);
    assert_eq!(recs.first().map(|r| r.kind), Some(1), "state record first");
    assert_eq!(recs.last().map(|r| r.kind), Some(3), "end record last");
    assert!(
        recs.iter().any(|r| r.kind == 2),
        "no memory records: {recs:?}"
    );
    (file, bytes)
}

/// `launcher run --restore file` must fail with one `launcher: ` line mentioning every
/// word in `words`, without a panic.
fn assert_restore_refused(dir: &TempDir, name: &str, file: &Path, words: &[&str]) {
    let serial = dir.join(&format!("{name}.log"));
    let mut l = Launcher::run(&["--restore", path(file)], &serial, None);
    let status = l.wait();
    let stderr = l.stderr();
    assert!(
        !status.success() && status.code().is_some(),
        "{name}: restore was not refused ({status}); stderr:\n{stderr}\nconsole:\n{}",
        l.console()
    );
    assert!(!stderr.contains("panicked"), "{name}: panic:\n{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("launcher: "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{name}: want one error line, stderr:\n{stderr}"
    );
    let lower = lines[0].to_lowercase();
    for w in words {
        assert!(
            lower.contains(w),
            "{name}: error does not mention {w:?}: {}",
            lines[0]
        );
    }
}

fn write_variant(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(&format!("{name}.snap"));
    std::fs::write(&p, bytes).expect("write variant");
    p
}

#[test]
fn truncated_snapshots_are_refused() {
    let dir = TempDir::new("snap-trunc");
    let (_, good) = good_snapshot(&dir);
    let recs = records(&good);
    let state = recs[0];
    let mem = recs.iter().find(|r| r.kind == 2).copied().unwrap();
    let end = *recs.last().unwrap();
    let cuts = [
        ("empty", 0),
        ("in-magic", 5),
        ("after-header", HEADER),
        ("in-state-record-header", state.at + 7),
        ("in-state-payload", state.payload + state.len / 2),
        ("after-state", mem.at),
        ("in-memory-payload", mem.payload + mem.len / 2),
        ("before-end-record", end.at),
        ("last-byte-missing", good.len() - 1),
    ];
    for (name, cut) in cuts {
        let f = write_variant(&dir, name, &good[..cut]);
        assert_restore_refused(&dir, name, &f, &["snapshot", "truncated"]);
    }
}

#[test]
fn flipped_bits_are_refused() {
    let dir = TempDir::new("snap-flip");
    let (_, good) = good_snapshot(&dir);
    let recs = records(&good);
    let state = recs[0];
    let last_mem = recs.iter().rev().find(|r| r.kind == 2).copied().unwrap();
    let first_mem = recs.iter().find(|r| r.kind == 2).copied().unwrap();
    let end = *recs.last().unwrap();
    let flips = [
        ("state-just-after-header", state.payload + 3),
        ("state-middle", state.payload + state.len / 2),
        ("first-memory-page", first_mem.payload + 8 + 100),
        ("last-memory-page-end", last_mem.payload + last_mem.len - 1),
        ("memory-address", last_mem.payload + 1),
        ("end-record", end.payload + 2),
        ("last-byte", good.len() - 1),
    ];
    for (name, at) in flips {
        let mut bad = good.clone();
        bad[at] ^= 0x04;
        let f = write_variant(&dir, name, &bad);
        assert_restore_refused(&dir, name, &f, &["snapshot", "corrupt"]);
    }
}

#[test]
fn newer_and_older_formats_are_refused() {
    let dir = TempDir::new("snap-version");
    let (_, good) = good_snapshot(&dir);
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    let f = write_variant(&dir, "v99", &newer);
    assert_restore_refused(&dir, "v99", &f, &["snapshot", "newer", "99"]);
    let mut older = good;
    older[8..12].copy_from_slice(&0u32.to_le_bytes());
    let f = write_variant(&dir, "v0", &older);
    assert_restore_refused(&dir, "v0", &f, &["snapshot", "older"]);
}

#[test]
fn unknown_machine_type_is_refused() {
    let dir = TempDir::new("snap-machine");
    let (_, good) = good_snapshot(&dir);
    let state = records(&good)[0];
    let mut bad = good.clone();
    let payload = &mut bad[state.payload..state.payload + state.len];
    let (from, to) = (b"q35-1.0", b"q35-9.9");
    let mut found = 0;
    for i in 0..payload.len() - from.len() {
        if &payload[i..i + from.len()] == from {
            payload[i..i + to.len()].copy_from_slice(to);
            found += 1;
        }
    }
    assert!(found > 0, "the state record does not name q35-1.0");
    let crc = crc32(&bad[state.payload..state.payload + state.len]);
    assert_eq!(
        crc32(&good[state.payload..state.payload + state.len]).to_le_bytes(),
        good[state.at + 12..state.at + 16],
        "test CRC-32 disagrees with the file's"
    );
    bad[state.at + 12..state.at + 16].copy_from_slice(&crc.to_le_bytes());
    let f = write_variant(&dir, "q35-9.9", &bad);
    assert_restore_refused(&dir, "q35-9.9", &f, &["machine type", "q35-9.9"]);
}

#[test]
fn garbage_and_missing_files_are_refused() {
    let dir = TempDir::new("snap-garbage");
    let mut garbage = Vec::with_capacity(1 << 20);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..(1 << 17) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        garbage.extend_from_slice(&x.to_le_bytes());
    }
    let f = write_variant(&dir, "garbage", &garbage);
    assert_restore_refused(&dir, "garbage", &f, &["not a snapshot"]);
    let f = write_variant(&dir, "text", b"hello, I am a text file\n");
    assert_restore_refused(&dir, "text", &f, &["not a snapshot"]);
    let missing = dir.join("no-such.snap");
    assert_restore_refused(&dir, "missing", &missing, &["snapshot", "no-such.snap"]);
}

#[test]
fn snapshot_without_a_running_launcher_is_refused() {
    let dir = TempDir::new("snap-noapi");
    let out = launcher_cmd(&[
        "snapshot",
        "--api-socket",
        path(&dir.join("nobody.sock")),
        path(&dir.join("x.snap")),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with("launcher: ")),
        "{stderr}"
    );
}

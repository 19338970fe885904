//! Data disks (virtio-blk on a raw file) through the real binaries, with the `blkjournal`
//! guest: it verifies the journal on its disk at boot (`found N records, last seq=N`, or
//! `journal corrupt` and exit 3), then appends one flushed record per interval and prints
//! `J<seq>` after each flush.
//!
//! What is checked after every kind of update (power-off and fresh boot, copy and local
//! migration, snapshot and restore): the `J` numbers continue with no gap or repeat, and
//! the disk image verifies (`test_guests::blkjournal_verify`) up to the last flushed
//! record. And one owner: while a launcher runs the VM (also during a migration's
//! pre-copy) any other launcher on the same disk is refused; the lock moves at the
//! switch-over. Bad input: missing file, size not a multiple of 512, a locked disk, a
//! read-only disk written by the guest, malformed `--disk` options.
//!
//! Waits have safety deadlines only; no test asserts how long anything took.

use std::path::{Path, PathBuf};

use integration_tests::{
    api, guests, kill_hard, launcher_cmd, migrate, path_str, shutdown, wait_console_until,
    Launcher, MigrateJob, TempDir,
};
use integration_tests::{journal_seqs, last_journal_seq};

const MEMORY: &str = "32Mi";
/// Extra `launcher run` arguments of every launcher started here (e.g. `--no-seccomp`
/// while debugging with strace).
const EXTRA: &[&str] = &[];

/// `args` followed by [`EXTRA`].
fn with_extra<'a>(args: &[&'a str]) -> Vec<&'a str> {
    args.iter().chain(EXTRA).copied().collect()
}

/// `launcher run --incoming URI` with an API socket, console appended to `serial`.
fn incoming(uri: &str, serial: &Path, api_sock: &Path) -> Launcher {
    let mut l = Launcher::run(&with_extra(&["--incoming", uri]), serial, Some(api_sock));
    l.wait_api();
    l
}
/// Disk size: 2048 records.
const DISK_BYTES: u64 = 1 << 20;

/// A zero-filled disk image of `bytes` bytes in `dir`.
fn disk(dir: &TempDir, name: &str, bytes: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(bytes))
        .expect("create disk image");
    p
}

fn disk_arg(p: &Path) -> String {
    format!("path={}", path_str(p))
}

/// Boot `blkjournal` on `disk` with `cmdline`, console in `<dir>/<log>`, an API socket
/// `<dir>/<log>.sock` when `with_api`.
fn boot(dir: &TempDir, disk: &Path, log: &str, cmdline: &str, with_api: bool) -> Launcher {
    let sock = dir.join(&format!("{log}.sock"));
    let d = disk_arg(disk);
    let mut l = Launcher::run(
        &with_extra(&[
            "--kernel",
            path_str(guests::blkjournal_path()),
            "--memory",
            MEMORY,
            "--cmdline",
            cmdline,
            "--disk",
            &d,
        ]),
        &dir.join(log),
        with_api.then_some(sock.as_path()),
    );
    if with_api {
        l.wait_api();
    }
    l
}

/// Wait until the guest printed a `J` number above `after`; returns it.
fn wait_seq_beyond(l: &mut Launcher, after: u32) -> u32 {
    let c = wait_console_until(l, &format!("a J marker beyond {after}"), |c| {
        last_journal_seq(c) > after
    });
    last_journal_seq(&c)
}

/// The `found ... last seq=N` values printed at each boot in `console`.
fn found(console: &str) -> Vec<u32> {
    console
        .lines()
        .filter_map(|l| l.split("last seq=").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Every `J` number follows the previous one (from `first`), nothing is corrupt, and the
/// disk holds exactly the records up to the last one printed (or one more: a record is
/// flushed before its marker is printed, and the VM may stop in between).
fn assert_journal(console: &str, disk: &Path, first: u32) {
    assert!(
        !console.contains("corrupt") && !console.contains("io error"),
        "console:\n{console}"
    );
    let s = journal_seqs(console);
    assert!(!s.is_empty(), "no J markers; console:\n{console}");
    for (i, n) in s.iter().enumerate() {
        assert_eq!(
            *n,
            first + i as u32,
            "J markers have a gap or a repeat at index {i}; console:\n{console}"
        );
    }
    let image = std::fs::read(disk).expect("read disk image");
    let on_disk = guests::blkjournal_verify(&image)
        .unwrap_or_else(|k| panic!("the disk image is corrupt at sector {k}"));
    let last = *s.last().unwrap_or(&0);
    assert!(
        on_disk == last || on_disk == last + 1,
        "disk holds {on_disk} records, the guest printed up to J{last}"
    );
}

/// A second launcher on `disk` must be refused, naming the disk and saying it is in use.
fn assert_refused(dir: &TempDir, disk: &Path) {
    let serial = dir.join("refused.log");
    let d = disk_arg(disk);
    let out = launcher_cmd(&with_extra(&[
        "run",
        "--kernel",
        path_str(guests::blkjournal_path()),
        "--memory",
        MEMORY,
        "--disk",
        &d,
        "--serial",
        path_str(&serial),
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("in use") && stderr.contains(path_str(disk)),
        "stderr: {stderr}"
    );
    assert!(
        !std::fs::read_to_string(&serial)
            .unwrap_or_default()
            .contains("booted"),
        "the refused launcher ran the guest"
    );
}

#[test]
fn journal_survives_power_off_and_a_fresh_boot() {
    let dir = TempDir::new("disk-reboot");
    let d = disk(&dir, "d.img", DISK_BYTES);
    let mut l = boot(&dir, &d, "one.log", "count=5 interval_ms=1", false);
    assert_eq!(l.wait().code(), Some(0), "stderr: {}", l.stderr());
    let c = l.console();
    assert!(c.contains("virtio msix=1 event_idx=1"), "{c}");
    assert_eq!(found(&c), vec![0]);
    assert!(c.contains("done seq=5"), "{c}");
    assert_journal(&c, &d, 1);

    // The same journal through INTx and without EVENT_IDX (guests that enable neither).
    let legacy = "count=7 interval_ms=1 msix=0 event_idx=0";
    let mut l = boot(&dir, &d, "two.log", legacy, false);
    assert_eq!(l.wait().code(), Some(0), "stderr: {}", l.stderr());
    let c = l.console();
    assert!(c.contains("virtio msix=0 event_idx=0"), "{c}");
    assert_eq!(found(&c), vec![5]);
    assert!(c.contains("done seq=12"), "{c}");
    assert_journal(&c, &d, 6);
}

#[test]
fn copy_and_local_migration_continue_the_journal_with_one_owner() {
    migrate_twice_while_journaling("disk-migrate", "interval_ms=20");
}

/// The guest appends records back to back (no pause between requests), so the pause
/// of each migration finds a request being served by the disk's worker thread: every
/// record the guest saw acknowledged must be on the disk afterwards, none torn or twice.
#[test]
fn a_disk_written_back_to_back_keeps_every_acknowledged_record_across_migrations() {
    migrate_twice_while_journaling("disk-migrate-busy", "interval_ms=0");
}

/// Boot `blkjournal` with `cmdline`, migrate it by copy then locally while it writes,
/// and check the journal.
fn migrate_twice_while_journaling(name: &str, cmdline: &str) {
    let dir = TempDir::new(name);
    let d = disk(&dir, "d.img", DISK_BYTES);
    let mut src = boot(&dir, &d, "console.log", cmdline, true);
    wait_seq_beyond(&mut src, 3);
    assert_refused(&dir, &d);

    for (n, mode) in [(1, &[][..]), (2, &["--local"][..])] {
        let uri = format!("unix:{}", path_str(&dir.join(&format!("mig-{n}.sock"))));
        let mut dst = incoming(
            &uri,
            &dir.join("console.log"),
            &dir.join(&format!("dst-{n}.sock")),
        );
        // The destination opened nothing yet; the source still owns the disk.
        assert_refused(&dir, &d);
        let before = last_journal_seq(&src.console());
        let out = migrate(src.api.as_deref().expect("api"), &uri, mode, dir.path());
        assert!(
            out.status.success(),
            "migrate {mode:?} failed: {}\n{}",
            out.report,
            out.stderr
        );
        assert_eq!(out.str("status"), "completed", "{}", out.report);
        assert_eq!(src.wait().code(), Some(64), "stderr: {}", src.stderr());
        // The destination owns the disk now and keeps writing after the source's last record.
        wait_seq_beyond(&mut dst, before + 3);
        assert_refused(&dir, &d);
        src = dst;
    }
    shutdown(&mut src);
    let c = src.console();
    assert!(c.contains("virtio msix=1 event_idx=1"), "{c}");
    assert_eq!(found(&c), vec![0], "the guest booted more than once:\n{c}");
    assert_journal(&c, &d, 1);
}

#[test]
fn source_keeps_the_disk_when_the_destination_dies_in_precopy() {
    let dir = TempDir::new("disk-migrate-fail");
    let d = disk(&dir, "d.img", DISK_BYTES);
    let mut src = boot(&dir, &d, "console.log", "interval_ms=20", true);
    wait_seq_beyond(&mut src, 2);
    let uri = format!("unix:{}", path_str(&dir.join("mig.sock")));
    let mut dst = incoming(&uri, &dir.join("console.log"), &dir.join("dst.sock"));
    // Never converges: a tiny bandwidth and an unreachable downtime target.
    let mut job = MigrateJob::start(
        src.api.as_deref().expect("api"),
        &uri,
        integration_tests::CAPPED,
        dir.path(),
    );
    let api_sock = src.api.clone().expect("api");
    let deadline = std::time::Instant::now() + integration_tests::SAFETY;
    loop {
        let (_, p) = api(&api_sock, "GET", "/v1/migrate", None);
        if p.get("iteration").and_then(|v| v.as_u64()) >= Some(1) {
            break;
        }
        assert!(job.running(), "the migration ended early");
        assert!(
            std::time::Instant::now() < deadline,
            "pre-copy never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // During pre-copy the source still owns the disk.
    assert_refused(&dir, &d);
    kill_hard(&mut dst);
    let out = job.finish();
    assert_ne!(out.str("status"), "completed", "{}", out.report);
    // The source keeps writing, and still owns the disk.
    let now = last_journal_seq(&src.console());
    wait_seq_beyond(&mut src, now + 3);
    assert_refused(&dir, &d);
    shutdown(&mut src);
    assert_journal(&src.console(), &d, 1);
}

#[test]
fn snapshot_and_restore_continue_the_journal() {
    let dir = TempDir::new("disk-snapshot");
    let d = disk(&dir, "d.img", DISK_BYTES);
    let mut src = boot(&dir, &d, "console.log", "interval_ms=20", true);
    wait_seq_beyond(&mut src, 3);
    let sock = src.api.clone().expect("api");
    // A snapshot of a running VM cannot be restored while that VM owns the disk.
    let early = dir.join("early.snap");
    let out = launcher_cmd(&[
        "snapshot",
        "--api-socket",
        path_str(&sock),
        path_str(&early),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = launcher_cmd(&with_extra(&[
        "run",
        "--restore",
        path_str(&early),
        "--serial",
        path_str(&dir.join("early.log")),
    ]));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("in use"), "stderr: {stderr}");

    let snap = dir.join("vm.snap");
    let out = launcher_cmd(&[
        "snapshot",
        "--api-socket",
        path_str(&sock),
        path_str(&snap),
        "--stop",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(src.wait().code(), Some(0), "stderr: {}", src.stderr());
    let stopped_at = last_journal_seq(&src.console());

    let rsock = dir.join("restored.sock");
    let mut r = Launcher::run(
        &with_extra(&["--restore", path_str(&snap)]),
        &dir.join("console.log"),
        Some(&rsock),
    );
    r.wait_api();
    wait_seq_beyond(&mut r, stopped_at + 3);
    assert_refused(&dir, &d);
    shutdown(&mut r);
    let c = r.console();
    assert_eq!(found(&c), vec![0], "the guest booted more than once:\n{c}");
    assert_journal(&c, &d, 1);
}

#[test]
fn bad_disks_are_refused_with_a_clear_message() {
    let dir = TempDir::new("disk-bad");
    let odd = disk(&dir, "odd.img", 1000);
    let empty = disk(&dir, "empty.img", 0);
    let missing = dir.join("missing.img");
    let good = disk(&dir, "good.img", 4096);
    let cases: Vec<(String, &str)> = vec![
        (disk_arg(&missing), "No such file"),
        (disk_arg(&odd), "multiple of 512"),
        (disk_arg(&empty), "multiple of 512"),
        (dir.path().display().to_string(), "key=value"),
        (format!("{},cache=none", disk_arg(&good)), "unknown"),
        (format!("{},readonly=maybe", disk_arg(&good)), "on or off"),
        ("readonly=on".to_string(), "path=FILE is required"),
    ];
    for (arg, want) in cases {
        let out = launcher_cmd(&with_extra(&[
            "run",
            "--kernel",
            path_str(guests::blkjournal_path()),
            "--memory",
            MEMORY,
            "--disk",
            &arg,
            "--serial",
            path_str(&dir.join("bad.log")),
        ]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "--disk {arg}: {stderr}");
        assert!(stderr.contains(want), "--disk {arg}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "--disk {arg}: {stderr}");
    }
    // The same file twice in one VM.
    let g = disk_arg(&good);
    let out = launcher_cmd(&with_extra(&[
        "run",
        "--kernel",
        path_str(guests::blkjournal_path()),
        "--memory",
        MEMORY,
        "--disk",
        &g,
        "--disk",
        &g,
        "--serial",
        path_str(&dir.join("bad.log")),
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("given twice"), "{stderr}");
    assert_eq!(std::fs::metadata(&good).expect("good.img").len(), 4096);
}

#[test]
fn guest_without_a_disk_and_readonly_disk_writes() {
    let dir = TempDir::new("disk-guest-errors");
    // No --disk: the guest finds no device.
    let mut l = Launcher::run(
        &with_extra(&[
            "--kernel",
            path_str(guests::blkjournal_path()),
            "--memory",
            MEMORY,
        ]),
        &dir.join("none.log"),
        None,
    );
    assert_eq!(
        l.wait().code(),
        Some(i32::from(guests::BLKJOURNAL_EXIT_NO_DEVICE)),
        "{}",
        l.console()
    );
    assert!(l.console().contains("no virtio-blk device"));

    // A read-only disk: reads work (the journal verifies), the first write gets IOERR.
    let d = disk(&dir, "ro.img", DISK_BYTES);
    let mut w = boot(&dir, &d, "w.log", "count=4 interval_ms=1", false);
    assert_eq!(w.wait().code(), Some(0), "{}", w.stderr());
    let before = std::fs::read(&d).expect("image");
    let ro = format!("{},readonly=on", disk_arg(&d));
    let mut l = Launcher::run(
        &with_extra(&[
            "--kernel",
            path_str(guests::blkjournal_path()),
            "--memory",
            MEMORY,
            "--disk",
            &ro,
        ]),
        &dir.join("ro.log"),
        None,
    );
    assert_eq!(
        l.wait().code(),
        Some(i32::from(guests::BLKJOURNAL_EXIT_IO)),
        "{}",
        l.console()
    );
    let c = l.console();
    assert!(c.contains("found 4 records, last seq=4"), "{c}");
    assert!(c.contains("disk is read-only"), "{c}");
    assert!(c.contains("io error status=1 op=write sector=4"), "{c}");
    assert_eq!(std::fs::read(&d).expect("image"), before);
}

#[test]
fn corrupt_journal_is_reported_by_the_guest() {
    let dir = TempDir::new("disk-corrupt");
    let d = disk(&dir, "d.img", DISK_BYTES);
    let mut l = boot(&dir, &d, "w.log", "count=6 interval_ms=1", false);
    assert_eq!(l.wait().code(), Some(0), "{}", l.stderr());
    // Flip one payload byte of record 3 (sector 2).
    let mut image = std::fs::read(&d).expect("image");
    image[2 * 512 + 100] ^= 1;
    std::fs::write(&d, &image).expect("write image");
    assert_eq!(guests::blkjournal_verify(&image), Err(2));
    let mut l = boot(&dir, &d, "r.log", "count=1", false);
    assert_eq!(
        l.wait().code(),
        Some(i32::from(guests::BLKJOURNAL_EXIT_CORRUPT)),
        "{}",
        l.console()
    );
    assert!(l.console().contains("journal corrupt at sector 2"));
}

#[test]
fn destination_that_cannot_take_the_disk_after_go_aborts_and_the_source_resumes() {
    let dir = TempDir::new("disk-abort-after-go");
    // The VM's disk path is a symlink to a.img. Before the migration it is re-pointed to
    // b.img (same size), which another launcher owns: the destination loads the state,
    // says Ready, gets Go and then cannot take its disk, so it sends Abort.
    let a = disk(&dir, "a.img", DISK_BYTES);
    let b = disk(&dir, "b.img", DISK_BYTES);
    let link = dir.join("vm.img");
    std::os::unix::fs::symlink(&a, &link).expect("symlink");
    let mut src = boot(&dir, &link, "console.log", "interval_ms=20", true);
    wait_seq_beyond(&mut src, 2);
    let mut other = boot(&dir, &b, "other.log", "interval_ms=1000", false);
    other.wait_console("found 0 records");
    std::fs::remove_file(&link).expect("unlink");
    std::os::unix::fs::symlink(&b, &link).expect("symlink");

    let uri = format!("unix:{}", path_str(&dir.join("mig.sock")));
    let mut dst = incoming(&uri, &dir.join("dst.log"), &dir.join("dst.sock"));
    let out = migrate(
        src.api.as_deref().expect("api"),
        &uri,
        &["--local"],
        dir.path(),
    );
    assert_ne!(out.str("status"), "completed", "{}", out.report);
    let error = out
        .report
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or("");
    assert!(error.contains("in use"), "report: {}", out.report);
    assert_eq!(
        out.report.get("sourceRunning").and_then(|v| v.as_bool()),
        Some(true),
        "report: {}",
        out.report
    );
    assert_ne!(dst.wait().code(), Some(0), "stderr: {}", dst.stderr());
    // The source took a.img back and keeps writing it.
    let now = last_journal_seq(&src.console());
    wait_seq_beyond(&mut src, now + 3);
    assert_refused(&dir, &a);
    shutdown(&mut src);
    assert_journal(&src.console(), &a, 1);
    kill_hard(&mut other);
}

#[test]
fn two_disks_one_read_only() {
    let dir = TempDir::new("disk-two");
    let first = disk(&dir, "first.img", DISK_BYTES);
    let second = disk(&dir, "second.img", DISK_BYTES);
    let (f, s) = (
        disk_arg(&first),
        format!("{},readonly=off", disk_arg(&second)),
    );
    let mut l = Launcher::run(
        &with_extra(&[
            "--kernel",
            path_str(guests::blkjournal_path()),
            "--memory",
            MEMORY,
            "--cmdline",
            "disk=1 count=3 interval_ms=1",
            "--disk",
            &f,
            "--disk",
            &s,
        ]),
        &dir.join("two.log"),
        None,
    );
    assert_eq!(l.wait().code(), Some(0), "{}", l.stderr());
    assert!(l.console().contains("slot 5"), "{}", l.console());
    assert_journal(&l.console(), &second, 1);
    assert!(std::fs::read(&first)
        .expect("first")
        .iter()
        .all(|b| *b == 0));
    // The first disk read-only, the second one written.
    let f = format!("{},readonly=on", disk_arg(&first));
    let s = disk_arg(&second);
    let mut l = Launcher::run(
        &with_extra(&[
            "--kernel",
            path_str(guests::blkjournal_path()),
            "--memory",
            MEMORY,
            "--cmdline",
            "disk=1 count=2 interval_ms=1",
            "--disk",
            &f,
            "--disk",
            &s,
        ]),
        &dir.join("two-again.log"),
        None,
    );
    assert_eq!(l.wait().code(), Some(0), "{}", l.stderr());
    assert_eq!(found(&l.console()), vec![3]);
    assert_eq!(
        guests::blkjournal_verify(&std::fs::read(&second).expect("second")),
        Ok(5)
    );
}

/// The benchmark mode with large requests, several in flight (tests/guests/README.md,
/// "Benchmark keys"), checked end to end: with `verify=1` every 1 MiB write carries a
/// pattern derived from its block number and every read compares each word, so a request
/// served at the wrong offset, short, or from a stale buffer fails the guest (exit 3). The
/// sequential pass wraps around the 4 MiB disk, and the random pass reads only blocks it
/// wrote. The image is checked from the host as well. Not timed.
#[test]
fn large_requests_in_flight_are_written_and_read_back_intact() {
    let dir = TempDir::new("disk-large");
    let img = disk(&dir, "large.img", 4 << 20);
    let mut l = boot(
        &dir,
        &img,
        "console.log",
        "bench=all count=24 bs_kib=1024 depth=4 verify=1",
        false,
    );
    let status = l.wait();
    let console = l.console();
    assert_eq!(status.code(), Some(0), "console:\n{console}");
    assert!(
        console.contains("blkbench: bs_kib=1024 depth=4 verify=1"),
        "{console}"
    );
    for mode in ["seqr", "randr"] {
        assert!(
            console.contains(&format!("blkbench: {mode} verified 24 requests")),
            "{console}"
        );
    }
    // Every 1 MiB block of the image holds the guest's pattern: 8-byte little-endian words
    // ((block + 1) << 32 | word) ^ 0x5a5a5a5a00000000.
    let data = std::fs::read(&img).expect("read image");
    for (b, block) in data.chunks(1 << 20).enumerate() {
        for (w, word) in block.chunks(8).enumerate() {
            let want = (((b as u64 + 1) << 32) | w as u64) ^ 0x5a5a_5a5a_0000_0000;
            let got = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            assert_eq!(got, want, "block {b} word {w}");
        }
    }
}

//! Live migration between launcher processes, through the real binaries: the QEMU
//! migration-test recipe (forced non-convergence, then lifted limits), copy mode over a
//! Unix socket and over TCP, local handover of the memory fds, an idle guest, a 2-vCPU
//! guest, and a guest migrated back and forth ten times in each mode.
//!
//! Every test drives `launcher run --incoming`, `launcher migrate` and the API as a user
//! would, and checks what the guest itself sees: the `pattern` guest checks every page of
//! its region after every pass and prints `STALE ...` and exits 3 on the first page that
//! does not hold the value it wrote. Source and destination append to one console log,
//! so a lost, repeated or re-run pass shows as a broken `B`/`pass=` count or a second
//! boot banner (`assert_pattern_consistent`).
//!
//! Waits have safety deadlines only; no test asserts how long anything took.

use std::path::Path;

use integration_tests::{
    api, assert_pattern_consistent, guests, incoming, last_pass, migrate, path_str, vm_state,
    wait_console_until, wait_new_pass, wait_pass_beyond, wait_progress, Launcher, MigrateJob,
    MigrateOutcome, TempDir,
};

/// `pass=` line period of the `pattern` guests here.
const EVERY: u64 = 200;

/// Boot `pattern` (`mib` MiB region) with an API socket; returns once the guest has
/// printed at least two `pass=` lines.
fn boot_pattern(dir: &TempDir, memory: &str, mib: u32, vcpus: u8) -> Launcher {
    let serial = dir.join("console.log");
    let sock = dir.join("src.sock");
    let cmdline = format!("mib={mib} every={EVERY}");
    let vcpus = vcpus.to_string();
    let mut l = Launcher::run(
        &[
            "--kernel",
            path_str(guests::pattern_path()),
            "--memory",
            memory,
            "--vcpus",
            &vcpus,
            "--cmdline",
            &cmdline,
        ],
        &serial,
        Some(&sock),
    );
    l.wait_api();
    wait_console_until(&mut l, "two pass= lines", |c| last_pass(c) >= 2 * EVERY);
    l
}

/// A destination launcher `n` appending to the VM's console log, listening on
/// `unix:<dir>/mig-<n>.sock`; returns it and its URI.
fn destination(dir: &TempDir, n: usize) -> (Launcher, String) {
    let uri = format!("unix:{}", path_str(&dir.join(&format!("mig-{n}.sock"))));
    let l = incoming(
        &uri,
        &dir.join("console.log"),
        &dir.join(&format!("dst-{n}.sock")),
    );
    (l, uri)
}

fn api_of(l: &Launcher) -> &Path {
    l.api.as_deref().expect("API socket")
}

/// The checks every completed migration must pass.
fn assert_completed(out: &MigrateOutcome, mode: &str, memory_bytes: u64) {
    assert!(
        out.status.success(),
        "launcher migrate failed ({}): {}\nstderr: {}",
        out.status,
        out.report,
        out.stderr
    );
    assert_eq!(out.str("status"), "completed", "report: {}", out.report);
    assert_eq!(out.str("mode"), mode, "report: {}", out.report);
    assert_eq!(
        out.report.get("sourceRunning").and_then(|v| v.as_bool()),
        Some(false),
        "report: {}",
        out.report
    );
    assert!(out.report.get("error").is_none(), "report: {}", out.report);
    assert_eq!(
        out.u64("memoryBytes"),
        memory_bytes,
        "report: {}",
        out.report
    );
    assert!(out.u64("iterations") >= 1, "report: {}", out.report);
    for key in ["totalMs", "setupMs", "downtimeMs"] {
        let v = out.report.get(key).and_then(|v| v.as_f64());
        assert!(
            v.is_some_and(|v| v >= 0.0),
            "{key} missing or negative: {}",
            out.report
        );
    }
    if mode == "copy" {
        assert!(
            out.u64("transferredBytes") >= out.u64("normalPages") * 4096,
            "fewer bytes on the wire than the pages sent with data: {}",
            out.report
        );
        assert!(out.u64("normalPages") > 0, "report: {}", out.report);
    }
}

/// After a completed migration from `src` to `dst`: the source exited with 64 (the VM
/// runs elsewhere), and the destination runs the guest, which keeps making passes
/// beyond everything the source printed, with no stale page and no second boot.
fn assert_handed_over(src: &mut Launcher, dst: &mut Launcher) -> u64 {
    let st = src.wait();
    assert_eq!(
        st.code(),
        Some(64),
        "the source must exit 64 after a completed migration; stderr:\n{}",
        src.stderr()
    );
    // Everything the source printed is in the log now; the destination must go beyond.
    let before = last_pass(&dst.console());
    let after = wait_pass_beyond(dst, before);
    assert!(dst.alive(), "destination exited: {}", dst.stderr());
    assert_eq!(vm_state(api_of(dst)), "running");
    assert_pattern_consistent(&dst.console(), EVERY);
    after
}

/// Read `pattern`'s status block from a running VM: snapshot it through the API without
/// stopping it, and decode guest-physical 0x3000 from the snapshot's memory.
fn pattern_status(l: &Launcher, dir: &TempDir, name: &str) -> guests::PatternStatus {
    let file = dir.join(&format!("{name}.snap"));
    let body = format!(r#"{{"path": "{}", "stop": false}}"#, path_str(&file));
    let (status, v) = api(api_of(l), "PUT", "/v1/snapshot", Some(&body));
    assert_eq!(status, 200, "snapshot: {v}");
    let mut f = std::fs::File::open(&file).expect("open snapshot");
    let (_state, ram) = vmm::snapshot::read(&mut f).expect("read snapshot");
    let mut b = [0u8; guests::PATTERN_STATUS_SIZE];
    ram.read_into(guests::PATTERN_STATUS_ADDR, &mut b)
        .expect("status block is RAM");
    let _ = std::fs::remove_file(&file);
    guests::PatternStatus::from_bytes(&b).expect("status block magic missing")
}

fn shutdown(l: &mut Launcher) {
    integration_tests::shutdown(l);
}

/// QEMU's migration test, on `pattern`: a tiny bandwidth cap and a 1 ms downtime target
/// keep pre-copy from converging while the guest re-dirties its pages on every pass; then
/// the limits are lifted through the API and the migration completes. The guest's
/// status block (a marker written by the source at boot) is in the destination's
/// memory, and the destination guest keeps passing its own page checks.
#[test]
fn forced_non_convergence_then_lifted_limits_completes() {
    let dir = TempDir::new("mig-recipe");
    let mut src = boot_pattern(&dir, "128Mi", 1, 1);
    let marker = pattern_status(&src, &dir, "src");
    assert_eq!((marker.mib, marker.start_mib), (1, 4), "{marker:?}");
    let (mut dst, uri) = destination(&dir, 1);

    let mut job = MigrateJob::start(
        api_of(&src),
        &uri,
        &[
            "--max-bandwidth",
            "1000000",
            "--downtime-ms",
            "1",
            "--completion-timeout-per-gib",
            "0",
            "--progress-timeout",
            "0",
        ],
        dir.path(),
    );
    // At least three iterations, each finding pages dirty again: it cannot converge.
    let seen = wait_progress(api_of(&src), &mut job, "iteration 3", |p| {
        p.get("iteration").and_then(|v| v.as_u64()) >= Some(3)
    });
    for p in &seen {
        let remaining = p.get("remainingBytes").and_then(|v| v.as_u64());
        assert!(
            remaining.is_some_and(|r| r > 0),
            "pages must keep being re-dirtied: {seen:?}"
        );
    }
    let iters: Vec<u64> = seen
        .iter()
        .filter_map(|p| p.get("iteration").and_then(|v| v.as_u64()))
        .collect();
    assert!(iters.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        src.alive(),
        "source exited during pre-copy: {}",
        src.stderr()
    );
    assert_eq!(vm_state(api_of(&src)), "migrating");
    // The guest keeps running during pre-copy.
    let during = wait_new_pass(&mut src);

    // Lift the limits: unlimited bandwidth, QEMU's default 300 ms downtime target.
    let (status, v) = api(
        api_of(&src),
        "PUT",
        "/v1/migrate/limits",
        Some(r#"{"maxBandwidth": 0, "downtimeMs": 300}"#),
    );
    assert_eq!(status, 200, "limits: {v}");
    let out = job.finish();
    assert_completed(&out, "copy", 128 << 20);
    assert!(
        out.u64("iterations") > 3,
        "iterations must count the forced ones: {}",
        out.report
    );
    let after = assert_handed_over(&mut src, &mut dst);
    assert!(after > during);

    // The marker the source guest wrote at boot is in the destination's memory, and the
    // pass in progress there is past everything printed before the switch.
    let status = pattern_status(&dst, &dir, "dst");
    assert_eq!((status.mib, status.start_mib), (1, 4), "{status:?}");
    assert!(
        u64::from(status.pass) >= after,
        "{status:?} after pass {after}"
    );
    assert_pattern_consistent(&dst.console(), EVERY);
    shutdown(&mut dst);
}

/// Boot, migrate once with `extra` arguments to `uri` (or a fresh Unix destination),
/// check the handover; returns the report.
fn migrate_once(
    dir: &TempDir,
    src: &mut Launcher,
    dst: &mut Launcher,
    uri: &str,
    extra: &[&str],
) -> MigrateOutcome {
    let mem = src_memory(src);
    let out = migrate(api_of(src), uri, extra, dir.path());
    let mode = if extra.contains(&"--local") {
        "local"
    } else {
        "copy"
    };
    assert_completed(&out, mode, mem);
    assert_handed_over(src, dst);
    out
}

fn src_memory(l: &Launcher) -> u64 {
    let (status, v) = api(api_of(l), "GET", "/v1/status", None);
    assert_eq!(status, 200, "{v}");
    v.get("memoryBytes")
        .and_then(|m| m.as_u64())
        .expect("memoryBytes")
}

#[test]
fn copy_over_unix_socket() {
    let dir = TempDir::new("mig-unix");
    let mut src = boot_pattern(&dir, "256Mi", 32, 1);
    let (mut dst, uri) = destination(&dir, 1);
    let out = migrate_once(&dir, &mut src, &mut dst, &uri, &[]);
    // The 32 MiB region holds data on every page, so at least that much went over.
    assert!(out.u64("normalPages") >= 32 * 256, "report: {}", out.report);
    assert_eq!(vm_state(api_of(&dst)), "running");
    shutdown(&mut dst);
}

/// A guest that dirties memory faster than a capped link drains it only converges once
/// auto-converge throttles its vCPU; the report says how hard and what it cost the guest.
#[test]
fn auto_converge_throttles_a_guest_that_outruns_the_link() {
    let dir = TempDir::new("mig-autoconverge");
    let mut src = boot_pattern(&dir, "256Mi", 16, 1);
    let (mut dst, uri) = destination(&dir, 1);
    // 16 MiB rewritten on every pass against 16 MB/s: no pass fits the 300 ms target
    // until the guest is slowed down.
    let out = migrate_once(
        &dir,
        &mut src,
        &mut dst,
        &uri,
        &["--max-bandwidth", "16000000", "--auto-converge"],
    );
    assert!(
        out.u64("throttlePercent") >= 20,
        "auto-converge never throttled: {}",
        out.report
    );
    assert!(
        out.report["guestStallMs"].as_f64().unwrap_or(0.0) > 0.0,
        "a throttled guest lost no time? {}",
        out.report
    );
    assert!(out.u64("iterations") > 2, "report: {}", out.report);
    shutdown(&mut dst);
}

#[test]
fn copy_over_tcp() {
    let dir = TempDir::new("mig-tcp");
    let mut src = boot_pattern(&dir, "256Mi", 32, 1);
    let port = integration_tests::free_tcp_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    // Plain TCP must be asked for on both sides (TLS: tests/tests/tls.rs).
    let mut dst = Launcher::run(
        &["--incoming", &uri, "--insecure"],
        &dir.join("console.log"),
        Some(&dir.join("dst.sock")),
    );
    dst.wait_api();
    let out = migrate_once(&dir, &mut src, &mut dst, &uri, &["--insecure"]);
    assert!(out.u64("normalPages") >= 32 * 256, "report: {}", out.report);
    shutdown(&mut dst);
}

/// A guest whose memory is full of data (`fill=1`: every byte of its 96 MiB region,
/// checked again on the pages it keeps rewriting) moves without a stale page, with KVM's
/// dirty ring (the default where the host has it) and with the bitmap only; the report
/// says which tracking was used.
#[test]
fn filled_guest_with_the_dirty_ring_and_with_the_bitmap() {
    let ring = vmm::vstate::vm::dirty_ring_available();
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert!(
            ring,
            "CI hosts have KVM_CAP_DIRTY_LOG_RING (see PLATFORM.md)"
        );
    }
    for (n, (flag, want)) in [
        ("on", if ring { "ring" } else { "bitmap" }),
        ("off", "bitmap"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = TempDir::new(&format!("mig-filled-{flag}"));
        let serial = dir.join("console.log");
        let sock = dir.join("src.sock");
        let cmdline = format!("mib=96 fill=1 busy=32 every={EVERY}");
        let mut src = Launcher::run(
            &[
                "--kernel",
                path_str(guests::pattern_path()),
                "--memory",
                "256Mi",
                "--cmdline",
                &cmdline,
                "--dirty-ring",
                flag,
            ],
            &serial,
            Some(&sock),
        );
        src.wait_api();
        wait_console_until(&mut src, "two pass= lines", |c| last_pass(c) >= 2 * EVERY);
        assert!(src.console().contains("pattern: filled"));
        let (mut dst, uri) = destination(&dir, n + 1);
        let out = migrate_once(&dir, &mut src, &mut dst, &uri, &[]);
        assert_eq!(out.str("dirtyTracking"), want, "report: {}", out.report);
        assert!(out.u64("normalPages") >= 96 * 256, "report: {}", out.report);
        shutdown(&mut dst);
    }
}

/// Local mode hands the memfds over: almost nothing travels on the socket.
#[test]
fn local_handover_copies_no_memory() {
    let dir = TempDir::new("mig-local");
    let mut src = boot_pattern(&dir, "256Mi", 32, 1);
    let (mut dst, uri) = destination(&dir, 1);
    let out = migrate_once(&dir, &mut src, &mut dst, &uri, &["--local"]);
    assert_eq!(out.u64("normalPages"), 0, "report: {}", out.report);
    assert!(
        out.u64("transferredBytes") < out.u64("memoryBytes") / 256,
        "local mode must not copy guest memory: {}",
        out.report
    );
    shutdown(&mut dst);
}

/// Local mode over TCP is refused before anything happens; the source keeps running.
#[test]
fn local_mode_over_tcp_is_refused() {
    let dir = TempDir::new("mig-local-tcp");
    let mut src = boot_pattern(&dir, "64Mi", 1, 1);
    let port = integration_tests::free_tcp_port();
    let out = migrate(
        api_of(&src),
        &format!("tcp:127.0.0.1:{port}"),
        &["--local"],
        dir.path(),
    );
    assert!(!out.status.success(), "report: {}", out.report);
    assert_ne!(out.str("status"), "completed");
    assert!(
        format!("{}{}", out.report, out.stderr).contains("unix"),
        "the refusal should name the unix: form: {}\n{}",
        out.report,
        out.stderr
    );
    wait_new_pass(&mut src);
    assert_eq!(vm_state(api_of(&src)), "running");
    shutdown(&mut src);
}

/// An idle guest (the `timer` guest halted between interrupts, counting LAPIC and PIT
/// ticks): almost all of its memory is zero and stays off the wire. Its interrupt
/// sources must survive the move: it reaches its counts on the destination and exits 0.
#[test]
fn idle_guest_sends_mostly_zero_pages() {
    let dir = TempDir::new("mig-idle");
    let serial = dir.join("console.log");
    let sock = dir.join("src.sock");
    // 600 ticks of each source at 100 Hz: about 6 s of guest time, far more than the
    // migration needs; the timer guest's own timeout is much longer.
    let mut src = Launcher::run(
        &[
            "--kernel",
            path_str(guests::timer_path()),
            "--memory",
            "256Mi",
            "--cmdline",
            "lapic=600 pit=600",
        ],
        &serial,
        Some(&sock),
    );
    src.wait_api();
    src.wait_console("timer: booted");
    let (mut dst, uri) = destination(&dir, 1);
    let out = migrate(&sock, &uri, &[], dir.path());
    assert_completed(&out, "copy", 256 << 20);
    let pages = (256u64 << 20) / 4096;
    assert!(
        out.u64("transferredBytes") < (256 << 20) / 32,
        "an idle guest's zero memory must not travel: {}",
        out.report
    );
    assert!(
        out.u64("zeroPages") > pages * 9 / 10,
        "zero pages: {}",
        out.report
    );
    assert_eq!(src.wait().code(), Some(64), "stderr: {}", src.stderr());
    let console = dst.wait_console("timer: lapic=600 pit=600");
    let st = dst.wait();
    assert_eq!(
        st.code(),
        Some(0),
        "the timer guest must finish its counts on the destination; console:\n{console}\nstderr:\n{}",
        dst.stderr()
    );
    assert_eq!(console.matches("timer: booted").count(), 1, "{console}");
    assert!(!console.contains("timeout"), "{console}");
}

/// `pattern` on a 2-vCPU VM: the second vCPU waits for a SIPI that never comes; both
/// vCPUs' states travel, and the VM keeps running with 2 vCPUs on the destination.
#[test]
fn two_vcpu_guest_keeps_running() {
    let dir = TempDir::new("mig-smp");
    let mut src = boot_pattern(&dir, "128Mi", 8, 2);
    let (_, v) = api(api_of(&src), "GET", "/v1/status", None);
    assert_eq!(v.get("vcpus").and_then(|n| n.as_u64()), Some(2), "{v}");
    let (mut dst, uri) = destination(&dir, 1);
    migrate_once(&dir, &mut src, &mut dst, &uri, &[]);
    let (_, v) = api(api_of(&dst), "GET", "/v1/status", None);
    assert_eq!(v.get("vcpus").and_then(|n| n.as_u64()), Some(2), "{v}");
    // And once more, in local mode.
    let (mut dst2, uri2) = destination(&dir, 2);
    migrate_once(&dir, &mut dst, &mut dst2, &uri2, &["--local"]);
    shutdown(&mut dst2);
}

/// The issue's "done means": a running `pattern` guest migrated back and forth ten
/// times in copy mode and ten times in local mode, with no stale page, passes that keep
/// increasing, and one boot.
#[test]
fn ping_pong_ten_times_in_each_mode() {
    let dir = TempDir::new("mig-pingpong");
    let mut current = boot_pattern(&dir, "128Mi", 8, 1);
    let mut last = last_pass(&current.console());
    for (n, local) in (1..=20).map(|n| (n, n > 10)) {
        let (mut next, uri) = destination(&dir, n);
        let extra: &[&str] = if local { &["--local"] } else { &[] };
        let out = migrate_once(&dir, &mut current, &mut next, &uri, extra);
        assert!(
            out.u64("memoryBytes") == 128 << 20,
            "hop {n}: {}",
            out.report
        );
        let now = last_pass(&next.console());
        assert!(
            now > last,
            "hop {n}: passes did not increase ({last} -> {now})"
        );
        last = now;
        // The old socket files are gone with their processes.
        drop(std::mem::replace(&mut current, next));
    }
    let console = current.console();
    assert_pattern_consistent(&console, EVERY);
    shutdown(&mut current);
    // No leftover migration sockets.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("mig-"))
        .collect();
    assert!(left.is_empty(), "leftover migration sockets: {left:?}");
}

//! Live migration failures: whatever goes wrong before the handover, the source guest
//! keeps running with its memory intact (the `pattern` guest checks every page on every
//! pass and would print `STALE`), the source launcher stays alive and says `running`,
//! and no second copy of the VM runs (the destination exits non-zero or was killed).
//!
//! Cases: the destination killed during pre-copy, during the switch-over (when the state
//! frame is on its way) and after it loaded everything but before the go; a flipped bit
//! and a truncated stream (a man-in-the-middle proxy between the two launchers); a
//! receiver of an unknown protocol version, and a sender offering an unknown version or
//! machine type to a real receiver; a cancel through the API.
//!
//! The proxy reads the stream frame by frame (`migration::frame` header layout), so it
//! can act at exact protocol points instead of at guessed times; the launchers have no
//! fault-injection hooks.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::proxy::{Callback, Proxy, Verdict};
use integration_tests::{
    api, assert_pattern_consistent, incoming, kill_hard, last_pass, migrate, path_str, vm_state,
    wait_new_pass, wait_progress, Launcher, MigrateJob, MigrateOutcome, TempDir, SAFETY,
};
use integration_tests::{api_of, boot_pattern_source};
use integration_tests::{kill_pid, CAPPED};
use migration::frame::{FrameReader, FrameType, FrameWriter};
use migration::protocol::{
    self, Hello, MemoryLayout, MemoryRegion, MigrationMode, ReceiverMessage, RefuseReason,
    SenderMessage, VersionRange,
};

/// `pass=` line period of the `pattern` guests here.
const EVERY: u64 = 200;

fn boot_source(dir: &TempDir) -> Launcher {
    boot_pattern_source(&dir.join("console.log"), &dir.join("src.sock"), EVERY)
}

/// A real destination `n` listening on `unix:<dir>/mig-<n>.sock`, console in its own
/// file (so that anything it printed would show).
fn destination(dir: &TempDir, n: usize) -> (Launcher, String) {
    let uri = format!("unix:{}", path_str(&dir.join(&format!("mig-{n}.sock"))));
    let l = incoming(
        &uri,
        &dir.join(&format!("dst-{n}.log")),
        &dir.join(&format!("dst-{n}.sock")),
    );
    (l, uri)
}

/// The failed migration left the VM where it was: `launcher migrate` exited non-zero
/// with a report saying so, the source launcher runs and says `running`, its guest
/// makes new passes with no stale page, and the destination is gone (`dst_status` is
/// its exit status: non-zero or killed) without having run the guest.
fn assert_source_survived(
    src: &mut Launcher,
    out: &MigrateOutcome,
    dst: &mut Launcher,
    want_status: &str,
) {
    assert!(
        !out.status.success(),
        "launcher migrate must fail: {}",
        out.report
    );
    assert_eq!(out.str("status"), want_status, "report: {}", out.report);
    assert_eq!(
        out.report.get("sourceRunning").and_then(|v| v.as_bool()),
        Some(true),
        "report: {}",
        out.report
    );
    assert!(!out.str("error").is_empty(), "report: {}", out.report);
    let st = dst.wait();
    assert!(
        !st.success(),
        "the destination must not survive a failed migration; stderr:\n{}",
        dst.stderr()
    );
    assert!(
        !dst.console().contains("pattern:") && !dst.console().contains('B'),
        "the destination ran the guest:\n{}",
        dst.console()
    );
    assert!(src.alive(), "the source exited: {}", src.stderr());
    assert_eq!(vm_state(api_of(src)), "running");
    // The switch-over boost is undone: no thread of the source runs the guest (or
    // anything else) at real-time priority any more.
    let rt = realtime_threads(src.child.id());
    assert!(rt.is_empty(), "threads left at real-time priority: {rt:?}");
    // Twice: the guest makes progress, then more (not a last gasp).
    wait_new_pass(src);
    wait_new_pass(src);
    assert!(src.alive(), "the source exited: {}", src.stderr());
    assert_pattern_consistent(&src.console(), EVERY);
}

/// Names of the threads of process `pid` whose scheduling policy is not the normal one
/// (field 41 of `/proc/PID/task/TID/stat`).
fn realtime_threads(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
    {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // The name is in parentheses and may hold spaces: split after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let policy = rest.split_whitespace().nth(38).unwrap_or("0");
        if policy != "0" {
            out.push(format!(
                "{} policy {policy}",
                head.split_once('(').map_or("", |x| x.1)
            ));
        }
    }
    out
}

/// After the failures, the source can still migrate for real (nothing was left
/// half-done), and the guest continues on the destination.
fn assert_migrates_afterwards(dir: &TempDir, src: &mut Launcher, n: usize) {
    let uri = format!("unix:{}", path_str(&dir.join(&format!("mig-{n}.sock"))));
    // This destination appends to the source's console, as a real handover does.
    let mut dst = incoming(&uri, &src.serial, &dir.join(&format!("dst-{n}.sock")));
    let out = migrate(api_of(src), &uri, &[], dir.path());
    assert!(
        out.status.success(),
        "report: {}\n{}",
        out.report,
        out.stderr
    );
    assert_eq!(src.wait().code(), Some(64), "stderr: {}", src.stderr());
    wait_new_pass(&mut dst);
    assert_pattern_consistent(&dst.console(), EVERY);
    integration_tests::shutdown(&mut dst);
}

// ---------------------------------------------------------------------------------
// Faults, applied by the frame-aware proxy of `integration_tests::proxy`
// ---------------------------------------------------------------------------------

/// What the proxy does to the stream.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Flip bit `bit` of the byte at offset `at` of the sender-to-receiver stream.
    FlipBit { at: u64, bit: u8 },
    /// Forward the first `at` bytes of the sender's stream, then end that direction
    /// (the receiver sees the stream end mid-way; its answer still goes back).
    Truncate { at: u64 },
    /// SIGKILL the receiver when the sender's state frame arrives (the sender is paused
    /// and in its switch-over), before forwarding it; then close both sides.
    KillOnState,
    /// SIGKILL the receiver once it answered `Ready` (it has loaded memory and state
    /// and waits for the go), before the sender sees `Ready`; then close both sides.
    KillOnReady,
    /// SIGKILL the receiver when the sender's `Go` arrives, before forwarding it: the
    /// sender has passed the point of no return and cannot know whether the receiver
    /// started the guest.
    KillOnGo,
    /// Forward the sender's `SwitchOver` twice (a version-2 message out of order).
    DuplicateSwitchOver,
    /// Make the sender look like a version-1 sender (preamble and `Hello` offer version
    /// 1 only, re-encoded with a valid CRC); with `inject_switch_over`, also insert a
    /// `SwitchOver` before the state frame, which a version-1 stream may not carry.
    AsVersion1 { inject_switch_over: bool },
}

impl Fault {
    /// The proxy's callbacks for this fault, sender → receiver and back; `dst_pid` is
    /// the receiver's process (for the kill faults).
    fn callbacks(self, dst_pid: u32) -> (Callback, Callback) {
        let mut truncated = false;
        let forward: Callback = Box::new(move |f, link| {
            if truncated {
                return Verdict::Handled; // swallow: the receiver's side is closed
            }
            let (start, len) = (f.offset, f.bytes.len() as u64);
            let kill = match self {
                Fault::KillOnState => f.is(FrameType::State),
                Fault::KillOnGo => matches!(f.sender_msg(), Some(SenderMessage::Go)),
                _ => false,
            };
            if kill {
                kill_pid(dst_pid);
                link.note(format!(
                    "frame type {:?} ({len} bytes) at offset {start}: killed the receiver",
                    f.ty
                ));
                link.close();
                return Verdict::Stop;
            }
            match self {
                Fault::DuplicateSwitchOver
                    if matches!(f.sender_msg(), Some(SenderMessage::SwitchOver)) =>
                {
                    link.write(&f.bytes);
                    link.note("sent SwitchOver twice");
                    Verdict::Forward
                }
                Fault::AsVersion1 { inject_switch_over } => {
                    as_version_1(f, link, inject_switch_over);
                    Verdict::Forward
                }
                Fault::FlipBit { at, bit } if (start..start + len).contains(&at) => {
                    f.bytes[(at - start) as usize] ^= 1 << bit;
                    link.note(format!("flipped bit {bit} of byte {at}"));
                    Verdict::Forward
                }
                Fault::Truncate { at } if (start..start + len).contains(&at) => {
                    link.write(&f.bytes[..(at - start) as usize]);
                    link.end_way();
                    link.note(format!("truncated at byte {at}"));
                    truncated = true;
                    Verdict::Handled
                }
                _ => Verdict::Forward,
            }
        });
        let back: Callback = Box::new(move |f, link| {
            if f.ty.is_none() {
                return Verdict::Forward;
            }
            let msg = f.receiver_msg();
            link.note(format!("receiver said {msg:?}"));
            if matches!(self, Fault::KillOnReady) && matches!(msg, Some(ReceiverMessage::Ready)) {
                kill_pid(dst_pid);
                link.note("killed the receiver after Ready");
                return Verdict::Stop;
            }
            Verdict::Forward
        });
        (forward, back)
    }
}

/// Rewrite the sender's preamble and `Hello` to offer protocol version 1 only (what a
/// launcher before `SwitchOver` sends); note any `SwitchOver` that passes; with
/// `inject`, insert one before the state frame.
fn as_version_1(
    f: &mut integration_tests::proxy::Frame,
    link: &integration_tests::proxy::Link<'_>,
    inject: bool,
) {
    let v1 = VersionRange { min: 1, max: 1 };
    if f.ty.is_none() {
        f.bytes = protocol::encode_preamble(1).to_vec();
        return;
    }
    match f.sender_msg() {
        Some(SenderMessage::Hello(mut h)) => {
            h.versions = v1;
            f.bytes = migration::frame::encode_control_frame(&SenderMessage::Hello(h))
                .expect("encode Hello");
        }
        Some(SenderMessage::SwitchOver) => link.note("SwitchOver in a version-1 stream"),
        _ => {}
    }
    if inject && f.is(FrameType::State) {
        link.write(
            &migration::frame::encode_control_frame(&SenderMessage::SwitchOver)
                .expect("encode SwitchOver"),
        );
        link.note("injected SwitchOver");
    }
}

/// Start a proxy on `path` in front of the receiver socket `to`, applying `fault`.
fn proxy(path: PathBuf, to: PathBuf, dst_pid: u32, fault: Fault) -> Proxy {
    let (forward, back) = fault.callbacks(dst_pid);
    Proxy::start(path, to, forward, back)
}

/// Migrate the source through a proxy applying `fault` to a fresh destination `n`, and
/// check that the source survived. Returns the outcome.
fn migrate_through_proxy(
    dir: &TempDir,
    src: &mut Launcher,
    n: usize,
    fault: Fault,
    extra: &[&str],
) -> (MigrateOutcome, String) {
    let (mut dst, uri) = destination(dir, n);
    let to = PathBuf::from(uri.strip_prefix("unix:").expect("unix uri"));
    let proxy = proxy(
        dir.join(&format!("proxy-{n}.sock")),
        to,
        dst.child.id(),
        fault,
    );
    let out = migrate(api_of(src), &proxy.uri(), extra, dir.path());
    let log = proxy.log();
    eprintln!("{fault:?}: proxy {log:?}\nreport {}", out.report);
    assert_source_survived(src, &out, &mut dst, "failed");
    drop(proxy);
    (out, dst.stderr())
}

// ---------------------------------------------------------------------------------
// The destination dies
// ---------------------------------------------------------------------------------

#[test]
fn destination_killed_during_precopy() {
    let dir = TempDir::new("mig-kill-precopy");
    let mut src = boot_source(&dir);
    let (mut dst, uri) = destination(&dir, 1);
    let mut job = MigrateJob::start(api_of(&src), &uri, CAPPED, dir.path());
    // Well inside pre-copy: a whole iteration was sent, the next one is on its way.
    wait_progress(api_of(&src), &mut job, "iteration 1", |p| {
        p.get("iteration").and_then(|v| v.as_u64()) >= Some(1)
    });
    assert_eq!(vm_state(api_of(&src)), "migrating");
    kill_hard(&mut dst);
    let out = job.finish();
    assert_source_survived(&mut src, &out, &mut dst, "failed");
    assert_migrates_afterwards(&dir, &mut src, 2);
}

/// Killed when the source is paused and its state frame is on the way: the sender is in
/// the switch-over (it has sent the last dirty pages and waits to send the state).
#[test]
fn destination_killed_during_switch_over() {
    let dir = TempDir::new("mig-kill-switch");
    let mut src = boot_source(&dir);
    let (out, _) = migrate_through_proxy(&dir, &mut src, 1, Fault::KillOnState, &[]);
    assert!(out.u64("iterations") >= 1, "{}", out.report);
    assert_migrates_afterwards(&dir, &mut src, 2);
}

/// Killed after it loaded memory and state and answered `Ready`, before the go (the
/// sender never sees the `Ready`).
#[test]
fn destination_killed_after_loading_before_go() {
    let dir = TempDir::new("mig-kill-ready");
    let mut src = boot_source(&dir);
    migrate_through_proxy(&dir, &mut src, 1, Fault::KillOnReady, &[]);
    assert_migrates_afterwards(&dir, &mut src, 2);
}

/// Killed when the go is on its way: the sender is past the point of no return and
/// cannot know whether the receiver runs the guest, so it must stay paused and say so
/// (never resume on its own: the VM could run twice). The operator sees the destination
/// is gone and resumes the source through the API; the guest continues intact.
#[test]
fn destination_killed_after_go_leaves_source_paused_until_resumed() {
    let dir = TempDir::new("mig-kill-go");
    let mut src = boot_source(&dir);
    let (mut dst, uri) = destination(&dir, 1);
    let to = PathBuf::from(uri.strip_prefix("unix:").expect("unix uri"));
    let proxy = proxy(dir.join("proxy.sock"), to, dst.child.id(), Fault::KillOnGo);
    let out = migrate(api_of(&src), &proxy.uri(), &[], dir.path());
    eprintln!("proxy {:?}\nreport {}", proxy.log(), out.report);
    drop(proxy);
    assert!(!out.status.success(), "{}", out.report);
    assert_eq!(out.str("status"), "failed", "{}", out.report);
    assert_eq!(
        out.report.get("sourceRunning").and_then(|v| v.as_bool()),
        Some(false),
        "{}",
        out.report
    );
    assert!(out.str("error").contains("unknown"), "{}", out.report);
    assert!(!dst.wait().success());
    assert!(
        src.alive(),
        "the source must wait for a decision: {}",
        src.stderr()
    );
    assert_eq!(vm_state(api_of(&src)), "paused");
    // Paused means paused: no pass is made.
    let frozen = last_pass(&src.console());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(last_pass(&src.console()), frozen, "the paused source ran");
    // The destination is gone: resume the source.
    let (status, v) = api(api_of(&src), "PUT", "/v1/resume", None);
    assert_eq!(status, 200, "resume: {v}");
    assert_eq!(vm_state(api_of(&src)), "running");
    wait_new_pass(&mut src);
    wait_new_pass(&mut src);
    assert_pattern_consistent(&src.console(), EVERY);
    assert_migrates_afterwards(&dir, &mut src, 2);
}

// ---------------------------------------------------------------------------------
// A damaged stream
// ---------------------------------------------------------------------------------

/// One flipped bit anywhere in the sender's stream (after the preamble) is refused by
/// the receiver; the source keeps running. Positions: in the `Hello` frame's header and
/// payload, and in the first memory frame's header, range table and data.
#[test]
fn flipped_bit_is_refused() {
    let dir = TempDir::new("mig-flip");
    let mut src = boot_source(&dir);
    // Offsets: preamble 0..12, Hello header 12..28 (magic, type, flags, length, CRC),
    // Hello payload 28..; the first memory frame follows the Hello and carries up to
    // 4 MiB of data, so 1 MiB and 3 MiB are inside memory data.
    let cases = [
        (13u64, 0u8, "magic"), // Hello frame magic
        (23, 0, "bound"),      // Hello length, now over the control-frame bound
        (26, 5, "CRC"),        // Hello CRC field
        (40, 1, "CRC"),        // Hello payload
        (1 << 20, 6, "CRC"),   // memory data
        (3 << 20, 0, "CRC"),   // memory data, later
    ];
    for (n, (at, bit, word)) in cases.into_iter().enumerate() {
        let (out, dst_stderr) =
            migrate_through_proxy(&dir, &mut src, n + 1, Fault::FlipBit { at, bit }, CAPPED);
        assert!(
            dst_stderr.contains(word),
            "flip at {at}: the receiver should refuse with {word:?}: {dst_stderr}\nreport: {}",
            out.report
        );
    }
    assert_migrates_afterwards(&dir, &mut src, 100);
}

/// A stream that ends early (in the Hello, between frames, in a header, in a memory
/// frame) is refused.
#[test]
fn truncated_stream_is_refused() {
    let dir = TempDir::new("mig-trunc");
    let mut src = boot_source(&dir);
    // 20: inside the Hello's header; 100: right after the Hello (a clean end between
    // frames, which is refused too); 110: inside the first memory frame's header;
    // 1 MiB + 5: inside memory data.
    let cases = [
        (20u64, "truncated"),
        (100, "closed"),
        (110, "truncated"),
        ((1 << 20) + 5, "truncated"),
    ];
    for (n, (at, word)) in cases.into_iter().enumerate() {
        let (out, dst_stderr) =
            migrate_through_proxy(&dir, &mut src, n + 1, Fault::Truncate { at }, CAPPED);
        assert!(
            dst_stderr.contains(word),
            "truncated at {at}: the receiver should say {word:?}: {dst_stderr}\nreport: {}",
            out.report
        );
    }
    assert_migrates_afterwards(&dir, &mut src, 100);
}

// ---------------------------------------------------------------------------------
// Protocol versions: the previous one is received; SwitchOver out of order is refused
// ---------------------------------------------------------------------------------

/// The stream of a version-1 sender (no `SwitchOver`; what the launcher before version 2
/// sends) is received: the receiver accepts version 1, the migration completes and the
/// guest continues on the destination with its memory intact. The sender, told version
/// 1, sends no `SwitchOver`.
#[test]
fn a_version_1_stream_is_received() {
    let dir = TempDir::new("mig-v1");
    let mut src = boot_source(&dir);
    let uri = format!("unix:{}", path_str(&dir.join("mig-1.sock")));
    let mut dst = incoming(&uri, &src.serial, &dir.join("dst-1.sock"));
    let to = PathBuf::from(uri.strip_prefix("unix:").expect("unix uri"));
    let proxy = proxy(
        dir.join("proxy-1.sock"),
        to,
        dst.child.id(),
        Fault::AsVersion1 {
            inject_switch_over: false,
        },
    );
    let out = migrate(api_of(&src), &proxy.uri(), &[], dir.path());
    let log = proxy.log();
    assert!(
        out.status.success(),
        "report: {}
{}",
        out.report,
        out.stderr
    );
    assert_eq!(out.u64("protocolVersion"), 1, "{}", out.report);
    assert!(
        log.iter().all(|l| !l.contains("SwitchOver")),
        "a version-1 stream carried SwitchOver: {log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("Accept { version: 1 }")),
        "the receiver must choose version 1: {log:?}"
    );
    assert_eq!(src.wait().code(), Some(64), "stderr: {}", src.stderr());
    wait_new_pass(&mut dst);
    wait_new_pass(&mut dst);
    assert_pattern_consistent(&dst.console(), EVERY);
    integration_tests::shutdown(&mut dst);
}

/// `SwitchOver` out of order is refused before anything runs, and the source keeps
/// running intact: twice in a version-2 stream, or at all in a version-1 stream.
#[test]
fn switch_over_out_of_order_is_refused() {
    let dir = TempDir::new("mig-switch-order");
    let mut src = boot_source(&dir);
    let cases = [
        Fault::DuplicateSwitchOver,
        Fault::AsVersion1 {
            inject_switch_over: true,
        },
    ];
    for (n, fault) in cases.into_iter().enumerate() {
        let (out, dst_stderr) = migrate_through_proxy(&dir, &mut src, n + 1, fault, &[]);
        assert!(
            dst_stderr.contains("unexpected SwitchOver"),
            "{fault:?}: the receiver should refuse the SwitchOver: {dst_stderr}
report: {}",
            out.report
        );
    }
    assert_migrates_afterwards(&dir, &mut src, 100);
}

/// Version 2: the source pauses only once the destination answers `SwitchOver`. A proxy
/// holds the destination's `SwitchOverReady` until the source guest has printed a new
/// pass, which a paused guest cannot do; the migration then completes, and the guest
/// continues on the destination with its memory intact.
#[test]
fn the_source_runs_until_the_destination_answers_switch_over() {
    let dir = TempDir::new("mig-switch-answer");
    let mut src = boot_source(&dir);
    let console = src.serial.clone();
    let uri = format!("unix:{}", path_str(&dir.join("mig-1.sock")));
    let mut dst = incoming(&uri, &src.serial, &dir.join("dst-1.sock"));
    let to = PathBuf::from(uri.strip_prefix("unix:").expect("unix uri"));
    let forward: Callback = Box::new(|_, _| Verdict::Forward);
    let back: Callback = Box::new(move |f, link| {
        if f.ty.is_none() || !matches!(f.receiver_msg(), Some(ReceiverMessage::SwitchOverReady)) {
            return Verdict::Forward;
        }
        let read = || last_pass(&std::fs::read_to_string(&console).unwrap_or_default());
        let held_at = read();
        let deadline = std::time::Instant::now() + SAFETY;
        while read() <= held_at {
            if std::time::Instant::now() > deadline {
                link.note(format!(
                    "the source guest made no pass after pass={held_at} while SwitchOverReady was held"
                ));
                return Verdict::Stop;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        link.note(format!(
            "the source guest passed pass={held_at} while SwitchOverReady was held"
        ));
        Verdict::Forward
    });
    let proxy = Proxy::start(dir.join("proxy-1.sock"), to, forward, back);
    let out = migrate(api_of(&src), &proxy.uri(), &[], dir.path());
    let log = proxy.log();
    assert!(
        out.status.success(),
        "the source paused before the destination answered SwitchOver, or the migration failed: proxy {log:?}\nreport: {}\n{}",
        out.report,
        out.stderr
    );
    assert!(
        log.iter().any(|l| l.contains("passed pass=")),
        "the source guest made no pass while SwitchOverReady was held: {log:?}"
    );
    assert_eq!(out.u64("protocolVersion"), 2, "{}", out.report);
    assert_eq!(src.wait().code(), Some(64), "stderr: {}", src.stderr());
    wait_new_pass(&mut dst);
    assert_pattern_consistent(&dst.console(), EVERY);
    integration_tests::shutdown(&mut dst);
    drop(proxy);
}

// ---------------------------------------------------------------------------------
// Unknown versions and machine types
// ---------------------------------------------------------------------------------

/// A fake receiver on `path`: writes a preamble with `version`, reads the sender's
/// preamble and Hello, answers `answer(hello)`, then drains until the sender hangs up.
/// Returns the Hello it got.
fn fake_receiver(
    path: PathBuf,
    version: u32,
    answer: impl FnOnce(&Hello) -> ReceiverMessage + Send + 'static,
) -> std::thread::JoinHandle<Option<Hello>> {
    let listener = UnixListener::bind(&path).expect("bind fake receiver");
    std::thread::spawn(move || {
        let (s, _) = listener.accept().ok()?;
        let _ = std::fs::remove_file(&path);
        s.set_read_timeout(Some(SAFETY)).ok();
        let mut w = FrameWriter::new(s.try_clone().ok()?);
        w.get_mut()
            .write_all(&protocol::encode_preamble(version))
            .ok()?;
        let mut r = FrameReader::new(s);
        r.read_preamble().ok()?;
        let hello = match r.read_control_frame::<SenderMessage>().ok()? {
            SenderMessage::Hello(h) => h,
            _ => return None,
        };
        w.write_control(&answer(&hello)).ok()?;
        let mut sink = Vec::new();
        let _ = r.get_mut().read_to_end(&mut sink);
        Some(hello)
    })
}

/// A receiver that speaks only version 99 refuses naming both versions; the sender
/// reports it and keeps running.
#[test]
fn receiver_of_unknown_version_refuses_and_source_keeps_running() {
    let dir = TempDir::new("mig-v99");
    let mut src = boot_source(&dir);
    let path = dir.join("fake.sock");
    let fake = fake_receiver(path.clone(), 99, |hello| ReceiverMessage::Refuse {
        reason: RefuseReason::UnsupportedVersion {
            offered: hello.versions,
            accepted: VersionRange { min: 99, max: 99 },
        },
    });
    let out = migrate(
        api_of(&src),
        &format!("unix:{}", path_str(&path)),
        &[],
        dir.path(),
    );
    let hello = fake.join().expect("fake receiver").expect("a Hello");
    assert_eq!(hello.versions, VersionRange::ours());
    assert!(!out.status.success(), "{}", out.report);
    assert_eq!(out.str("status"), "failed", "{}", out.report);
    let err = out.str("error");
    assert!(
        err.contains("version 99") && err.contains(&format!("version {}", VersionRange::ours())),
        "the error must name both versions: {err}"
    );
    assert!(src.alive());
    assert_eq!(vm_state(api_of(&src)), "running");
    wait_new_pass(&mut src);
    wait_new_pass(&mut src);

    // A receiver that picks a version this sender never offered is refused by the sender.
    let fake = fake_receiver(path.clone(), 99, |_| ReceiverMessage::Accept {
        version: 99,
    });
    let out = migrate(
        api_of(&src),
        &format!("unix:{}", path_str(&path)),
        &[],
        dir.path(),
    );
    fake.join().expect("fake receiver").expect("a Hello");
    assert!(!out.status.success(), "{}", out.report);
    let err = out.str("error");
    assert!(err.contains("99"), "the error must name version 99: {err}");
    assert!(src.alive());
    assert_eq!(vm_state(api_of(&src)), "running");
    wait_new_pass(&mut src);
    wait_new_pass(&mut src);
    assert_pattern_consistent(&src.console(), EVERY);
    assert_migrates_afterwards(&dir, &mut src, 1);
}

/// Offer `hello` (after a preamble with `preamble_version`) to a real receiver; return
/// its answer. The receiver must then exit non-zero without running anything.
fn offer_to_real_receiver(
    dir: &TempDir,
    n: usize,
    preamble_version: u32,
    hello: Hello,
) -> ReceiverMessage {
    let (mut dst, uri) = destination(dir, n);
    let path = uri.strip_prefix("unix:").expect("unix uri");
    let s = UnixStream::connect(path).expect("connect to the receiver");
    s.set_read_timeout(Some(SAFETY)).ok();
    let mut w = FrameWriter::new(s.try_clone().expect("clone"));
    w.get_mut()
        .write_all(&protocol::encode_preamble(preamble_version))
        .expect("preamble");
    w.write_control(&SenderMessage::Hello(hello))
        .expect("hello");
    let mut r = FrameReader::new(s);
    let their_version = r.read_preamble().expect("receiver preamble");
    assert_eq!(their_version, protocol::PROTOCOL_VERSION);
    let answer: ReceiverMessage = r.read_control_frame().expect("an answer");
    let st = dst.wait();
    assert!(
        !st.success(),
        "the receiver must exit non-zero; stderr: {}",
        dst.stderr()
    );
    assert!(dst.console().is_empty(), "{}", dst.console());
    answer
}

fn hello(versions: VersionRange, machine_type: &str) -> Hello {
    Hello {
        versions,
        machine_type: machine_type.into(),
        memory: MemoryLayout::new(vec![MemoryRegion {
            gpa: 0,
            size: 64 << 20,
        }])
        .expect("layout"),
        vcpus: 1,
        mode: MigrationMode::Copy,
        launcher_version: "99.0.0-test".into(),
    }
}

/// A real `launcher run --incoming` refuses a sender of version 99, naming both
/// versions, and one asking for an unknown machine type, naming it.
#[test]
fn real_receiver_refuses_unknown_version_and_machine_type() {
    let dir = TempDir::new("mig-refuse");
    let ours = launcher_machine_type();
    let answer =
        offer_to_real_receiver(&dir, 1, 99, hello(VersionRange { min: 99, max: 99 }, &ours));
    let ReceiverMessage::Refuse { reason } = answer else {
        panic!("expected a refusal, got {answer:?}");
    };
    assert!(
        matches!(reason, RefuseReason::UnsupportedVersion { offered, .. } if offered.min == 99),
        "{reason:?}"
    );
    let text = reason.to_string();
    assert!(
        text.contains("99") && text.contains(&format!("version {}", protocol::PROTOCOL_VERSION)),
        "{text}"
    );

    let answer = offer_to_real_receiver(
        &dir,
        2,
        protocol::PROTOCOL_VERSION,
        hello(VersionRange::ours(), "pc-i440fx-99"),
    );
    let ReceiverMessage::Refuse { reason } = answer else {
        panic!("expected a refusal, got {answer:?}");
    };
    let RefuseReason::UnknownMachineType {
        requested,
        supported,
    } = &reason
    else {
        panic!("expected UnknownMachineType, got {reason:?}");
    };
    assert_eq!(requested, "pc-i440fx-99");
    assert!(supported.contains(&ours), "{supported:?}");
    assert!(reason.to_string().contains("pc-i440fx-99"), "{reason}");
}

/// The machine type a launcher reports in `launcher capabilities`.
fn launcher_machine_type() -> String {
    let out = integration_tests::launcher_cmd(&["capabilities"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("capabilities JSON");
    v.get("machineTypes")
        .and_then(|m| m.as_array())
        .and_then(|m| m.first())
        .and_then(|m| m.as_str())
        .expect("machineTypes")
        .to_string()
}

// ---------------------------------------------------------------------------------
// Cancel
// ---------------------------------------------------------------------------------

#[test]
fn cancel_through_the_api() {
    let dir = TempDir::new("mig-cancel");
    let mut src = boot_source(&dir);
    let (mut dst, uri) = destination(&dir, 1);
    let mut job = MigrateJob::start(api_of(&src), &uri, CAPPED, dir.path());
    wait_progress(api_of(&src), &mut job, "iteration 1", |p| {
        p.get("iteration").and_then(|v| v.as_u64()) >= Some(1)
    });
    let (status, v) = api(api_of(&src), "PUT", "/v1/migrate/cancel", None);
    assert_eq!(status, 200, "cancel: {v}");
    let out = job.finish();
    assert_source_survived(&mut src, &out, &mut dst, "cancelled");
    // Nothing to cancel any more.
    let (status, _) = api(api_of(&src), "PUT", "/v1/migrate/cancel", None);
    assert_eq!(status, 409);
    let (_, p) = api(api_of(&src), "GET", "/v1/migrate", None);
    assert_eq!(
        p.get("active").and_then(|a| a.as_bool()),
        Some(false),
        "{p}"
    );
    assert_migrates_afterwards(&dir, &mut src, 2);
}

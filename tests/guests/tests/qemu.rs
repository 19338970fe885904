//! Boots every tiny guest under QEMU (q35, KVM) and checks its output and exit status.
//!
//! Reported as ignored by `cargo test` where `qemu-system-x86_64` was missing when the tests
//! were built, except in CI (`CI=true`), where a missing QEMU fails them (see
//! `tests/tool_probe.rs`). The 60-second limit only protects against a hung QEMU; it is not
//! a performance assertion.
//!
//! With `-device isa-debug-exit`, QEMU exits with `(v << 1) | 1` when the guest writes `v` to
//! port 0xf4, and with 0 when the guest powers off.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
const KILL_AFTER: Duration = Duration::from_secs(60);

/// Called first by every test here. The tests are compiled as ignored where
/// `qemu-system-x86_64` was missing at build time outside CI (`tests/tool_probe.rs`), so a
/// test that runs expects QEMU and KVM: their absence is a failure, saying what to install.
fn require_qemu() {
    let qemu = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        qemu,
        "{QEMU} does not run: install qemu-system-x86 (.ci/run does), or build the tests \
         without CI=true to have this test reported as ignored"
    );
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: QEMU needs KVM here"
    );
}

struct Run {
    /// QEMU's exit status, or `None` when the test stopped it (see `stop_when`).
    status: Option<i32>,
    output: String,
}

/// Boots `kernel` with `append`; returns when QEMU exits or, if `stop_when` matches the
/// serial output so far, kills QEMU and returns.
fn boot(kernel: &Path, append: &str, smp: u32, stop_when: Option<&dyn Fn(&str) -> bool>) -> Run {
    boot_with(kernel, append, smp, stop_when, &[])
}

/// [`boot`] with `extra` QEMU arguments (devices).
fn boot_with(
    kernel: &Path,
    append: &str,
    smp: u32,
    stop_when: Option<&dyn Fn(&str) -> bool>,
    extra: &[&str],
) -> Run {
    let mut child = Command::new(QEMU)
        .args(["-accel", "kvm", "-M", "q35", "-m", "128", "-nodefaults"])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-smp", &smp.to_string()])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", append])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().unwrap();
    let reader = {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let start = Instant::now();
    let text = || String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for qemu") {
            break st.code();
        }
        if let Some(f) = stop_when {
            if f(&text()) {
                child.kill().ok();
                child.wait().ok();
                break None;
            }
        }
        if start.elapsed() > KILL_AFTER {
            child.kill().ok();
            child.wait().ok();
            panic!(
                "QEMU did not finish within {KILL_AFTER:?}; output so far:\n{}",
                text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    Run {
        status,
        output: text(),
    }
}

fn assert_contains(run: &Run, needle: &str) {
    assert!(
        run.output.contains(needle),
        "expected {needle:?} in the output:\n{}",
        run.output
    );
}

#[test]
#[cfg_attr(
    not(has_qemu),
    ignore = "qemu-system-x86_64 is not installed (CI installs it)"
)]
fn hello_exits_with_the_requested_code() {
    require_qemu();
    let run = boot(test_guests::hello_path(), "foo exit=7 bar", 1, None);
    assert_contains(&run, "hello: booted cmdline=foo exit=7 bar\nhello: done\n");
    assert_eq!(run.status, Some((7 << 1) | 1), "{}", run.output);
}

#[test]
#[cfg_attr(
    not(has_qemu),
    ignore = "qemu-system-x86_64 is not installed (CI installs it)"
)]
fn hello_powers_off_without_exit_key() {
    require_qemu();
    let run = boot(test_guests::hello_path(), "", 1, None);
    assert_contains(&run, "hello: booted cmdline=\nhello: done\n");
    assert_eq!(run.status, Some(0), "{}", run.output);
}

#[test]
#[cfg_attr(
    not(has_qemu),
    ignore = "qemu-system-x86_64 is not installed (CI installs it)"
)]
fn pattern_passes_are_consistent() {
    require_qemu();
    let stop = |s: &str| s.contains("\npass=200\n") || s.contains("STALE");
    let run = boot(
        test_guests::pattern_path(),
        "mib=8 every=50",
        1,
        Some(&stop),
    );
    assert_contains(&run, "pattern: booted mib=8 start=4 every=50\n");
    assert!(!run.output.contains("STALE"), "{}", run.output);
    assert_eq!(run.status, None, "guest exited early:\n{}", run.output);
    for p in [50, 100, 150, 200] {
        assert_contains(&run, &format!("B\npass={p}\nB"));
    }
    let markers = run.output.matches('B').count();
    assert!(markers >= 200, "{markers} markers:\n{}", run.output);
}

#[test]
#[cfg_attr(
    not(has_qemu),
    ignore = "qemu-system-x86_64 is not installed (CI installs it)"
)]
fn pattern_rejects_a_region_outside_ram() {
    require_qemu();
    let run = boot(test_guests::pattern_path(), "start=8 mib=512", 1, None);
    assert_contains(&run, "pattern: booted mib=512 start=8 every=100\n");
    assert_contains(&run, "pattern: bad region start=8 mib=512");
    assert_eq!(
        run.status,
        Some(((test_guests::PATTERN_EXIT_BAD_REGION as i32) << 1) | 1)
    );
}

#[test]
#[cfg_attr(
    not(has_qemu),
    ignore = "qemu-system-x86_64 is not installed (CI installs it)"
)]
fn smp_brings_up_all_cpus() {
    require_qemu();
    let run = boot(test_guests::smp_path(), "cpus=2", 2, None);
    assert_contains(&run, "smp: booted cpus=2 timeout=10\nsmp: bsp apic=0\n");
    assert_contains(&run, "smp: cpu apic=1 up\n");
    assert_contains(&run, "smp: all 2 cpus up\n");
    assert_eq!(run.status, Some(1), "{}", run.output);
}

#[test]
#[cfg_attr(
    not(has_qemu),
    ignore = "qemu-system-x86_64 is not installed (CI installs it)"
)]
fn smp_reports_missing_cpus() {
    require_qemu();
    let run = boot(test_guests::smp_path(), "cpus=3 timeout=1", 2, None);
    assert_contains(&run, "smp: cpu apic=1 up\n");
    assert_contains(&run, "smp: timeout 2 of 3\n");
    assert_eq!(
        run.status,
        Some(((test_guests::SMP_EXIT_TIMEOUT as i32) << 1) | 1)
    );
}

#[test]
#[cfg_attr(
    not(has_qemu),
    ignore = "qemu-system-x86_64 is not installed (CI installs it)"
)]
fn timer_counts_lapic_and_pit_interrupts() {
    require_qemu();
    let run = boot(test_guests::timer_path(), "lapic=20 pit=15", 1, None);
    assert_contains(&run, "timer: booted lapic=20 pit=15\n");
    assert_contains(&run, "timer: lapic=20 pit=15\n");
    assert_eq!(run.status, Some(1), "{}", run.output);
}

/// blkjournal's benchmark mode with 1 MiB requests, four in flight, on QEMU's
/// virtio-blk-pci: the guest verifies every read against what it wrote (the mode
/// benches/src/bin/disk.rs runs under QEMU, checked here for data, not timed).
#[test]
#[cfg_attr(
    not(has_qemu),
    ignore = "qemu-system-x86_64 is not installed (CI installs it)"
)]
fn blkjournal_large_requests_verify_on_qemu_virtio_blk() {
    require_qemu();
    let img = std::env::temp_dir().join(format!("test-guests-blk-{}.img", std::process::id()));
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(4 << 20))
        .expect("create disk image");
    let drive = format!(
        "file={},if=none,id=d0,format=raw,cache=writeback",
        img.display()
    );
    let run = boot_with(
        test_guests::blkjournal_path(),
        "bench=all count=24 bs_kib=1024 depth=4 verify=1",
        1,
        None,
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on",
        ],
    );
    let _ = std::fs::remove_file(&img);
    assert_contains(&run, "blkbench: bs_kib=1024 depth=4 verify=1\n");
    assert_contains(&run, "blkbench: seqr verified 24 requests\n");
    assert_contains(&run, "blkbench: randr verified 24 requests\n");
    assert_contains(&run, "blkbench: done\n");
    assert_eq!(run.status, Some(1), "{}", run.output);
}

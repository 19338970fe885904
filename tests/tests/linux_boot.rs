//! A real Linux bzImage (Debian's cloud kernel) boots through `launcher run` far
//! enough to print its "Linux version" banner on the serial port.
//!
//! On the nested KVM of our machines all CPL0 code is emulated, so the kernel needs
//! a minute or two to decompress itself and later stops in early boot on an
//! instruction the emulator lacks (see PLATFORM.md); the test only waits for the
//! banner, then kills the launcher.
//!
//! The kernel comes from `$LINUX_BZIMAGE`, or `/var/cache/lvm-test/vmlinuz` where
//! `.ci/run` puts it. Without a kernel the test fails; with `LVM_SKIP_LINUX=1` when the
//! tests are built, `cargo test` reports it as ignored (`tests/build.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration_tests::{Launcher, TempDir};

const DEFAULT_KERNEL: &str = "/var/cache/lvm-test/vmlinuz";

/// Safety deadline only (decompressing at emulated speed takes a while); never asserted.
const LINUX_SAFETY: Duration = Duration::from_secs(900);

fn kernel() -> PathBuf {
    let p = std::env::var_os("LINUX_BZIMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KERNEL));
    if p.exists() {
        return p;
    }
    panic!(
        "no Linux bzImage at {}: run `.ci/run` (it fetches Debian's cloud kernel there) or set \
         LINUX_BZIMAGE=/path/to/bzImage; set LVM_SKIP_LINUX=1 to skip this test",
        p.display()
    );
}

#[test]
#[cfg_attr(lvm_skip_linux, ignore = "LVM_SKIP_LINUX=1")]
fn debian_cloud_kernel_prints_its_linux_version_banner() {
    let kernel = kernel();
    let header = std::fs::read(&kernel).expect("read the kernel");
    assert!(
        header.len() > 0x206 && &header[0x202..0x206] == b"HdrS",
        "{} is not a bzImage (no HdrS setup header)",
        kernel.display()
    );
    let dir = TempDir::new("linux");
    let serial = dir.join("console.log");
    let mut l = Launcher::run(
        &[
            "--kernel",
            kernel.to_str().expect("utf-8 path"),
            "--memory",
            "256Mi",
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 noapic",
        ],
        &serial,
        None,
    );
    let deadline = Instant::now() + LINUX_SAFETY;
    let console = loop {
        let text = l.console();
        if text.contains("Linux version")
            && text[text.find("Linux version").unwrap()..].contains('\n')
        {
            break text;
        }
        if let Ok(Some(status)) = l.child.try_wait() {
            panic!(
                "launcher exited ({status}) before the kernel printed its banner;\nstderr:\n{}\nconsole:\n{text}",
                l.stderr()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no \"Linux version\" banner within the safety deadline;\nstderr:\n{}\nconsole:\n{text}",
            l.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = l.child.kill();
    let _ = l.child.wait();
    let banner = console
        .lines()
        .find(|line| line.contains("Linux version"))
        .expect("banner line");
    eprintln!("linux_boot: {}", banner.trim());
    assert!(!l.stderr().contains("panicked"), "{}", l.stderr());
}

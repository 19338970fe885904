//! Every tiny guest boots through `launcher run` and says what it should.

use integration_tests::{guests, Launcher, TempDir};

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn hello_exits_with_the_code_it_was_given() {
    let dir = TempDir::new("hello");
    let serial = dir.join("console.log");
    let mut l = Launcher::run(
        &[
            "--kernel",
            path(guests::hello_path()),
            "--memory",
            "32Mi",
            "--cmdline",
            "exit=42",
        ],
        &serial,
        None,
    );
    let status = l.wait();
    assert_eq!(status.code(), Some(42), "stderr: {}", l.stderr());
    let console = l.console();
    assert!(
        console.contains("hello: booted cmdline=exit=42"),
        "{console}"
    );
    assert!(console.contains("hello: done"), "{console}");
}

#[test]
fn hello_without_exit_code_powers_off_with_status_zero() {
    let dir = TempDir::new("hello-off");
    let serial = dir.join("console.log");
    let mut l = Launcher::run(
        &["--kernel", path(guests::hello_path()), "--memory", "32Mi"],
        &serial,
        None,
    );
    assert_eq!(l.wait().code(), Some(0), "stderr: {}", l.stderr());
    assert!(l.console().contains("hello: done"));
}

#[test]
fn smp_guest_brings_up_every_vcpu_through_init_sipi() {
    let dir = TempDir::new("smp");
    let serial = dir.join("console.log");
    let mut l = Launcher::run(
        &[
            "--kernel",
            path(guests::smp_path()),
            "--memory",
            "32Mi",
            "--vcpus",
            "3",
            "--cmdline",
            "cpus=3",
        ],
        &serial,
        None,
    );
    assert_eq!(
        l.wait().code(),
        Some(0),
        "stderr: {} console: {}",
        l.stderr(),
        l.console()
    );
    let console = l.console();
    assert!(console.contains("smp: bsp apic=0"), "{console}");
    assert!(console.contains("smp: cpu apic=1 up"), "{console}");
    assert!(console.contains("smp: cpu apic=2 up"), "{console}");
    assert!(console.contains("smp: all 3 cpus up"), "{console}");
}

#[test]
fn timer_guest_receives_lapic_and_pit_interrupts() {
    let dir = TempDir::new("timer");
    let serial = dir.join("console.log");
    let mut l = Launcher::run(
        &[
            "--kernel",
            path(guests::timer_path()),
            "--memory",
            "32Mi",
            "--cmdline",
            "lapic=20 pit=20",
        ],
        &serial,
        None,
    );
    assert_eq!(
        l.wait().code(),
        Some(0),
        "stderr: {} console: {}",
        l.stderr(),
        l.console()
    );
    assert!(
        l.console().contains("timer: lapic=20 pit=20"),
        "{}",
        l.console()
    );
}

#[test]
fn pattern_guest_runs_passes_without_stale_pages() {
    let dir = TempDir::new("pattern");
    let serial = dir.join("console.log");
    let mut l = Launcher::run(
        &[
            "--kernel",
            path(guests::pattern_path()),
            "--memory",
            "64Mi",
            "--cmdline",
            "mib=8 every=20",
        ],
        &serial,
        None,
    );
    let console = l.wait_console("pass=40\n");
    assert!(l.alive());
    assert!(!console.contains("STALE"), "{console}");
    let passes = integration_tests::pattern_passes(&console);
    assert_eq!(&passes[..2], &[20, 40], "{console}");
}

#[test]
fn a_guest_reset_reboots_the_vm_in_the_same_launcher() {
    for how in ["kbd", "cf9"] {
        let dir = TempDir::new("reset");
        let serial = dir.join("console.log");
        let cmdline = format!("reset={how}");
        let mut l = Launcher::run(
            &[
                "--kernel",
                path(guests::hello_path()),
                "--memory",
                "32Mi",
                "--cmdline",
                &cmdline,
            ],
            &serial,
            None,
        );
        // The guest resets at every boot: a third banner proves two reboots happened.
        let console = integration_tests::wait_console_until(&mut l, "three boots", |c| {
            c.matches("hello: booted").count() >= 3
        });
        assert!(console.contains("hello: resetting through"), "{console}");
        assert!(
            l.alive(),
            "the launcher must reboot the VM, not exit: {}",
            l.stderr()
        );
    }
}

//! The launcher's control surfaces and its sandbox.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use integration_tests::{bin, guests, path_str, Launcher, TempDir};

#[test]
fn a_forbidden_syscall_on_a_vcpu_thread_kills_the_launcher() {
    let dir = TempDir::new("seccomp-selftest");
    let serial = dir.join("console.log");
    let out = Command::new(bin("launcher"))
        .args([
            "run",
            "--kernel",
            path_str(guests::timer_path()),
            "--memory",
            "32Mi",
            "--seccomp-selftest",
        ])
        .arg("--serial")
        .arg(&serial)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run launcher");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "expected death by SIGSYS, got {:?}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The guest never ran: the filter fired before the first KVM_RUN.
    assert!(!std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("timer: lapic="));
}

/// The virtio worker threads (one per device, `blkN`, `netN`) have their own filter,
/// narrower than the process filter: `--seccomp-selftest worker` makes each worker call
/// `socket(2)`, which the process filter allows and the worker filter does not, right after
/// installing it. The launcher must die by SIGSYS, so the worker filter is installed and
/// kills. The vCPU self-test is off here: the only forbidden call is the worker's.
#[test]
fn a_forbidden_syscall_on_a_virtio_worker_thread_kills_the_launcher() {
    let dir = TempDir::new("seccomp-selftest-worker");
    let serial = dir.join("console.log");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("create disk image");
    let run = |extra: &[&str]| {
        Command::new(bin("launcher"))
            .arg("run")
            .args(extra)
            .args([
                "--kernel",
                path_str(guests::blkjournal_path()),
                "--memory",
                "32Mi",
                "--cmdline",
                "count=1 interval_ms=0",
                "--disk",
                &format!("path={}", path_str(&disk)),
                "--seccomp-selftest",
                "worker",
            ])
            .arg("--serial")
            .arg(&serial)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run launcher")
    };
    let out = run(&[]);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "expected death by SIGSYS, got {:?}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The worker starts with its device, before any vCPU runs: the guest never ran.
    assert!(!std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("blkjournal: done"));
    // The same launcher without the filters: the self-test is not armed and the guest
    // writes its record and ends normally.
    let out = run(&["--no-seccomp"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("blkjournal: done seq=1"));
}

#[test]
fn without_the_filter_the_same_self_test_is_not_killed() {
    // --no-seccomp: the self-test hook is not installed, the guest runs to its end.
    let dir = TempDir::new("seccomp-off");
    let serial = dir.join("console.log");
    let out = Command::new(bin("launcher"))
        .args([
            "run",
            "--no-seccomp",
            "--kernel",
            path_str(guests::hello_path()),
            "--memory",
            "32Mi",
            "--cmdline",
            "exit=5",
            "--seccomp-selftest",
        ])
        .arg("--serial")
        .arg(&serial)
        .output()
        .expect("run launcher");
    assert_eq!(out.status.code(), Some(5));
}

#[test]
fn the_api_socket_is_private_to_its_owner() {
    let dir = TempDir::new("api-mode");
    let serial = dir.join("console.log");
    let api = dir.join("api.sock");
    let mut l = Launcher::run(
        &[
            "--kernel",
            path_str(guests::timer_path()),
            "--memory",
            "32Mi",
            "--cmdline",
            "lapic=100000 pit=100000",
        ],
        &serial,
        Some(&api),
    );
    l.wait_api();
    let mode = std::fs::metadata(&api)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "API socket mode is {mode:o}");
    // A second launcher refuses to take over a live socket.
    let out = Command::new(bin("launcher"))
        .args([
            "run",
            "--kernel",
            path_str(guests::hello_path()),
            "--memory",
            "32Mi",
            "--serial",
            "/dev/null",
        ])
        .arg("--api-socket")
        .arg(&api)
        .output()
        .expect("run launcher");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serving"), "{err}");
    assert!(l.alive());
}

#[test]
fn an_oversized_api_request_is_refused_without_harm() {
    use std::io::{Read, Write};
    let dir = TempDir::new("api-limits");
    let serial = dir.join("console.log");
    let api = dir.join("api.sock");
    let mut l = Launcher::run(
        &[
            "--kernel",
            path_str(guests::timer_path()),
            "--memory",
            "32Mi",
            "--cmdline",
            "lapic=100000 pit=100000",
        ],
        &serial,
        Some(&api),
    );
    l.wait_api();
    let mut s = std::os::unix::net::UnixStream::connect(&api).unwrap();
    // Claims a 1 GiB body: refused before anything is allocated.
    let _ = write!(
        s,
        "PUT /v1/snapshot HTTP/1.1\r\nContent-Length: 1073741824\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    let (status, body) = integration_tests::api(&api, "GET", "/v1/status", None);
    assert_eq!(status, 200);
    assert_eq!(body["state"], "running");
    assert!(l.alive());
}

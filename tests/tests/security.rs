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

//! The build-time tool probe (`tests/tool_probe.rs`) that decides whether the tests that
//! need `ip` or QEMU are compiled as ignored: found only as an executable file in `PATH`,
//! and always enabled under CI, where a missing tool must fail the tests.

#[path = "../tool_probe.rs"]
mod tool_probe;

use integration_tests::TempDir;
use std::os::unix::fs::PermissionsExt;
use tool_probe::{directives, find_in_path};

fn file(dir: &std::path::Path, name: &str, mode: u32) {
    let p = dir.join(name);
    std::fs::write(&p, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_tool_is_found_only_as_an_executable_file_in_path() {
    let a = TempDir::new("probe-a");
    let b = TempDir::new("probe-b");
    file(a.path(), "ip", 0o644); // not executable
    std::fs::create_dir(a.path().join("qemu-system-x86_64")).unwrap(); // a directory
    file(b.path(), "ip", 0o755);
    let path = format!(
        "/nonexistent::{}:{}",
        a.path().display(),
        b.path().display()
    );
    assert_eq!(find_in_path("ip", &path), Some(b.path().join("ip")));
    assert_eq!(find_in_path("qemu-system-x86_64", &path), None);
    assert_eq!(find_in_path("ip", ""), None);
}

#[test]
fn a_missing_tool_ignores_its_tests_outside_ci_and_fails_them_in_ci() {
    let d = TempDir::new("probe-dirs");
    let path = d.path().display().to_string();
    let enabled = |lines: &[String]| lines.iter().any(|l| l == "cargo::rustc-cfg=has_ip");

    let local = directives("ip", "ip", &path, false);
    assert!(!enabled(&local), "{local:?}");
    // Installing the tool into a PATH directory re-runs the probe.
    assert!(
        local.contains(&format!("cargo::rerun-if-changed={path}")),
        "{local:?}"
    );

    let ci = directives("ip", "ip", &path, true);
    assert!(enabled(&ci), "{ci:?}");
    assert!(
        ci.iter().any(|l| l.starts_with("cargo::warning=")),
        "{ci:?}"
    );

    file(d.path(), "ip", 0o755);
    let found = directives("ip", "ip", &path, false);
    assert!(enabled(&found), "{found:?}");
    let exe = d.path().join("ip");
    assert!(found.contains(&format!("cargo::rerun-if-changed={}", exe.display())));
}

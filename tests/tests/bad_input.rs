//! Bad input to `launcher` gets one clear `launcher: ...` line and a non-zero
//! status, never a panic; `--version` and `capabilities` say what this build is.

use integration_tests::{guests, launcher_cmd, TempDir};

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Run `launcher run <args>` (console to a file in `dir`) and check that it is refused
/// with a non-zero status and a `launcher: ` line on stderr containing every one of
/// `words` (case-insensitive). Returns that line.
fn refused(dir: &TempDir, args: &[&str], words: &[&str]) -> String {
    let serial = dir.join("console.log");
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--serial", path(&serial)]);
    let out = launcher_cmd(&full);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "launcher {full:?} succeeded; stderr:\n{stderr}"
    );
    assert!(
        out.status.code().is_some(),
        "launcher {full:?} was killed by a signal ({}); stderr:\n{stderr}",
        out.status
    );
    assert!(
        !stderr.contains("panicked"),
        "launcher {full:?} panicked:\n{stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with("launcher: "))
        .unwrap_or_else(|| panic!("no `launcher: ` line for {full:?}; stderr:\n{stderr}"))
        .to_string();
    let lower = line.to_lowercase();
    for w in words {
        assert!(
            lower.contains(&w.to_lowercase()),
            "the error for {full:?} does not mention {w:?}: {line}"
        );
    }
    line
}

#[test]
fn missing_kernel_file_is_refused() {
    let dir = TempDir::new("bad-missing-kernel");
    let missing = dir.join("no-such-kernel.elf");
    refused(
        &dir,
        &["--kernel", path(&missing), "--memory", "64Mi"],
        &["kernel", "no-such-kernel.elf"],
    );
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage_is_refused() {
    let dir = TempDir::new("bad-text-kernel");
    let text = dir.join("kernel.txt");
    std::fs::write(&text, "this is a text file, not a kernel\n".repeat(200)).unwrap();
    refused(
        &dir,
        &["--kernel", path(&text), "--memory", "64Mi"],
        &["kernel"],
    );
}

#[test]
fn empty_kernel_file_is_refused() {
    let dir = TempDir::new("bad-empty-kernel");
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    refused(
        &dir,
        &["--kernel", path(&empty), "--memory", "64Mi"],
        &["kernel"],
    );
}

#[test]
fn too_little_memory_is_refused() {
    let dir = TempDir::new("bad-small-mem");
    refused(
        &dir,
        &["--kernel", path(guests::hello_path()), "--memory", "1Mi"],
        &["memory", "small"],
    );
}

#[test]
fn more_memory_than_the_host_has_is_refused() {
    let dir = TempDir::new("bad-huge-mem");
    refused(
        &dir,
        &["--kernel", path(guests::hello_path()), "--memory", "100T"],
        &["memory", "host"],
    );
}

#[test]
fn zero_vcpus_are_refused() {
    let dir = TempDir::new("bad-vcpus");
    refused(
        &dir,
        &[
            "--kernel",
            path(guests::hello_path()),
            "--memory",
            "32Mi",
            "--vcpus",
            "0",
        ],
        &["vcpus"],
    );
}

#[test]
fn unknown_machine_type_is_refused() {
    let dir = TempDir::new("bad-machine");
    let line = refused(
        &dir,
        &[
            "--kernel",
            path(guests::hello_path()),
            "--memory",
            "32Mi",
            "--machine-type",
            "pc-i440fx-9.9",
        ],
        &["machine type", "pc-i440fx-9.9"],
    );
    assert!(
        line.contains("q35-1.0"),
        "should name what is supported: {line}"
    );
}

#[test]
fn bad_size_strings_are_refused() {
    let dir = TempDir::new("bad-size");
    for size in ["12Q", "abc", "", "1.5.3G", "M"] {
        refused(
            &dir,
            &["--kernel", path(guests::hello_path()), "--memory", size],
            &["--memory", "quantity"],
        );
    }
}

#[test]
fn run_without_a_kernel_is_refused() {
    let dir = TempDir::new("bad-no-kernel");
    refused(&dir, &["--memory", "32Mi"], &["--kernel"]);
}

#[test]
fn version_prints_launcher_and_the_version() {
    let out = launcher_cmd(&["--version"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.trim();
    let version = line
        .strip_prefix("launcher ")
        .unwrap_or_else(|| panic!("--version printed {line:?}"));
    assert!(
        !version.is_empty() && !version.contains(char::is_whitespace),
        "--version printed {line:?}"
    );
    // The same version `capabilities` reports (both may be stamped by LAUNCHER_VERSION).
    let caps = launcher_cmd(&["capabilities"]);
    let caps: serde_json::Value = serde_json::from_slice(&caps.stdout).expect("capabilities JSON");
    assert_eq!(caps["version"], version, "{caps}");
}

#[test]
fn capabilities_lists_the_q35_machine_type() {
    let out = launcher_cmd(&["capabilities"]);
    assert!(out.status.success(), "{out:?}");
    let caps: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("capabilities prints one JSON object");
    let types = caps["machineTypes"]
        .as_array()
        .unwrap_or_else(|| panic!("no machineTypes array: {caps}"));
    assert!(
        types.iter().any(|t| t == "q35-1.0"),
        "machineTypes lacks q35-1.0: {caps}"
    );
    assert!(caps["version"].is_string(), "{caps}");
    for key in ["migrationProtocol", "snapshotFormat"] {
        assert!(
            caps[key]["min"].is_u64() && caps[key]["max"].is_u64(),
            "{key} should have min and max: {caps}"
        );
    }
}

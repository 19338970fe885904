//! Build-time probe for the external tools some integration tests need (included with
//! `#[path]` by `tests/build.rs`, `tests/guests/build.rs` and `tests/tests/tool_probe.rs`).
//!
//! Rust's test harness cannot mark a test ignored once it runs, so the decision is made
//! when the tests are compiled: a build script looks the tool up in `PATH` and emits a
//! `has_<tool>` cfg; a test that needs the tool carries
//! `#[cfg_attr(not(has_<tool>), ignore = "...")]`, so `cargo test` reports it as
//! *ignored* (not passed) on a machine without the tool. Under `CI=true` the cfg is
//! always set: CI installs every tool (`.ci/run`), so there a missing tool makes the test
//! run and fail (`integration_tests::require_tool`) instead of hiding it.
//!
//! The build script re-runs when `CI` or `PATH` changes, when a tool it found changes or
//! disappears, and when a file appears in a `PATH` directory while a tool is missing (so
//! installing it re-enables its tests without a `cargo clean`).

use std::path::{Path, PathBuf};

/// The first executable file called `name` in the `:`-separated `path`.
pub fn find_in_path(name: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The cargo directives for tool `name` (cfg `has_<cfg>`), given `PATH` and whether this
/// is a CI build.
pub fn directives(name: &str, cfg: &str, path: &str, ci: bool) -> Vec<String> {
    let mut out = vec![format!("cargo::rustc-check-cfg=cfg(has_{cfg})")];
    match find_in_path(name, path) {
        Some(p) => {
            out.push(format!("cargo::rerun-if-changed={}", p.display()));
            out.push(format!("cargo::rustc-cfg=has_{cfg}"));
        }
        None => {
            for d in path.split(':').filter(|d| Path::new(d).is_dir()) {
                out.push(format!("cargo::rerun-if-changed={d}"));
            }
            if ci {
                out.push(format!("cargo::rustc-cfg=has_{cfg}"));
                out.push(format!(
                    "cargo::warning=CI=true but `{name}` is not in PATH: the tests that need it will fail"
                ));
            }
        }
    }
    out
}

/// Print the directives for each `(tool, cfg)` (for a build script's `main`).
#[allow(dead_code)]
pub fn emit(tools: &[(&str, &str)]) {
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=PATH");
    let path = std::env::var("PATH").unwrap_or_default();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    for (name, cfg) in tools {
        for d in directives(name, cfg, &path, ci) {
            println!("{d}");
        }
    }
}

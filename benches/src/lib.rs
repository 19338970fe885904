//! Helpers shared by the benchmark programs in `src/bin/`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Print `prog: msg` and exit 1.
pub fn fail(prog: &str, msg: &str) -> ! {
    eprintln!("{prog}: {msg}");
    std::process::exit(1);
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Our launcher: `given`, else a fresh `cargo build --release -p launcher` next to this
/// benchmark's own executable, so a benchmark never measures a stale build.
pub fn launcher_path(prog: &str, given: Option<&PathBuf>) -> PathBuf {
    if let Some(p) = given {
        return p.clone();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("{prog}: building the launcher (cargo build --release -p launcher --bin launcher)");
    let st = Command::new(cargo)
        .args(["build", "--release", "-p", "launcher", "--bin", "launcher"])
        .current_dir(workspace_root())
        .status()
        .unwrap_or_else(|e| fail(prog, &format!("cannot run cargo: {e}")));
    if !st.success() {
        fail(prog, "building the launcher failed");
    }
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe.parent().expect("target dir").join("launcher");
    if !p.exists() {
        fail(prog, &format!("{} is missing after the build", p.display()));
    }
    p
}

/// The median (mean of the middle two for an even count; NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(super::median(vec![]).is_nan());
    }
}

//! Helpers shared by the benchmark programs in `src/bin/`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The QEMU binary the benchmarks compare against unless `--qemu` names another.
pub const QEMU: &str = "qemu-system-x86_64";

/// The `--write-docs` switch every benchmark takes (flatten it into the benchmark's
/// clap parser). Results always go to stdout; a tracked file under `docs/` changes only
/// when asked, so a trial run never dirties the work tree.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DocsArg {
    /// Also write the results into the benchmark's page under docs/ (relative to the
    /// repository root, wherever the benchmark runs from).
    #[arg(long)]
    pub write_docs: bool,
}

impl DocsArg {
    /// Write `text` to `rel` (a path relative to the repository root) if `--write-docs`
    /// was given; say what happened either way.
    pub fn write(&self, prog: &str, rel: &str, text: &str) {
        if !self.write_docs {
            eprintln!("{prog}: {rel} left unchanged (pass --write-docs to update it)");
            return;
        }
        let path = workspace_root().join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| fail(prog, &format!("cannot create {}: {e}", dir.display())));
        }
        std::fs::write(&path, text)
            .unwrap_or_else(|e| fail(prog, &format!("cannot write {rel}: {e}")));
        eprintln!("{prog}: wrote {rel}");
    }
}

/// The options of a benchmark that runs our launcher: `--write-docs` and `--launcher`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CommonArgs {
    #[command(flatten)]
    pub docs: DocsArg,
    /// Our launcher binary (default: a fresh `cargo build --release -p launcher`).
    #[arg(long, value_name = "PATH")]
    pub launcher: Option<PathBuf>,
}

impl CommonArgs {
    /// The launcher to measure (see [`launcher_path`]).
    pub fn launcher(&self, prog: &str) -> PathBuf {
        launcher_path(prog, self.launcher.as_ref())
    }
}

/// clap value parser for a count that must be at least 1 (`--runs`, ...).
pub fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive whole number")),
    }
}

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

/// The first line `cmd args` prints on stdout, trimmed ("unknown" if it cannot run): the
/// version strings the reports name.
pub fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Check that this machine can run both VMMs (`/dev/kvm`, a working `qemu`) and return
/// the version lines of `launcher` and of `qemu`, for the report; exits with what to
/// install otherwise.
pub fn versions_side_by_side(prog: &str, launcher: &Path, qemu: &str) -> (String, String) {
    if !Path::new("/dev/kvm").exists() {
        fail(prog, "/dev/kvm is missing: this benchmark runs KVM guests");
    }
    let qemu_version = first_line(qemu, &["--version"]);
    if qemu_version == "unknown" || qemu_version.is_empty() {
        fail(
            prog,
            &format!(
                "cannot run {qemu}: install qemu-system-x86 (apt-get install qemu-system-x86)"
            ),
        );
    }
    let launcher_version = first_line(launcher.to_str().unwrap_or("launcher"), &["--version"]);
    (launcher_version, qemu_version)
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
    use clap::Parser;

    #[derive(Parser)]
    struct Opts {
        #[command(flatten)]
        common: super::CommonArgs,
        #[arg(long, default_value_t = 3, value_parser = super::positive)]
        runs: usize,
    }

    #[test]
    fn common_options_parse_and_docs_are_opt_in() {
        let o = Opts::try_parse_from(["b"]).unwrap();
        assert!(!o.common.docs.write_docs);
        assert_eq!((o.runs, o.common.launcher), (3, None));
        let o =
            Opts::try_parse_from(["b", "--write-docs", "--launcher", "/x", "--runs", "5"]).unwrap();
        assert!(o.common.docs.write_docs);
        assert_eq!(
            o.common.launcher.as_deref(),
            Some(std::path::Path::new("/x"))
        );
        assert_eq!(o.runs, 5);
        let e = Opts::try_parse_from(["b", "--runs", "0"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a positive whole number"), "{e}");
        assert!(Opts::try_parse_from(["b", "--no-write"]).is_err());
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(super::median(vec![]).is_nan());
    }
}

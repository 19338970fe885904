//! Helpers for the integration tests: find the built binaries and tiny guests,
//! run launchers as child processes, and read their console logs.
//!
//! Every wait here has a generous *safety* deadline that only keeps a broken
//! build from hanging CI; no test asserts on how long anything took.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use test_guests as guests;

/// How long any single wait may take before the test gives up (safety only).
pub const SAFETY: Duration = Duration::from_secs(120);

/// The directory holding the workspace's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("target dir").to_path_buf()
}

/// Path of a workspace binary; panics with a clear message when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` (or `cargo test --workspace`) first",
        p.display()
    );
    p
}

/// A fresh temporary directory for one test, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Create `/tmp/lvm-test-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "lvm-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A launcher child process, killed on drop.
pub struct Launcher {
    /// The child.
    pub child: Child,
    /// Its console log.
    pub serial: PathBuf,
    /// Its API socket, if any.
    pub api: Option<PathBuf>,
}

impl Launcher {
    /// Start `launcher run <args>` with its console in `serial` and stderr in `serial.stderr`.
    pub fn run(args: &[&str], serial: &Path, api: Option<&Path>) -> Self {
        let mut cmd = Command::new(bin("launcher"));
        cmd.arg("run").args(args).arg("--serial").arg(serial);
        if let Some(a) = api {
            cmd.arg("--api-socket").arg(a);
        }
        let stderr = std::fs::File::create(serial.with_extension("stderr")).expect("stderr file");
        cmd.stdout(Stdio::null()).stderr(stderr);
        let child = cmd.spawn().expect("spawn launcher");
        Self {
            child,
            serial: serial.to_path_buf(),
            api: api.map(Path::to_path_buf),
        }
    }

    /// Wait for the process to exit (safety deadline), returning its status.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + SAFETY;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "launcher did not exit within the safety deadline; console:\n{}\nstderr:\n{}",
                    self.console(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The console log so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// The launcher's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.serial.with_extension("stderr")).unwrap_or_default()
    }

    /// Wait until the console contains `needle` (safety deadline), returning the console.
    pub fn wait_console(&mut self, needle: &str) -> String {
        wait_file_contains(&self.serial, needle, &mut self.child)
    }

    /// Wait for the API socket to accept connections.
    pub fn wait_api(&mut self) {
        let api = self.api.clone().expect("launcher has no API socket");
        let deadline = Instant::now() + SAFETY;
        while std::os::unix::net::UnixStream::connect(&api).is_err() {
            assert!(self.alive(), "launcher exited early: {}", self.stderr());
            assert!(Instant::now() < deadline, "API socket never appeared");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until `path` contains `needle` while `child` runs.
pub fn wait_file_contains(path: &Path, needle: &str, child: &mut Child) -> String {
    let deadline = Instant::now() + SAFETY;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("process exited ({status}) before printing {needle:?}; console:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never appeared; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pass numbers printed by the `pattern` guest (`pass=N` lines), in order.
pub fn pattern_passes(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pass="))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Count how many times the `pattern` guest booted (its banner lines).
pub fn pattern_boots(console: &str) -> usize {
    console.matches("pattern: booted").count()
}

/// Run a launcher subcommand to completion and capture its output.
pub fn launcher_cmd(args: &[&str]) -> std::process::Output {
    Command::new(bin("launcher"))
        .args(args)
        .output()
        .expect("run launcher")
}

/// Send one request to a launcher API socket with curl-free plain HTTP.
pub fn api(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect API");
    s.set_read_timeout(Some(SAFETY)).ok();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| serde_json::from_str(b).unwrap_or(serde_json::Value::Null))
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// Wait until the launcher's console satisfies `pred` (safety deadline), returning the
/// console; `what` describes the condition for the failure message.
pub fn wait_console_until(l: &mut Launcher, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + SAFETY;
    loop {
        let text = l.console();
        if pred(&text) {
            return text;
        }
        if let Ok(Some(status)) = l.child.try_wait() {
            panic!(
                "launcher exited ({status}) before {what}; console:\n{text}\nstderr:\n{}",
                l.stderr()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

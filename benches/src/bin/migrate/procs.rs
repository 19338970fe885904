//! Child processes, scratch directories and waits of the migration benchmark.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{fail, SAFETY};

/// A scratch directory, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("lvm-bench-migrate-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| fail(&format!("mkdir {}: {e}", p.display())));
        Self(p)
    }
    pub fn join(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child killed (SIGKILL) and reaped on drop.
pub struct Proc(Child);

impl Proc {
    pub fn spawn(cmd: &mut Command, what: &str) -> Self {
        Proc(
            cmd.stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| fail(&format!("cannot start {what}: {e}"))),
        )
    }
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
    pub fn wait(&mut self) -> Option<i32> {
        let end = Instant::now() + SAFETY;
        loop {
            if let Ok(Some(s)) = self.0.try_wait() {
                return s.code();
            }
            if Instant::now() > end {
                let _ = self.0.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn file_out(p: &Path) -> Stdio {
    Stdio::from(std::fs::File::create(p).unwrap_or_else(|e| fail(&format!("{}: {e}", p.display()))))
}

/// Wait until `path` contains `needle` while `proc` runs.
pub fn wait_file(path: &Path, needle: &str, proc: &mut Proc, what: &str) {
    let end = Instant::now() + SAFETY;
    loop {
        let text = std::fs::read(path).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains(needle) {
            return;
        }
        if !proc.alive() {
            fail(&format!("{what} exited before printing {needle:?}"));
        }
        if Instant::now() > end {
            fail(&format!("{what} never printed {needle:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn wait_socket(path: &Path, proc: &mut Proc, what: &str) {
    let end = Instant::now() + SAFETY;
    while UnixStream::connect(path).is_err() {
        if !proc.alive() {
            fail(&format!(
                "{what} exited before its socket {} appeared",
                path.display()
            ));
        }
        if Instant::now() > end {
            fail(&format!("{what}: {} never appeared", path.display()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One HTTP request on an API socket; the JSON body of the answer.
pub fn http(sock: &Path, method: &str, path: &str) -> Option<Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(SAFETY)).ok();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()
}

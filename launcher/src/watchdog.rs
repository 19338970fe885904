//! The launcher's fencing watchdog (`launcher run --watchdog-file PATH
//! [--watchdog-timeout-ms N]`).
//!
//! Why: the cluster restarts the VMs of a failed node elsewhere once that node is known to
//! be fenced (docs/cluster.md). A node that is cut off fences itself from noded, but a node
//! whose noded is *frozen* (SIGSTOP, a host stall, a hung disk under its state directory)
//! cannot do anything, while its launchers (each in its own session) would keep running
//! their guests: a restart elsewhere would then run the VM twice. So noded keeps feeding
//! each launcher's watchdog by touching a file (updating its mtime, e.g. every second),
//! and the launcher kills itself the moment the file goes stale.
//!
//! How: [`Watchdog::start`] checks the file once on the calling thread, before the guest
//! exists (a launcher started by a noded that no longer feeds dies before its guest runs
//! one instruction), then a dedicated thread checks it every [`CHECK_INTERVAL`]. The file
//! is stale when it is missing, cannot be stat'ed, or its mtime is more than the timeout
//! before `CLOCK_REALTIME` now (an mtime in the future counts as fresh: a clock stepped
//! back must not fence). Fencing is one line on stderr and `kill(getpid(), SIGKILL)`: no
//! graceful shutdown, no vCPU resume, no migration cleanup, because the point is that the
//! guest stops executing now. A launcher is gone at most timeout + [`CHECK_INTERVAL`]
//! (plus scheduling delay) after the last feed, provided the host runs it; after a host
//! stall, the guest may run until this thread is scheduled again (its sleep has long
//! expired by then, so that is the next scheduling tick, not another interval).
//!
//! The thread runs under the launcher's process seccomp filter (it is started after the
//! filter is installed on the main thread, and inherits it): `statx`/`newfstatat`,
//! `clock_nanosleep`, `poll`, `write`, `getpid` are in it, and `kill` is allowed for the
//! launcher's own pid only (launch/seccomp.rs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The timeout when `--watchdog-timeout-ms` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5000);
/// The shortest timeout accepted: shorter ones would fence on ordinary scheduling jitter.
pub const MIN_TIMEOUT_MS: u64 = 500;
/// The longest timeout accepted (ten minutes): beyond that it no longer fences in time.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// How often the watchdog thread looks at the file.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Errors of the watchdog's flags and thread.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// `--watchdog-timeout-ms` without `--watchdog-file`.
    #[error("--watchdog-timeout-ms needs --watchdog-file (the file that noded keeps touching)")]
    TimeoutWithoutFile,
    /// A timeout out of range.
    #[error(
        "--watchdog-timeout-ms {0} is out of range: give {MIN_TIMEOUT_MS} to {MAX_TIMEOUT_MS} milliseconds"
    )]
    TimeoutOutOfRange(u64),
    /// An empty path.
    #[error("--watchdog-file needs a path (the file that noded keeps touching)")]
    EmptyPath,
    /// The thread could not be started.
    #[error("cannot start the watchdog thread: {0}")]
    Spawn(std::io::Error),
}

/// What one look at the file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Touched within the timeout (or in the future).
    Fresh,
    /// Last touched `age` ago, longer than the timeout.
    Stale {
        /// How long ago.
        age: Duration,
    },
    /// Missing or not stat-able: the OS error.
    Unreadable(String),
}

/// A launcher's watchdog: the file and how long it may go untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watchdog {
    /// The file noded touches.
    pub file: PathBuf,
    /// How long it may go untouched.
    pub timeout: Duration,
}

impl Watchdog {
    /// From `--watchdog-file` and `--watchdog-timeout-ms` (None without a file).
    pub fn from_args(
        file: Option<&Path>,
        timeout_ms: Option<u64>,
    ) -> Result<Option<Self>, WatchdogError> {
        let Some(file) = file else {
            return match timeout_ms {
                Some(_) => Err(WatchdogError::TimeoutWithoutFile),
                None => Ok(None),
            };
        };
        if file.as_os_str().is_empty() {
            return Err(WatchdogError::EmptyPath);
        }
        let timeout = match timeout_ms {
            None => DEFAULT_TIMEOUT,
            Some(ms) if (MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&ms) => {
                Duration::from_millis(ms)
            }
            Some(ms) => return Err(WatchdogError::TimeoutOutOfRange(ms)),
        };
        Ok(Some(Self {
            file: file.to_path_buf(),
            timeout,
        }))
    }

    /// Looks at the file, with `now` as the current wall-clock time.
    pub fn check(&self, now: SystemTime) -> Check {
        match std::fs::metadata(&self.file).and_then(|m| m.modified()) {
            Err(e) => Check::Unreadable(e.to_string()),
            Ok(mtime) => match now.duration_since(mtime) {
                Ok(age) if age > self.timeout => Check::Stale { age },
                // Err: touched "in the future" (the clock was stepped back): fresh.
                _ => Check::Fresh,
            },
        }
    }

    /// The line written when fencing for `check`, or None when `check` is fresh.
    pub fn fence_line(&self, check: &Check) -> Option<String> {
        let file = self.file.display();
        match check {
            Check::Fresh => None,
            Check::Stale { age } => Some(format!(
                "watchdog: not fed for {} ms (file {file}); killing the VM (fencing)",
                age.as_millis()
            )),
            Check::Unreadable(e) => Some(format!(
                "watchdog: not fed (file {file}: {e}); killing the VM (fencing)"
            )),
        }
    }

    /// Checks the file now, fencing at once if it is stale; then starts the thread that
    /// keeps checking it. Call it before the guest runs, after the process seccomp filter
    /// is installed (the thread inherits it).
    pub fn start(self) -> Result<(), WatchdogError> {
        self.check_or_fence();
        tracing::info!(
            file = %self.file.display(),
            timeout_ms = self.timeout.as_millis() as u64,
            "watchdog armed"
        );
        let started = Instant::now();
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                // Sleep to absolute deadlines, so that the checks do not drift.
                let mut next = started;
                loop {
                    next += CHECK_INTERVAL;
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    } else {
                        // Late (a host stall, say): check now, and start again from now.
                        next = Instant::now();
                    }
                    self.check_or_fence();
                }
            })
            .map_err(WatchdogError::Spawn)?;
        Ok(())
    }

    fn check_or_fence(&self) {
        if let Some(line) = self.fence_line(&self.check(SystemTime::now())) {
            fence(&line);
        }
    }
}

/// Writes `line` to stderr if that cannot block, then SIGKILLs this process.
fn fence(line: &str) -> ! {
    let msg = format!("{line}\n");
    let mut pfd = libc::pollfd {
        fd: libc::STDERR_FILENO,
        events: libc::POLLOUT,
        revents: 0,
    };
    // A stderr pipe that nobody drains (its reader is the frozen noded) must not keep the
    // guest running: write the line only if stderr takes it now, and without Rust's
    // stderr lock, which another thread may hold while blocked on that very pipe.
    // SAFETY: poll on one pollfd that lives on this stack frame, timeout 0.
    if unsafe { libc::poll(&mut pfd, 1, 0) } == 1 && pfd.revents & libc::POLLOUT != 0 {
        // SAFETY: write(2) from a live buffer of msg.len() bytes; a short write is fine.
        let _ = unsafe { libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), msg.len()) };
    }
    // SAFETY: kill(2) of this very process; SIGKILL cannot be caught, nothing runs after.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    // Only if kill was refused (it is allowed for our own pid by the seccomp filter):
    // SIGKILL to a thread ends its whole process too.
    // SAFETY: tgkill(2) of the calling thread of this process.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGKILL,
        )
    };
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dog(file: &Path, ms: u64) -> Watchdog {
        Watchdog::from_args(Some(file), Some(ms)).unwrap().unwrap()
    }

    #[test]
    fn a_file_is_fresh_within_the_timeout_and_stale_after_it() {
        let dir = std::env::temp_dir().join(format!("launcher-wd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("feed");
        let wd = dog(&file, 1000);
        let missing = wd.check(SystemTime::now());
        assert!(matches!(missing, Check::Unreadable(_)), "{missing:?}");
        let line = wd.fence_line(&missing).unwrap();
        assert!(
            line.starts_with("watchdog: not fed (file ")
                && line.ends_with("killing the VM (fencing)"),
            "{line}"
        );
        std::fs::write(&file, b"").unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        for (now, fresh) in [
            (mtime, true),
            (mtime + Duration::from_millis(1000), true),
            (mtime + Duration::from_millis(1001), false),
            // Touched in the future (the clock was stepped back): fresh.
            (mtime - Duration::from_secs(3600), true),
        ] {
            let c = wd.check(now);
            assert_eq!(c == Check::Fresh, fresh, "{c:?} at {now:?}");
            assert_eq!(wd.fence_line(&c).is_none(), fresh);
        }
        let stale = wd.check(mtime + Duration::from_millis(1500));
        assert_eq!(
            stale,
            Check::Stale {
                age: Duration::from_millis(1500)
            }
        );
        assert_eq!(
            wd.fence_line(&stale).unwrap(),
            format!(
                "watchdog: not fed for 1500 ms (file {}); killing the VM (fencing)",
                file.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flags_are_checked() {
        assert!(Watchdog::from_args(None, None).unwrap().is_none());
        assert!(matches!(
            Watchdog::from_args(None, Some(1000)),
            Err(WatchdogError::TimeoutWithoutFile)
        ));
        let p = Path::new("/w");
        assert_eq!(
            Watchdog::from_args(Some(p), None).unwrap().unwrap().timeout,
            DEFAULT_TIMEOUT
        );
        for ms in [MIN_TIMEOUT_MS, MAX_TIMEOUT_MS] {
            assert!(Watchdog::from_args(Some(p), Some(ms)).is_ok());
        }
        for ms in [0, MIN_TIMEOUT_MS - 1, MAX_TIMEOUT_MS + 1, u64::MAX] {
            let e = Watchdog::from_args(Some(p), Some(ms))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("--watchdog-timeout-ms {ms} is out of range")),
                "{e}"
            );
        }
        assert!(matches!(
            Watchdog::from_args(Some(Path::new("")), None),
            Err(WatchdogError::EmptyPath)
        ));
    }
}

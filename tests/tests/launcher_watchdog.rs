//! The launcher's fencing watchdog (`--watchdog-file`, launcher/src/watchdog.rs): while
//! its file is touched the VM runs; once it is not, the launcher kills itself with SIGKILL
//! and its guest stops. A launcher whose file is missing or stale at start never runs its
//! guest. This is how a node whose noded is frozen fences its VMs (docs/cluster.md).

use std::fs::OpenOptions;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use integration_tests::{guests, launcher_cmd, path_str, wait_new_pass, Launcher, TempDir};

/// Sets the file's mtime to `when`, creating it if needed (what noded's feeding does).
fn touch_at(path: &Path, when: SystemTime) {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(when))
        .expect("touch the watchdog file");
}

/// A thread touching a file every 100 ms until dropped (stands in for noded).
struct Feeder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Feeder {
    fn start(path: PathBuf) -> Self {
        touch_at(&path, SystemTime::now());
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                touch_at(&path, SystemTime::now());
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pattern_args<'a>(watchdog: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--kernel",
        path_str(guests::pattern_path()),
        "--memory",
        "64Mi",
        "--cmdline",
        "mib=4 every=20",
        "--watchdog-file",
        watchdog,
    ];
    a.extend_from_slice(extra);
    a
}

fn assert_fenced(l: &mut Launcher) {
    let status = l.wait();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "expected death by SIGKILL, got {status:?}; stderr:\n{}",
        l.stderr()
    );
    let err = l.stderr();
    assert!(
        err.contains("watchdog: not fed") && err.contains("killing the VM (fencing)"),
        "no fencing line on stderr:\n{err}"
    );
}

#[test]
fn a_fed_launcher_runs_and_kills_itself_once_no_longer_fed() {
    let dir = TempDir::new("watchdog-feed");
    let serial = dir.join("console.log");
    let wd = dir.join("watchdog");
    let feeder = Feeder::start(wd.clone());
    let mut l = Launcher::run(
        &pattern_args(path_str(&wd), &["--watchdog-timeout-ms", "1000"]),
        &serial,
        None,
    );
    // Fed for at least three timeouts, the guest keeps making progress (wait_new_pass
    // fails if the launcher exits).
    let fed_since = Instant::now();
    let mut passes = 0;
    while fed_since.elapsed() < Duration::from_secs(3) || passes < 2 {
        wait_new_pass(&mut l);
        passes += 1;
    }
    assert!(l.alive(), "stderr:\n{}", l.stderr());
    drop(feeder);
    assert_fenced(&mut l);
    assert!(
        l.stderr().contains(&format!("(file {})", wd.display())),
        "{}",
        l.stderr()
    );
    // Its guest printed while fed, and prints nothing more.
    let at_death = l.console();
    assert!(at_death.contains("pass="), "console:\n{at_death}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(l.console(), at_death, "the guest printed after the fence");
}

#[test]
fn a_launcher_whose_file_is_missing_or_stale_at_start_never_runs_its_guest() {
    let dir = TempDir::new("watchdog-unfed");
    let stale = dir.join("stale");
    touch_at(&stale, SystemTime::now() - Duration::from_secs(3600));
    let missing = dir.join("missing");
    let incoming = format!("unix:{}", dir.join("m.sock").display());
    let cases: [(&str, Vec<&str>); 3] = [
        ("missing", pattern_args(path_str(&missing), &[])),
        (
            "stale",
            pattern_args(path_str(&stale), &["--watchdog-timeout-ms", "2000"]),
        ),
        (
            "incoming",
            vec![
                "--incoming",
                &incoming,
                "--watchdog-file",
                path_str(&missing),
            ],
        ),
    ];
    for (name, args) in cases {
        let serial = dir.join(&format!("{name}.log"));
        let mut l = Launcher::run(&args, &serial, None);
        assert_fenced(&mut l);
        let console = l.console();
        assert!(
            !console.contains("pattern:"),
            "{name}: the guest ran:\n{console}"
        );
    }
    // The stale file is reported with how long it has not been fed.
    let err = std::fs::read_to_string(dir.join("stale.stderr")).unwrap_or_default();
    assert!(err.contains("watchdog: not fed for "), "{err}");
}

#[test]
fn bad_watchdog_flags_are_refused_with_the_reason() {
    let pattern = path_str(guests::pattern_path());
    let base = ["run", "--kernel", pattern, "--memory", "64Mi"];
    for (extra, why) in [
        (
            &["--watchdog-timeout-ms", "1000"][..],
            "--watchdog-timeout-ms needs --watchdog-file",
        ),
        (
            &[
                "--watchdog-file",
                "/nonexistent/w",
                "--watchdog-timeout-ms",
                "100",
            ][..],
            "--watchdog-timeout-ms 100 is out of range: give 500 to 600000 milliseconds",
        ),
    ] {
        let mut argv = base.to_vec();
        argv.extend_from_slice(extra);
        let out = launcher_cmd(&argv);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{argv:?}: {err}");
        assert!(err.contains(why), "{argv:?}: {err}");
    }
}

//! Helpers for the integration tests: find the built binaries and tiny guests,
//! run launchers as child processes, and read their console logs.
//!
//! Every wait here has a generous *safety* deadline that only keeps a broken
//! build from hanging CI; no test asserts on how long anything took.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use test_guests as guests;

pub mod tls_ca;

pub mod proxy;

pub mod netns;

/// How long any single wait may take before the test gives up (safety only).
pub const SAFETY: Duration = Duration::from_secs(120);

/// The directory holding the workspace's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug; a benchmark binary is in target/debug.
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
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
        Self::run_in(None, args, serial, api)
    }

    /// [`Launcher::run`] with `cwd` as the working directory (relative paths in `args`
    /// stay relative in the VM's configuration, e.g. for files that are committed).
    pub fn run_in(cwd: Option<&Path>, args: &[&str], serial: &Path, api: Option<&Path>) -> Self {
        let mut cmd = Command::new(bin("launcher"));
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
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

// ---------------------------------------------------------------------------
// Live-migration helpers (tests/tests/migration.rs, tests/tests/migration_faults.rs).
// ---------------------------------------------------------------------------

/// `path` as UTF-8 (test paths always are).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `console` up to and including its last newline (a running guest may be in the middle
/// of printing a line).
pub fn complete_lines(console: &str) -> &str {
    console.rfind('\n').map_or("", |i| &console[..=i])
}

/// The highest `pass=` number in the complete lines of a `pattern` console (0 if none).
pub fn last_pass(console: &str) -> u64 {
    pattern_passes(complete_lines(console))
        .into_iter()
        .max()
        .unwrap_or(0)
}

/// Check the `pattern` console invariants over a console log that may span several
/// launchers (one boot, any number of migrations): exactly one boot banner, no stale
/// page, every `pass=N` line comes after exactly N `B` markers since the banner and the
/// numbers go up by `every`. A pass lost, repeated or printed twice across a handover
/// breaks the count.
pub fn assert_pattern_consistent(console: &str, every: u64) {
    assert!(!console.contains("STALE"), "stale page:\n{console}");
    assert_eq!(
        pattern_boots(console),
        1,
        "the guest booted more than once (or never):\n{console}"
    );
    assert_pass_markers(complete_lines(console), every);
}

/// The `pattern` pass invariants over `console`: every `pass=N` line comes after exactly N
/// `B` markers, and the numbers go up by `every` from 0 (one boot and any number of
/// continuations of it: a restore or a migration does not restart the count).
pub fn assert_pass_markers(console: &str, every: u64) {
    let mut markers = 0u64;
    let mut last = 0u64;
    for line in console.lines() {
        markers += line.matches('B').count() as u64;
        if let Some(n) = line.trim().strip_prefix("pass=") {
            let n: u64 = n
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad line {line:?}"));
            assert_eq!(n, last + every, "pass numbers skip or repeat:\n{console}");
            assert_eq!(
                markers, n,
                "pass={n} printed after {markers} pass markers:\n{console}"
            );
            last = n;
        }
    }
}

/// The `J<seq>` numbers of the `blkjournal` guest in the complete lines of `console`.
pub fn journal_seqs(console: &str) -> Vec<u32> {
    complete_lines(console)
        .lines()
        .filter_map(|l| l.strip_prefix('J'))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The last `J<seq>` number of `console` (0 before the first).
pub fn last_journal_seq(console: &str) -> u32 {
    journal_seqs(console).last().copied().unwrap_or(0)
}

/// `launcher migrate` arguments that keep a migration in pre-copy until something else
/// ends it: a small bandwidth cap, an unreachable downtime target, and no timeouts.
pub const CAPPED: &[&str] = &[
    "--max-bandwidth",
    "2000000",
    "--downtime-ms",
    "1",
    "--completion-timeout-per-gib",
    "0",
    "--progress-timeout",
    "0",
];

/// Call `f` every `interval` until it returns true or `limit` has passed (then false).
pub fn poll(limit: Duration, interval: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
    true
}

/// Wait until the `pattern` console (shared by all launchers of one VM) shows a pass
/// number above `after`, while `l` runs; returns that number. Panics on a stale page.
pub fn wait_pass_beyond(l: &mut Launcher, after: u64) -> u64 {
    let text = wait_console_until(l, &format!("a pass= line above {after}"), |c| {
        c.contains("STALE") || last_pass(c) > after
    });
    assert!(!text.contains("STALE"), "stale page:\n{text}");
    last_pass(&text)
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for a test).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Start `launcher run --incoming URI` with its console appended to `serial` and an API
/// socket; returns once the API answers (the migration listener is bound before the API
/// socket, so the destination is ready to be connected to).
pub fn incoming(uri: &str, serial: &Path, api_sock: &Path) -> Launcher {
    let mut l = Launcher::run(&["--incoming", uri], serial, Some(api_sock));
    l.wait_api();
    l
}

/// `launcher migrate` running in the background (killed on drop).
pub struct MigrateJob {
    child: Option<Child>,
    dir: PathBuf,
}

/// How a `launcher migrate` ended: its exit status, the JSON report it printed and stderr.
#[derive(Debug)]
pub struct MigrateOutcome {
    /// Exit status of `launcher migrate`.
    pub status: ExitStatus,
    /// The report (`Null` when stdout held no JSON).
    pub report: serde_json::Value,
    /// What it printed on stderr (progress lines, errors).
    pub stderr: String,
}

impl MigrateOutcome {
    /// A string field of the report ("" when absent).
    pub fn str(&self, key: &str) -> &str {
        self.report.get(key).and_then(|v| v.as_str()).unwrap_or("")
    }

    /// An integer field of the report (panics when absent).
    pub fn u64(&self, key: &str) -> u64 {
        self.report
            .get(key)
            .and_then(|v| v.as_u64())
            .unwrap_or_else(|| panic!("report has no integer {key:?}: {}", self.report))
    }
}

impl MigrateJob {
    /// Start `launcher migrate --api-socket API --to TO <extra>`; stdout and stderr go to
    /// files in `dir`.
    pub fn start(api_sock: &Path, to: &str, extra: &[&str], dir: &Path) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = dir.join(format!("migrate-{}", N.fetch_add(1, Ordering::SeqCst)));
        std::fs::create_dir_all(&dir).expect("migrate job dir");
        let out = std::fs::File::create(dir.join("stdout")).expect("stdout file");
        let err = std::fs::File::create(dir.join("stderr")).expect("stderr file");
        let child = Command::new(bin("launcher"))
            .arg("migrate")
            .arg("--api-socket")
            .arg(api_sock)
            .arg("--to")
            .arg(to)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn launcher migrate");
        Self {
            child: Some(child),
            dir,
        }
    }

    /// True while `launcher migrate` runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Wait for it to end (safety deadline) and parse its report.
    pub fn finish(mut self) -> MigrateOutcome {
        let mut child = self.child.take().expect("child");
        let deadline = Instant::now() + SAFETY;
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "launcher migrate did not end within the safety deadline; stderr:\n{}",
                    std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default();
        let stderr = std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
        let report = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l.trim()).ok())
            .unwrap_or(serde_json::Value::Null);
        MigrateOutcome {
            status,
            report,
            stderr,
        }
    }
}

impl Drop for MigrateJob {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run `launcher migrate` to its end.
pub fn migrate(api_sock: &Path, to: &str, extra: &[&str], dir: &Path) -> MigrateOutcome {
    MigrateJob::start(api_sock, to, extra, dir).finish()
}

/// `GET /v1/migrate` on a source launcher: the progress object.
pub fn migrate_progress(api_sock: &Path) -> serde_json::Value {
    let (status, v) = api(api_sock, "GET", "/v1/migrate", None);
    assert_eq!(status, 200, "GET /v1/migrate: {v}");
    v
}

/// Poll `GET /v1/migrate` until `pred` holds for a progress object (safety deadline),
/// returning every distinct object seen (in order) up to and including that one. Panics
/// if the migration ends first (`job` no longer running).
pub fn wait_progress(
    api_sock: &Path,
    job: &mut MigrateJob,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + SAFETY;
    let mut seen: Vec<serde_json::Value> = Vec::new();
    loop {
        let p = migrate_progress(api_sock);
        if p.get("iteration").is_some() && seen.last() != Some(&p) {
            seen.push(p.clone());
        }
        if pred(&p) {
            return seen;
        }
        assert!(
            job.running(),
            "the migration ended before {what}; progress seen: {seen:?}"
        );
        assert!(
            Instant::now() < deadline,
            "{what} never happened; progress seen: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /v1/status` → the `state` field.
pub fn vm_state(api_sock: &Path) -> String {
    let (status, v) = api(api_sock, "GET", "/v1/status", None);
    assert_eq!(status, 200, "GET /v1/status: {v}");
    v.get("state")
        .and_then(|s| s.as_str())
        .unwrap_or_default()
        .to_string()
}

/// Send SIGKILL to a child launcher (by its pid) and reap it.
pub fn kill_hard(l: &mut Launcher) -> ExitStatus {
    let _ = l.child.kill();
    l.child.wait().expect("wait for killed launcher")
}

/// Stop a launcher through `PUT /v1/shutdown` and check that it exits 0.
pub fn shutdown(l: &mut Launcher) {
    let sock = l.api.clone().expect("API socket");
    let (status, body) = api(&sock, "PUT", "/v1/shutdown", None);
    assert_eq!(status, 200, "shutdown refused: {body}");
    let st = l.wait();
    assert_eq!(st.code(), Some(0), "stderr: {}", l.stderr());
}

/// Wait until the `pattern` guest prints a pass number above the highest one in its
/// console now (it is still making progress); returns it.
pub fn wait_new_pass(l: &mut Launcher) -> u64 {
    let now = last_pass(&l.console());
    wait_pass_beyond(l, now)
}

/// A real `launcher` binary built from this tree with `LAUNCHER_VERSION=version`, for
/// update tests that need two launcher versions that truly differ. Built once per
/// version into `target/versions/<version>/launcher` (a separate cargo target
/// directory, `target/versions/build`, so the workspace's own build is untouched);
/// concurrent tests and test binaries wait on a file lock.
pub fn launcher_of_version(version: &str) -> PathBuf {
    launcher_of_version_with(version, &[])
}

/// The build-time knobs of the launcher (see launcher/build.rs); each build sets all of
/// them, empty unless given, so that the caller's environment cannot leak into a build.
pub const LAUNCHER_KNOBS: &[&str] = &[
    "LAUNCHER_EXTRA_MACHINE_TYPES",
    "LAUNCHER_WITHOUT_MACHINE_TYPES",
    "LAUNCHER_MIGRATION_PROTOCOL_MIN",
    "LAUNCHER_MIGRATION_PROTOCOL_MAX",
];

/// [`launcher_of_version`] with build-time knobs (`LAUNCHER_EXTRA_MACHINE_TYPES`, ...), for
/// launchers with another machine-type list or protocol window. Cached per version and
/// knobs in `target/versions/<version>[-<hash of the knobs>]/launcher`.
pub fn launcher_of_version_with(version: &str, env: &[(&str, &str)]) -> PathBuf {
    use std::os::fd::AsRawFd;
    for (k, _) in env {
        assert!(
            LAUNCHER_KNOBS.contains(k),
            "{k} is not a launcher build knob"
        );
    }
    let mut knobs: Vec<(&str, &str)> = env.iter().copied().filter(|(_, v)| !v.is_empty()).collect();
    knobs.sort();
    let key = if knobs.is_empty() {
        version.to_string()
    } else {
        let text: String = knobs.iter().map(|(k, v)| format!("{k}={v};")).collect();
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        format!("{version}-{hash:016x}")
    };
    let target = bin_dir().parent().expect("target dir").to_path_buf();
    let out_dir = target.join("versions").join(&key);
    let out = out_dir.join("launcher");
    std::fs::create_dir_all(&out_dir).expect("create versions dir");
    let lock = std::fs::File::create(target.join("versions").join(".lock")).expect("lock file");
    // SAFETY: flock on a file we own; blocks until other builders are done.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    // Rebuild when the tree's launcher is newer than our copy (the tree changed).
    let tree_launcher = bin_dir().join("launcher");
    let fresh = match (std::fs::metadata(&out), std::fs::metadata(&tree_launcher)) {
        (Ok(a), Ok(b)) => a.modified().ok() >= b.modified().ok(),
        _ => false,
    };
    if !fresh {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let build_dir = target.join("versions").join("build");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--quiet", "-p", "launcher", "--bin", "launcher"])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&build_dir)
            .env("LAUNCHER_VERSION", version);
        for k in LAUNCHER_KNOBS {
            let v = knobs.iter().find(|(n, _)| n == k).map_or("", |(_, v)| *v);
            cmd.env(k, v);
        }
        let status = cmd
            .status()
            .expect("run cargo build for a second launcher version");
        assert!(status.success(), "building launcher {key} failed");
        let tmp = out_dir.join("launcher.tmp");
        std::fs::copy(build_dir.join("debug").join("launcher"), &tmp).expect("copy launcher");
        std::fs::rename(&tmp, &out).expect("rename launcher");
    }
    // SAFETY: releasing our own lock.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_UN) };
    let reported = Command::new(&out)
        .arg("--version")
        .output()
        .expect("launcher --version");
    let text = String::from_utf8_lossy(&reported.stdout);
    assert!(
        text.trim() == format!("launcher {version}"),
        "{} reports {text:?}, expected version {version}",
        out.display()
    );
    out
}

pub mod node;

pub mod cluster;

pub mod run_watch;

/// SIGKILL a child process by pid (one the caller spawned and has not reaped yet).
pub fn kill_pid(pid: u32) {
    // SAFETY: kill(2) on the pid of a child the caller spawned and has not reaped yet.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// The API socket of a launcher started with one.
pub fn api_of(l: &Launcher) -> &Path {
    l.api.as_deref().expect("API socket")
}

/// Boot the `pattern` guest (64 MiB, a 4 MiB region, a `pass=` line every `every`
/// passes) with its console in `serial` and its API on `api`, and wait for two
/// `pass=` lines: the usual source of a migration test.
pub fn boot_pattern_source(serial: &Path, api: &Path, every: u64) -> Launcher {
    let cmdline = format!("mib=4 every={every}");
    let mut l = Launcher::run(
        &[
            "--kernel",
            path_str(guests::pattern_path()),
            "--memory",
            "64Mi",
            "--cmdline",
            &cmdline,
        ],
        serial,
        Some(api),
    );
    l.wait_api();
    wait_console_until(&mut l, "two pass= lines", |c| last_pass(c) >= 2 * every);
    l
}

//! Migration benchmark: our launcher against QEMU 7.2, migrating the same tiny guest
//! between two processes on this host, in the same run.
//!
//! ```text
//! cargo run --release -p benches --bin migrate [-- --runs N] [--no-write]
//!                                              [--launcher PATH] [--qemu PATH]
//! ```
//!
//! Guests: an idle one (`timer` counting 10 ms ticks, halted in between) and `pattern`
//! rewriting a 32 MiB region in a loop (`mib=32 every=0`); guest memory 256 MiB and
//! 1 GiB. Modes:
//! - **copy**: ours `launcher migrate --to unix:...` (bandwidth unlimited, downtime
//!   target 300 ms, the defaults); QEMU `migrate unix:...` after
//!   `migrate-set-parameters {max-bandwidth: 1e12, downtime-limit: 300}` (QEMU's default
//!   cap is 128 MiB/s).
//! - **local**: ours `--local` (the memfds are handed over, no page copied); QEMU 7.2's
//!   closest equivalent, guest RAM in a shared file (`memory-backend-file`, `/dev/shm`,
//!   `share=on`) mapped by both processes with the `x-ignore-shared` capability, so
//!   that its RAM is not copied either.
//!
//! Per migration it records total time, downtime, bytes on the wire and throughput
//! (bytes over total time), from our report (`launcher migrate` JSON) and from QEMU's
//! `query-migrate` (`total-time`, `downtime`, `ram.transferred`). It also measures the
//! raw Unix-socket throughput (two threads, 1 MiB writes) in the same run. It prints a
//! Markdown table of medians with the ratios ours/QEMU and, unless `--no-write`, writes
//! it to `docs/migration-benchmarks.md` together with the command.

use benches::{median, workspace_root};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Safety deadline for any wait (kills hung children; never part of a result).
const SAFETY: Duration = Duration::from_secs(120);
/// Everything from this line on in the doc is hand-written and kept on regeneration.
const NOTES_MARKER: &str = "<!-- hand-written notes below: kept when the table is regenerated -->";
/// How long a guest runs after its banner before it is migrated.
const WARM: Duration = Duration::from_millis(500);

struct Opts {
    runs: usize,
    write: bool,
    launcher: Option<PathBuf>,
    qemu: String,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        runs: 3,
        write: true,
        launcher: None,
        qemu: "qemu-system-x86_64".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .unwrap_or_else(|| fail(&format!("{name} needs a value")))
        };
        match a.as_str() {
            "--runs" => {
                o.runs = val("--runs")
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| fail("--runs takes a positive number"))
            }
            "--no-write" => o.write = false,
            "--launcher" => o.launcher = Some(PathBuf::from(val("--launcher"))),
            "--qemu" => o.qemu = val("--qemu"),
            "-h" | "--help" => {
                println!("usage: migrate [--runs N] [--no-write] [--launcher PATH] [--qemu PATH]");
                std::process::exit(0);
            }
            other => fail(&format!("unknown argument {other:?} (try --help)")),
        }
    }
    o
}

fn first_line(cmd: &str, args: &[&str]) -> String {
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

// ---------------------------------------------------------------------------------
// Processes and files
// ---------------------------------------------------------------------------------

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("lvm-bench-migrate-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| fail(&format!("mkdir {}: {e}", p.display())));
        Self(p)
    }
    fn join(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child killed (SIGKILL) and reaped on drop.
struct Proc(Child);

impl Proc {
    fn spawn(cmd: &mut Command, what: &str) -> Self {
        Proc(
            cmd.stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| fail(&format!("cannot start {what}: {e}"))),
        )
    }
    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
    fn wait(&mut self) -> Option<i32> {
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

fn file_out(p: &Path) -> Stdio {
    Stdio::from(std::fs::File::create(p).unwrap_or_else(|e| fail(&format!("{}: {e}", p.display()))))
}

/// Wait until `path` contains `needle` while `proc` runs.
fn wait_file(path: &Path, needle: &str, proc: &mut Proc, what: &str) {
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

fn wait_socket(path: &Path, proc: &mut Proc, what: &str) {
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

// ---------------------------------------------------------------------------------
// Guests and results
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Guest {
    Idle,
    Pattern,
}

impl Guest {
    fn name(self) -> &'static str {
        match self {
            Guest::Idle => "idle (timer)",
            Guest::Pattern => "pattern mib=32",
        }
    }
    fn kernel(self) -> &'static Path {
        match self {
            Guest::Idle => test_guests::timer_path(),
            Guest::Pattern => test_guests::pattern_path(),
        }
    }
    fn cmdline(self) -> &'static str {
        match self {
            // About 11 days of ticks: it stays idle for the whole benchmark.
            Guest::Idle => "lapic=100000000 pit=100000000",
            Guest::Pattern => "mib=32 every=0",
        }
    }
    fn banner(self) -> &'static str {
        match self {
            Guest::Idle => "timer: booted",
            Guest::Pattern => "pattern: booted",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Copy,
    Local,
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    transferred: f64,
    iterations: f64,
}

impl Sample {
    /// Bytes on the wire over the whole migration time.
    fn throughput(&self) -> f64 {
        if self.total_ms > 0.0 {
            self.transferred / (self.total_ms / 1e3)
        } else {
            0.0
        }
    }
}

// ---------------------------------------------------------------------------------
// Ours
// ---------------------------------------------------------------------------------

fn http(sock: &Path, method: &str, path: &str) -> Option<Value> {
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

fn ours_once(launcher: &Path, guest: Guest, mib: u64, mode: Mode) -> Sample {
    let d = Scratch::new("ours");
    let log = d.join("console.log");
    let (a, b, mig) = (d.join("a.sock"), d.join("b.sock"), d.join("mig.sock"));
    let mut src = Proc::spawn(
        Command::new(launcher)
            .arg("run")
            .arg("--kernel")
            .arg(guest.kernel())
            .args([
                "--memory",
                &format!("{mib}Mi"),
                "--cmdline",
                guest.cmdline(),
            ])
            .arg("--serial")
            .arg(&log)
            .arg("--api-socket")
            .arg(&a)
            .stdout(Stdio::null())
            .stderr(file_out(&d.join("src.err"))),
        "the source launcher",
    );
    wait_file(&log, guest.banner(), &mut src, "the source launcher");
    wait_socket(&a, &mut src, "the source launcher");
    let uri = format!("unix:{}", mig.display());
    let mut dst = Proc::spawn(
        Command::new(launcher)
            .args(["run", "--incoming", &uri])
            .arg("--serial")
            .arg(d.join("dst.log"))
            .arg("--api-socket")
            .arg(&b)
            .stdout(Stdio::null())
            .stderr(file_out(&d.join("dst.err"))),
        "the destination launcher",
    );
    wait_socket(&b, &mut dst, "the destination launcher");
    std::thread::sleep(WARM);
    let mut cmd = Command::new(launcher);
    cmd.arg("migrate")
        .arg("--api-socket")
        .arg(&a)
        .args(["--to", &uri]);
    if mode == Mode::Local {
        cmd.arg("--local");
    }
    let out = cmd
        .stderr(Stdio::null())
        .output()
        .unwrap_or_else(|e| fail(&format!("launcher migrate: {e}")));
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| fail(&format!("launcher migrate printed no report: {:?}", out)));
    if report["status"] != "completed" {
        fail(&format!("our migration failed: {report}"));
    }
    if src.wait() != Some(64) {
        fail("the source launcher did not exit 64 after the migration");
    }
    match http(&b, "GET", "/v1/status") {
        Some(v) if v["state"] == "running" => {}
        other => fail(&format!(
            "the destination does not run the guest: {other:?}"
        )),
    }
    let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
    Sample {
        total_ms: f("totalMs"),
        downtime_ms: f("downtimeMs"),
        transferred: f("transferredBytes"),
        iterations: f("iterations"),
    }
}

// ---------------------------------------------------------------------------------
// QEMU
// ---------------------------------------------------------------------------------

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, proc: &mut Proc) -> Self {
        wait_socket(path, proc, "QEMU");
        let s = UnixStream::connect(path).unwrap_or_else(|e| fail(&format!("QMP connect: {e}")));
        s.set_read_timeout(Some(SAFETY)).ok();
        let w = s.try_clone().expect("clone");
        let mut q = Qmp {
            r: BufReader::new(s),
            w,
        };
        q.line(); // greeting
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(n) if n > 0 => serde_json::from_str(&l).unwrap_or(Value::Null),
            _ => fail("QMP connection closed"),
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        writeln!(self.w, "{msg}").unwrap_or_else(|e| fail(&format!("QMP write: {e}")));
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                fail(&format!("QMP {name}: {e}"));
            }
            // An event: skip.
        }
    }
}

fn qemu_cmd(o: &Opts, guest: Guest, mib: u64, mode: Mode, shm: &Path, qmp: &Path) -> Command {
    let mut c = Command::new(&o.qemu);
    c.args([
        "-accel",
        "kvm",
        "-m",
        &format!("{mib}M"),
        "-nographic",
        "-no-reboot",
    ]);
    match mode {
        Mode::Copy => {
            c.args(["-M", "q35"]);
        }
        Mode::Local => {
            c.arg("-object")
                .arg(format!(
                    "memory-backend-file,id=ram0,size={mib}M,mem-path={},share=on",
                    shm.display()
                ))
                .args(["-M", "q35,memory-backend=ram0"]);
        }
    }
    c.arg("-kernel")
        .arg(guest.kernel())
        .args(["-append", guest.cmdline()])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c
}

fn qemu_once(o: &Opts, guest: Guest, mib: u64, mode: Mode) -> Sample {
    let d = Scratch::new("qemu");
    let shm = PathBuf::from(format!("/dev/shm/lvm-bench-migrate-{}", std::process::id()));
    let _ = std::fs::remove_file(&shm);
    let (sq, dq, mig) = (d.join("src.qmp"), d.join("dst.qmp"), d.join("mig.sock"));
    let log = d.join("src.log");
    let mut src = Proc::spawn(
        qemu_cmd(o, guest, mib, mode, &shm, &sq)
            .stdout(file_out(&log))
            .stderr(file_out(&d.join("src.err"))),
        "QEMU (source)",
    );
    wait_file(&log, guest.banner(), &mut src, "QEMU (source)");
    let mut dst = Proc::spawn(
        qemu_cmd(o, guest, mib, mode, &shm, &dq)
            .args(["-incoming", "defer"])
            .stdout(file_out(&d.join("dst.log")))
            .stderr(file_out(&d.join("dst.err"))),
        "QEMU (destination)",
    );
    let mut qs = Qmp::connect(&sq, &mut src);
    let mut qd = Qmp::connect(&dq, &mut dst);
    if mode == Mode::Local {
        let caps = json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        qs.cmd("migrate-set-capabilities", caps.clone());
        qd.cmd("migrate-set-capabilities", caps);
    }
    let uri = format!("unix:{}", mig.display());
    qd.cmd("migrate-incoming", json!({"uri": uri}));
    qs.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1_000_000_000_000u64, "downtime-limit": 300}),
    );
    std::thread::sleep(WARM);
    qs.cmd("migrate", json!({"uri": uri}));
    let end = Instant::now() + SAFETY;
    let info = loop {
        let v = qs.cmd("query-migrate", json!({}));
        match v["status"].as_str() {
            Some("completed") => break v,
            Some("failed") | Some("cancelled") => fail(&format!("QEMU migration failed: {v}")),
            _ => {}
        }
        if Instant::now() > end {
            fail("QEMU migration did not complete");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // The destination runs the guest.
    let end = Instant::now() + SAFETY;
    loop {
        let st = qd.cmd("query-status", json!({}));
        if st["status"] == "running" {
            break;
        }
        if Instant::now() > end {
            fail(&format!("the QEMU destination does not run: {st}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop((qs, qd));
    drop((src, dst));
    let _ = std::fs::remove_file(&shm);
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    Sample {
        total_ms: f(&info["total-time"]),
        downtime_ms: f(&info["downtime"]),
        transferred: f(&info["ram"]["transferred"]),
        iterations: f(&info["ram"]["dirty-sync-count"]),
    }
}

// ---------------------------------------------------------------------------------
// Raw socket throughput
// ---------------------------------------------------------------------------------

/// Bytes per second through a Unix stream socket pair, one writer and one reader
/// thread, 1 MiB writes, 4 GiB in total.
fn socket_throughput() -> f64 {
    const CHUNK: usize = 1 << 20;
    const TOTAL: usize = 4 << 30;
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0usize;
        while got < TOTAL {
            match b.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    let buf = vec![0x5au8; CHUNK];
    let t = Instant::now();
    let mut sent = 0usize;
    while sent < TOTAL {
        a.write_all(&buf).expect("socket write");
        sent += CHUNK;
    }
    let got = reader.join().expect("reader");
    let secs = t.elapsed().as_secs_f64();
    got as f64 / secs
}

// ---------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------

struct Row {
    guest: Guest,
    mib: u64,
    mode: Mode,
    ours: Vec<Sample>,
    qemu: Vec<Sample>,
}

fn med(v: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    median(v.iter().map(f).collect())
}

fn fmt_ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}", a / b)
    } else {
        "n/a".into()
    }
}

fn mib_s(v: f64) -> String {
    format!("{:.0}", v / (1 << 20) as f64)
}

fn size(mib: u64) -> String {
    if mib >= 1024 {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

fn main() {
    let o = parse_args();
    if !Path::new("/dev/kvm").exists() {
        fail("/dev/kvm is missing: this benchmark runs KVM guests");
    }
    let launcher = launcher_path(&o);
    let qemu_version = first_line(&o.qemu, &["--version"]);
    if qemu_version == "unknown" || qemu_version.is_empty() {
        fail(&format!(
            "cannot run {}: install qemu-system-x86 (apt-get install qemu-system-x86)",
            o.qemu
        ));
    }
    let launcher_version = first_line(launcher.to_str().unwrap_or("launcher"), &["--version"]);

    let mut rows = Vec::new();
    for guest in [Guest::Idle, Guest::Pattern] {
        for mib in [256u64, 1024] {
            for mode in [Mode::Copy, Mode::Local] {
                rows.push(Row {
                    guest,
                    mib,
                    mode,
                    ours: Vec::new(),
                    qemu: Vec::new(),
                });
            }
        }
    }
    let mut sockets = Vec::new();
    for i in 0..o.runs {
        sockets.push(socket_throughput());
        for (k, row) in rows.iter_mut().enumerate() {
            eprint!(
                "\rmigrate: run {}/{}, case {}/{}   ",
                i + 1,
                o.runs,
                k + 1,
                8
            );
            // Alternate which VMM goes first.
            if (i + k) % 2 == 0 {
                row.ours
                    .push(ours_once(&launcher, row.guest, row.mib, row.mode));
                row.qemu.push(qemu_once(&o, row.guest, row.mib, row.mode));
            } else {
                row.qemu.push(qemu_once(&o, row.guest, row.mib, row.mode));
                row.ours
                    .push(ours_once(&launcher, row.guest, row.mib, row.mode));
            }
        }
        sockets.push(socket_throughput());
    }
    eprintln!();
    let socket = median(sockets.clone());

    let mut t = String::new();
    t.push_str("| guest | RAM | mode | total ms ours | total ms QEMU | ratio | downtime ms ours | downtime ms QEMU | ratio | MiB sent ours | MiB sent QEMU | MiB/s ours | MiB/s QEMU | ours / socket | QEMU / socket | iterations ours / QEMU |\n");
    t.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        let (ot, qt) = (med(&r.ours, |s| s.total_ms), med(&r.qemu, |s| s.total_ms));
        let (od, qd) = (
            med(&r.ours, |s| s.downtime_ms),
            med(&r.qemu, |s| s.downtime_ms),
        );
        let (ob, qb) = (
            med(&r.ours, |s| s.transferred),
            med(&r.qemu, |s| s.transferred),
        );
        let (op, qp) = (
            med(&r.ours, Sample::throughput),
            med(&r.qemu, Sample::throughput),
        );
        let (oi, qi) = (
            med(&r.ours, |s| s.iterations),
            med(&r.qemu, |s| s.iterations),
        );
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {:.3} | {:.3} | {} / {} |\n",
            r.guest.name(),
            size(r.mib),
            match r.mode {
                Mode::Copy => "copy",
                Mode::Local => "local",
            },
            fmt_ms(ot),
            fmt_ms(qt),
            ratio(ot, qt),
            fmt_ms(od),
            fmt_ms(qd),
            ratio(od, qd),
            ob / (1 << 20) as f64,
            qb / (1 << 20) as f64,
            mib_s(op),
            mib_s(qp),
            op / socket,
            qp / socket,
            oi,
            qi,
        ));
    }
    let socket_line = format!(
        "Raw Unix-socket throughput in the same run (two threads, 1 MiB writes, 4 GiB, median of {}): **{} MiB/s**.",
        sockets.len(),
        mib_s(socket)
    );
    println!("{t}\n{socket_line}");

    if o.write {
        let doc = workspace_root().join("docs/migration-benchmarks.md");
        let mut text = render_doc(&o, &t, &socket_line, &launcher_version, &qemu_version);
        // Hand-written notes after the marker survive a regeneration.
        if let Some(i) = std::fs::read_to_string(&doc)
            .ok()
            .and_then(|old| old.find(NOTES_MARKER).map(|i| old[i..].to_string()))
        {
            text.push('\n');
            text.push_str(&i);
        }
        std::fs::write(&doc, text)
            .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", doc.display())));
        eprintln!("migrate: wrote {}", doc.display());
    }
}

fn render_doc(o: &Opts, table: &str, socket: &str, ours: &str, qemu: &str) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    format!(
        r#"# Migration benchmarks

Written by `benches/src/bin/migrate.rs`; regenerate with

```
cargo run --release -p benches --bin migrate -- --runs {runs}
```

Machine: {cpu}, {ncpu} vCPUs, Linux {kernel} (nested KVM, see `docs/platform.md`).
Ours: `{ours}` (release build). QEMU: `{qemu}`.

Each cell is the median of {runs} migrations. Every migration is between two fresh
processes on this host over a Unix socket; the guest runs for 0.5 s after its banner
before the migration starts, and the benchmark checks afterwards that the destination
runs the guest (our `GET /v1/status`, QEMU's `query-status`) and that our source exited
with status 64.

{table}
{socket}

## What is measured

- **total**: ours `total_ms` of the `launcher migrate` report (from the request to the
  destination's `Started`); QEMU `query-migrate` `total-time`.
- **downtime**: ours `downtime_ms` (from the source's pause to the destination's resume,
  by `CLOCK_REALTIME` on both sides); QEMU `downtime`.
- **MiB sent**: ours `transferred_bytes` (every byte written to the stream, headers
  included); QEMU `ram.transferred`.
- **MiB/s**: bytes sent over total time, for both; **/ socket**: that throughput over the
  raw socket throughput above.
- **iterations**: ours `iterations`, QEMU `ram.dirty-sync-count`.

## Commands

Ours (copy; `--local` for local mode):

```
launcher run --kernel pattern.elf --memory 256M --cmdline "mib=32 every=0" --serial LOG --api-socket A.sock
launcher run --incoming unix:MIG.sock --serial LOG2 --api-socket B.sock
launcher migrate --api-socket A.sock --to unix:MIG.sock [--local]      # defaults: no bandwidth cap, 300 ms target
```

QEMU (copy):

```
qemu-system-x86_64 -accel kvm -m 256M -nographic -no-reboot -M q35 -kernel pattern.elf -append "mib=32 every=0" -qmp unix:SRC.qmp,server=on,wait=off
qemu-system-x86_64 ... same ... -qmp unix:DST.qmp,server=on,wait=off -incoming defer
DST: {{"execute": "migrate-incoming", "arguments": {{"uri": "unix:MIG.sock"}}}}
SRC: {{"execute": "migrate-set-parameters", "arguments": {{"max-bandwidth": 1000000000000, "downtime-limit": 300}}}}
SRC: {{"execute": "migrate", "arguments": {{"uri": "unix:MIG.sock"}}}}
SRC: {{"execute": "query-migrate"}}   (polled every 2 ms until "completed")
```

QEMU "local": QEMU 7.2 cannot hand memory fds over; its closest equivalent maps guest
RAM from one shared file in both processes and skips it with `x-ignore-shared`:
`-object memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/...,share=on -M q35,memory-backend=ram0`
on both sides, and `migrate-set-capabilities` `x-ignore-shared: true` on both before
`migrate-incoming` / `migrate`.

The idle guest is `timer` with `lapic=100000000 pit=100000000` (halted between 100 Hz
ticks); the busy guest is `pattern` with `mib=32 every=0` (it rewrites the first dword of
each of the 8192 pages of its 32 MiB region on every pass and checks them all).
"#,
        runs = o.runs,
        ncpu = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel = kernel.trim(),
    )
}

fn fail(msg: &str) -> ! {
    benches::fail("migrate", msg)
}

fn launcher_path(o: &Opts) -> PathBuf {
    benches::launcher_path("migrate", o.launcher.as_ref())
}

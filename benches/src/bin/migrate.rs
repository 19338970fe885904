//! Migration benchmark: our launcher against QEMU 7.2, migrating the same tiny guest
//! between two processes on this host, in the same run.
//!
//! ```text
//! cargo run --release -p benches --bin migrate -- [--runs N] [--write-docs] [--cases ...]
//!     [--filled-mib 1024 --filled-mib 4096] [--bitmap] [--launcher PATH] [--qemu PATH]
//! ```
//!
//! Guests: an idle one (`timer` counting 10 ms ticks, halted in between), `pattern`
//! rewriting a 32 MiB region in a loop (`mib=32 every=0`), on 256 MiB and 1 GiB; and a
//! guest whose memory is full of data (`pattern fill=1 busy=1`) on 1 GiB (and 4 GiB when
//! asked). Modes:
//! - **copy**: ours `launcher migrate --to unix:...` (bandwidth unlimited, downtime
//!   target 300 ms, the defaults); QEMU `migrate unix:...` after
//!   `migrate-set-parameters {max-bandwidth: 1e12, downtime-limit: 300}` (QEMU's default
//!   cap is 128 MiB/s). The filled guest also over TCP with TLS 1.3 on both.
//! - **local**: ours `--local` (the memfds are handed over, no page copied); QEMU 7.2's
//!   closest equivalent, guest RAM in a shared file (`memory-backend-file`, `/dev/shm`,
//!   `share=on`) mapped by both processes with the `x-ignore-shared` capability, so
//!   that its RAM is not copied either.
//!
//! Per migration it records total time, downtime, bytes on the wire and throughput
//! (bytes over total time), from our report (`launcher migrate` JSON) and from QEMU's
//! `query-migrate` (`total-time`, `downtime`, `ram.transferred`). It also measures the
//! raw Unix-socket and TCP-loopback throughput (two threads, 1 MiB writes) in the same
//! run. It prints a Markdown table of medians with the ratios ours/QEMU and, with
//! `--write-docs`, writes it to `docs/migration-benchmarks.md` together with the command.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use benches::{median, workspace_root};
use clap::Parser;

#[path = "migrate/procs.rs"]
mod procs;
#[path = "migrate/vmms.rs"]
mod vmms;

/// Safety deadline for any wait (kills hung children; never part of a result).
const SAFETY: Duration = Duration::from_secs(120);
/// Everything from this line on in the doc is hand-written and kept on regeneration.
const NOTES_MARKER: &str = "<!-- hand-written notes below: kept when the table is regenerated -->";
/// How long a guest runs after its banner before it is migrated.
const WARM: Duration = Duration::from_millis(500);

/// Our launcher against QEMU 7.2, migrating the same tiny guests, in one run.
#[derive(Parser)]
#[command(name = "migrate")]
struct Opts {
    /// Migrations per case and VMM (the table shows medians).
    #[arg(long, default_value_t = 3, value_parser = benches::positive)]
    runs: usize,
    /// `--write-docs` (the table into docs/migration-benchmarks.md) and `--launcher`.
    #[command(flatten)]
    common: benches::CommonArgs,
    /// Which cases: the classic table (idle and pattern guests), the filled guest, or both.
    #[arg(long, value_enum, default_value_t = Cases::All)]
    cases: Cases,
    /// Memory sizes (MiB) of the filled guest; repeatable.
    #[arg(long = "filled-mib", default_values_t = [1024u64])]
    filled_mib: Vec<u64>,
    /// Our source uses the dirty bitmap only (`launcher run --dirty-ring off`).
    #[arg(long)]
    bitmap: bool,
    /// QEMU binary.
    #[arg(long, default_value = benches::QEMU)]
    qemu: String,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Cases {
    All,
    Classic,
    Filled,
}

/// What every migration needs.
struct Ctx {
    launcher: PathBuf,
    qemu: String,
    bitmap: bool,
    tls: TlsDirs,
}

/// Certificates of one CA for both VMMs' TLS migrations.
struct TlsDirs {
    _scratch: procs::Scratch,
    ours_src: PathBuf,
    ours_dst: PathBuf,
    qemu_server: PathBuf,
    qemu_client: PathBuf,
}

impl TlsDirs {
    fn new() -> Self {
        let s = procs::Scratch::new("tls");
        let ca = integration_tests::tls_ca::Ca::new("bench CA");
        let (ours_src, ours_dst) = (s.join("src"), s.join("dst"));
        ca.tls_dir(&ours_src, &["source.test"]);
        ca.tls_dir(&ours_dst, &["127.0.0.1"]);
        // QEMU's x509 directory layout: ca-cert.pem, {server,client}-{cert,key}.pem.
        let qemu_dir = |name: &str, role: &str| {
            let d = s.join(name);
            ca.tls_dir(&d, &["127.0.0.1"]);
            let mv = |from: &str, to: String| {
                std::fs::rename(d.join(from), d.join(to))
                    .unwrap_or_else(|e| fail(&format!("TLS files: {e}")))
            };
            mv("ca.pem", "ca-cert.pem".into());
            mv("cert.pem", format!("{role}-cert.pem"));
            mv("key.pem", format!("{role}-key.pem"));
            d
        };
        let qemu_server = qemu_dir("qemu-server", "server");
        let qemu_client = qemu_dir("qemu-client", "client");
        TlsDirs {
            _scratch: s,
            ours_src,
            ours_dst,
            qemu_server,
            qemu_client,
        }
    }
}

// ---------------------------------------------------------------------------------
// Guests and results
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Guest {
    Idle,
    Pattern,
    Filled,
}

impl Guest {
    fn name(self) -> &'static str {
        match self {
            Guest::Idle => "idle (timer)",
            Guest::Pattern => "pattern mib=32",
            Guest::Filled => "filled (pattern fill=1)",
        }
    }
    fn kernel(self) -> &'static Path {
        match self {
            Guest::Idle => test_guests::timer_path(),
            Guest::Pattern | Guest::Filled => test_guests::pattern_path(),
        }
    }
    /// The command line for a guest of `mib` MiB.
    fn cmdline(self, mib: u64) -> String {
        match self {
            // About 11 days of ticks: it stays idle for the whole benchmark.
            Guest::Idle => "lapic=100000000 pit=100000000".into(),
            Guest::Pattern => "mib=32 every=0".into(),
            // All RAM below 2 GiB from 4 MiB on, but the last 4 MiB: QEMU's q35 keeps
            // only 2 GiB below 4 GiB once a guest has 2.75 GiB or more.
            Guest::Filled => format!("mib={} fill=1 busy=1 every=0", mib.min(2048) - 8),
        }
    }
    fn banner(self) -> &'static str {
        match self {
            Guest::Idle => "timer: booted",
            Guest::Pattern => "pattern: booted",
            Guest::Filled => "pattern: filled",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Copy,
    Local,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Unix,
    Tls,
}

/// One row of the table.
struct Case {
    guest: Guest,
    mib: u64,
    mode: Mode,
    transport: Transport,
}

#[derive(Clone, Debug, Default)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    transferred: f64,
    iterations: f64,
    /// Ours: dirty tracking and switch-over boost.
    note: String,
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
// Raw socket throughput
// ---------------------------------------------------------------------------------

/// Bytes per second from `a` to `b`, one writer and one reader thread, 1 MiB writes,
/// 4 GiB in total.
fn pair_throughput<S: Read + Write + Send + 'static>(mut a: S, mut b: S) -> f64 {
    const CHUNK: usize = 1 << 20;
    const TOTAL: usize = 4 << 30;
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
    got as f64 / t.elapsed().as_secs_f64()
}

fn unix_throughput() -> f64 {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    pair_throughput(a, b)
}

fn tcp_throughput() -> f64 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    pair_throughput(a, b)
}

// ---------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------

struct Row {
    case: Case,
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

fn cases(o: &Opts) -> Vec<Case> {
    let mut v = Vec::new();
    if o.cases != Cases::Filled {
        for guest in [Guest::Idle, Guest::Pattern] {
            for mib in [256u64, 1024] {
                for mode in [Mode::Copy, Mode::Local] {
                    v.push(Case {
                        guest,
                        mib,
                        mode,
                        transport: Transport::Unix,
                    });
                }
            }
        }
    }
    if o.cases != Cases::Classic {
        for &mib in &o.filled_mib {
            for transport in [Transport::Unix, Transport::Tls] {
                v.push(Case {
                    guest: Guest::Filled,
                    mib,
                    mode: Mode::Copy,
                    transport,
                });
            }
        }
    }
    v
}

fn main() {
    let o = Opts::parse();
    if !Path::new("/dev/kvm").exists() {
        fail("/dev/kvm is missing: this benchmark runs KVM guests");
    }
    if o.filled_mib.iter().any(|&m| !(64..=65536).contains(&m)) {
        fail("--filled-mib takes sizes from 64 to 65536 MiB");
    }
    let launcher = o.common.launcher("migrate");
    let qemu_version = benches::first_line(&o.qemu, &["--version"]);
    if qemu_version == "unknown" || qemu_version.is_empty() {
        fail(&format!(
            "cannot run {}: install qemu-system-x86 (apt-get install qemu-system-x86)",
            o.qemu
        ));
    }
    let launcher_version =
        benches::first_line(launcher.to_str().unwrap_or("launcher"), &["--version"]);
    let ctx = Ctx {
        launcher,
        qemu: o.qemu.clone(),
        bitmap: o.bitmap,
        tls: TlsDirs::new(),
    };
    let mut rows: Vec<Row> = cases(&o)
        .into_iter()
        .map(|case| Row {
            case,
            ours: Vec::new(),
            qemu: Vec::new(),
        })
        .collect();
    let (mut unix, mut tcp) = (Vec::new(), Vec::new());
    let n = rows.len();
    for i in 0..o.runs {
        unix.push(unix_throughput());
        tcp.push(tcp_throughput());
        for (k, row) in rows.iter_mut().enumerate() {
            eprint!("\rmigrate: run {}/{}, case {}/{n}   ", i + 1, o.runs, k + 1);
            // Alternate which VMM goes first.
            if (i + k) % 2 == 0 {
                row.ours.push(vmms::ours_once(&ctx, &row.case));
                row.qemu.push(vmms::qemu_once(&ctx, &row.case));
            } else {
                row.qemu.push(vmms::qemu_once(&ctx, &row.case));
                row.ours.push(vmms::ours_once(&ctx, &row.case));
            }
        }
        unix.push(unix_throughput());
        tcp.push(tcp_throughput());
    }
    eprintln!();
    let (unix, tcp) = (median(unix), median(tcp));
    let t = table(&rows, unix, tcp);
    let socket_line = format!(
        "Raw socket throughput in the same run (two threads, 1 MiB writes, 4 GiB, median of {}): Unix **{} MiB/s**, TCP loopback **{} MiB/s**.",
        2 * o.runs,
        mib_s(unix),
        mib_s(tcp)
    );
    println!("{t}\n{socket_line}");
    write_doc(&o, &t, &socket_line, &launcher_version, &qemu_version);
}

fn table(rows: &[Row], unix: f64, tcp: f64) -> String {
    let mut t = String::new();
    t.push_str("| guest | RAM | mode | link | total ms ours | total ms QEMU | ratio | downtime ms ours | downtime ms QEMU | ratio | MiB sent ours | MiB sent QEMU | MiB/s ours | MiB/s QEMU | ours / socket | QEMU / socket | iterations ours / QEMU | ours: tracking, boost |\n");
    t.push_str(
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
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
        let (link, socket) = match r.case.transport {
            Transport::Unix => ("unix", unix),
            Transport::Tls => ("tcp+tls", tcp),
        };
        t.push_str(&format!(
            "| {} | {} | {} | {link} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {:.3} | {:.3} | {} / {} | {} |\n",
            r.case.guest.name(),
            size(r.case.mib),
            match r.case.mode {
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
            r.ours.first().map_or("", |s| s.note.as_str()),
        ));
    }
    t
}

/// With `--write-docs`: the table into docs/migration-benchmarks.md, keeping the
/// hand-written notes after [`NOTES_MARKER`].
fn write_doc(o: &Opts, t: &str, socket_line: &str, ours: &str, qemu: &str) {
    const DOC: &str = "docs/migration-benchmarks.md";
    let mut text = render_doc(o, t, socket_line, ours, qemu);
    if let Some(i) = std::fs::read_to_string(workspace_root().join(DOC))
        .ok()
        .and_then(|old| old.find(NOTES_MARKER).map(|i| old[i..].to_string()))
    {
        text.push('\n');
        text.push_str(&i);
    }
    o.common.docs.write("migrate", DOC, &text);
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
cargo run --release -p benches --bin migrate -- --runs {runs} --write-docs{filled}
```

Machine: {cpu}, {ncpu} vCPUs, Linux {kernel} (nested KVM, see `docs/platform.md`).
Ours: `{ours}` (release build). QEMU: `{qemu}`.

Each cell is the median of {runs} migrations. Every migration is between two fresh
processes on this host, over a Unix socket or over TCP on the loopback with TLS 1.3
(mutual certificates on both VMMs); the guest runs for 0.5 s after its banner
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
  raw throughput of the same kind of socket (Unix, or plain TCP on the loopback for the
  TLS rows) measured in the same run.
- **ours: tracking, boost**: which dirty tracking our source used (KVM's dirty ring or
  the bitmap) and the scheduling boost of the switch-over threads.
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
each of the 8192 pages of its 32 MiB region on every pass and checks them all). The
filled guest is `pattern` with `fill=1 busy=1 every=0` and a region of all RAM below
2 GiB but 8 MiB (1016 MiB of a 1 GiB guest; 2040 MiB of a 4 GiB guest, whose other
2 GiB stay unwritten, because QEMU's q35 has only 2 GiB of RAM below 4 GiB at that
size and the guest maps only the first 4 GiB): it writes non-zero data into every byte
of the region at CPL3, then keeps rewriting the first MiB.

TLS: ours `launcher run --incoming tcp:127.0.0.1:PORT --tls-dir D` and `launcher migrate
--to tcp:127.0.0.1:PORT --tls-dir S`; QEMU `-object tls-creds-x509,id=tls0,dir=...,
endpoint=server|client,verify-peer=on` and `migrate-set-parameters {{"tls-creds": "tls0"}}`
on both sides, one CA for all.
"#,
        runs = o.runs,
        filled = o
            .filled_mib
            .iter()
            .map(|m| format!(" --filled-mib {m}"))
            .collect::<String>(),
        ncpu = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel = kernel.trim(),
    )
}

fn fail(msg: &str) -> ! {
    benches::fail("migrate", msg)
}

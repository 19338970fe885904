//! Disk benchmark: requests from the `blkjournal` guest on our virtio-blk (raw file
//! backend), the same guest under QEMU 7.2's virtio-blk-pci in the same run, and the same
//! pattern of `pwrite`/`pread` on a raw file from the host.
//!
//! ```text
//! cargo run --release -p benches --bin disk [-- --runs N] [--count N] [--disk-mib N]
//!                         [--large-kib K] [--large-count N] [--large-depth D]
//!                         [--dir DIR] [--launcher PATH] [--qemu PATH] [--write-docs]
//! ```
//!
//! Per run, on a fresh sparse image of `--disk-mib` MiB (default 64) in `--dir` (default
//! the system temp directory), three workloads, each measured three ways:
//! - **small requests**: `bench=all count=N` (default 8192): four modes in this order,
//!   `seqw`, `seqr`, `randw`, `randr` (sequential: 4 KiB block i modulo the disk's blocks;
//!   random: xorshift32 from a fixed seed), 4 KiB, one request in flight;
//! - **large requests**: `bench=seqw bench=seqr bs_kib=K count=N` (defaults 1024 KiB, 1024
//!   requests, so 1 GiB per mode), once with one request in flight and once with
//!   `--large-depth` (default 4) in flight.
//!
//! The three ways:
//! - **guest**: `launcher run` boots `blkjournal` with the workload's keys
//!   (tests/guests/README.md), the image as its disk and its serial console on a pipe,
//!   polled (no interrupts); write modes end with one FLUSH (fdatasync on the host), inside
//!   the timed part. Time per mode = host timestamp of the line
//!   `blkbench: <mode> <n> requests ...` minus that of `blkbench: <mode> start` (each
//!   stamped when its `\n` arrives on the pipe). The guest's own `rdtsc` delta, converted
//!   with the host TSC rate measured here, is printed as a cross-check.
//! - **QEMU**: the same guest and command line with `-M q35`, a modern virtio-blk-pci on
//!   the image (`cache=writeback`), timed the same way.
//! - **host**: the same block sequence with `pwrite`/`pread` of the same request size on
//!   another fresh image of the same size, one at a time (rotating over as many buffers as
//!   the guest has requests in flight, the same memory footprint), then `fdatasync` after
//!   the write modes, timed with `Instant`.
//!
//! All go through the host page cache (no O_DIRECT): reads after writes are cache hits in
//! every case. The tables show medians over the runs and, with `--write-docs`, are written
//! to `docs/disk-benchmarks.md` (hand-written notes below the marker are kept).

use benches::{median, workspace_root};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NOTES_MARKER: &str = "<!-- hand-written notes below: kept when the table is regenerated -->";
const BLOCK: u64 = 4096;
const MODES: [&str; 4] = ["seqw", "seqr", "randw", "randr"];
/// The large-request part: sequential only.
const LARGE_MODES: [&str; 2] = ["seqw", "seqr"];

/// What one guest boot runs: the modes, requests per mode, request size, requests in
/// flight.
#[derive(Clone, Copy)]
struct Workload {
    modes: &'static [&'static str],
    count: u32,
    bytes: u64,
    depth: u32,
}

impl Workload {
    /// The guest's command line (tests/guests/README.md, "Benchmark keys").
    fn cmdline(&self) -> String {
        let modes: Vec<String> = self.modes.iter().map(|m| format!("bench={m}")).collect();
        format!(
            "{} count={} bs_kib={} depth={}",
            modes.join(" "),
            self.count,
            self.bytes / 1024,
            self.depth
        )
    }
}

/// Command line (see the module comment).
#[derive(clap::Parser)]
#[command(about = "virtio-blk benchmark: the blkjournal guest against the host's pread/pwrite")]
struct Opts {
    /// Runs (the table shows medians).
    #[arg(long, default_value_t = 3, value_parser = benches::positive)]
    runs: usize,
    /// 4 KiB requests per pattern.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Size of the disk image in MiB.
    #[arg(long = "disk-mib", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    disk_mib: u64,
    /// Request size of the large-request part, in KiB (a multiple of 4; times
    /// --large-depth at most 8192, the guest's buffer region).
    #[arg(long = "large-kib", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(4..=8192))]
    large_kib: u32,
    /// Requests per pattern in the large-request part.
    #[arg(long = "large-count", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    large_count: u32,
    /// Requests in flight in the large-request part (1 to 8).
    #[arg(long = "large-depth", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=8))]
    large_depth: u32,
    /// Directory for the image (default: the system's temporary directory).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    #[command(flatten)]
    common: benches::CommonArgs,
    /// The QEMU binary.
    #[arg(long, default_value = benches::QEMU)]
    qemu: String,
}

fn parse_args() -> Opts {
    <Opts as clap::Parser>::parse()
}

fn fresh_image(path: &Path, mib: u64) {
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path)
        .and_then(|f| f.set_len(mib << 20))
        .unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
}

/// The guest's block sequence for one mode (same generator as blkjournal.c).
fn blocks(random: bool, count: u32, nblocks: u32) -> Vec<u64> {
    let mut x: u32 = 0x2545_f491;
    (0..count)
        .map(|i| {
            if random {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                u64::from(x % nblocks)
            } else {
                u64::from(i % nblocks)
            }
        })
        .collect()
}

/// Per mode: (seconds by serial timestamps, guest TSC cycles).
type GuestRun = Vec<(f64, u64)>;

/// `launcher run` of the `blkjournal` benchmark on `image`.
fn launcher_cmd(launcher: &Path, image: &Path, w: &Workload) -> Command {
    let mut c = Command::new(launcher);
    c.args(["run", "--kernel"])
        .arg(test_guests::blkjournal_path())
        .args(["--cmdline", &w.cmdline()])
        .args(["--memory", "32Mi", "--serial", "stdio", "--disk"])
        .arg(format!("path={}", image.display()));
    c
}

/// The same guest under QEMU: q35, a modern-only virtio-blk-pci (device id 0x1042, as the
/// guest looks for) on the raw image through the page cache (`cache=writeback`, as ours),
/// QEMU's default AIO (a thread pool) and its own ioeventfd.
fn qemu_cmd(qemu: &str, image: &Path, w: &Workload) -> Command {
    let mut c = Command::new(qemu);
    c.args(["-accel", "kvm", "-M", "q35", "-m", "32", "-nodefaults"])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(test_guests::blkjournal_path())
        .args(["-append", &w.cmdline()])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=raw,cache=writeback",
            image.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]);
    c
}

fn run_guest(mut cmd: Command, w: &Workload) -> GuestRun {
    let count = w.count;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("{:?}: {e}", cmd.get_program())));
    let mut out = child.stdout.take().expect("stdout");
    // Each line with the time its newline arrived.
    let mut lines: Vec<(Instant, String)> = Vec::new();
    let mut cur = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = out.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        let now = Instant::now();
        for &b in &chunk[..n] {
            if b == b'\n' {
                lines.push((now, String::from_utf8_lossy(&cur).into_owned()));
                cur.clear();
            } else {
                cur.push(b);
            }
        }
        if lines.last().is_some_and(|(_, l)| l == "blkbench: done") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = || {
        lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    w.modes
        .iter()
        .map(|m| {
            let start = lines
                .iter()
                .find(|(_, l)| *l == format!("blkbench: {m} start"))
                .unwrap_or_else(|| fail(&format!("no `{m} start` line in:\n{}", text())));
            let prefix = format!("blkbench: {m} {count} requests ");
            let end = lines
                .iter()
                .find(|(_, l)| l.starts_with(&prefix))
                .unwrap_or_else(|| fail(&format!("no `{m}` result line in:\n{}", text())));
            let tsc = end
                .1
                .rsplit_once("tsc=")
                .and_then(|(_, t)| t.trim().parse().ok())
                .unwrap_or(0);
            ((end.0 - start.0).as_secs_f64(), tsc)
        })
        .collect()
}

/// Seconds per mode for the same pattern with pread/pwrite on the host, one request at a
/// time, of the workload's request size.
fn run_host(image: &Path, w: &Workload, disk_bytes: u64) -> Vec<f64> {
    let nblocks = u32::try_from(disk_bytes / w.bytes).unwrap_or(u32::MAX);
    let block = w.bytes;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap_or_else(|e| fail(&format!("{}: {e}", image.display())));
    w.modes
        .iter()
        .map(|m| {
            let write = m.ends_with('w');
            let seq = blocks(m.starts_with("rand"), w.count, nblocks);
            // As many buffers as the guest has requests in flight, used in turn: the same
            // memory footprint (and cache behaviour) as the guest's.
            let mut bufs: Vec<Vec<u8>> = (0..w.depth)
                .map(|_| {
                    (0..block as u32)
                        .map(|i| (i * 7 + u32::from(write)) as u8)
                        .collect()
                })
                .collect();
            let t0 = Instant::now();
            for (k, b) in seq.iter().enumerate() {
                let buf = &mut bufs[k % w.depth as usize];
                let r = if write {
                    f.write_all_at(buf, b * block)
                } else {
                    f.read_exact_at(buf, b * block)
                };
                r.unwrap_or_else(|e| fail(&format!("host {m}: {e}")));
            }
            if write {
                f.sync_data()
                    .unwrap_or_else(|e| fail(&format!("fdatasync: {e}")));
            }
            t0.elapsed().as_secs_f64()
        })
        .collect()
}

/// Host TSC ticks per second (the guest's TSC runs at the host rate under KVM unless scaled).
fn tsc_hz() -> f64 {
    // SAFETY: rdtsc has no memory effects; x86-64 only, as is the whole project.
    let t = || unsafe { core::arch::x86_64::_rdtsc() };
    let (c0, i0) = (t(), Instant::now());
    std::thread::sleep(Duration::from_millis(200));
    let (c1, i1) = (t(), Instant::now());
    (c1 - c0) as f64 / (i1 - i0).as_secs_f64()
}

/// Per mode: samples of (ours s, ours by TSC s, QEMU s, host s).
type Samples = Vec<Vec<(f64, f64, f64, f64)>>;

/// One run of a workload: ours, QEMU and the host, each on a fresh image; the samples are
/// appended to `samples` (indexed like `w.modes`).
fn run_all(o: &Opts, launcher: &Path, image: &Path, w: &Workload, hz: f64, samples: &mut Samples) {
    fresh_image(image, o.disk_mib);
    let g = run_guest(launcher_cmd(launcher, image, w), w);
    fresh_image(image, o.disk_mib);
    let q = run_guest(qemu_cmd(&o.qemu, image, w), w);
    fresh_image(image, o.disk_mib);
    let h = run_host(image, w, o.disk_mib << 20);
    let bytes = f64::from(w.count) * w.bytes as f64;
    for (i, m) in w.modes.iter().enumerate() {
        let (gs, tsc) = g[i];
        let ts = tsc as f64 / hz;
        eprintln!(
            "disk: {} KiB x{} {m}: ours {:.1} MB/s ({:.1} by TSC), QEMU {:.1} MB/s, host {:.1} MB/s",
            w.bytes / 1024,
            w.depth,
            bytes / gs / 1e6,
            bytes / ts / 1e6,
            bytes / q[i].0 / 1e6,
            bytes / h[i] / 1e6
        );
        samples[i].push((gs, ts, q[i].0, h[i]));
    }
}

fn mode_name(m: &str) -> &'static str {
    match m {
        "seqw" => "sequential write (+1 flush)",
        "seqr" => "sequential read",
        "randw" => "random write (+1 flush)",
        _ => "random read",
    }
}

/// Medians of one mode's samples: (ours, ours by TSC, QEMU, host) seconds.
fn medians(s: &[(f64, f64, f64, f64)]) -> (f64, f64, f64, f64) {
    (
        median(s.iter().map(|x| x.0).collect()),
        median(s.iter().map(|x| x.1).collect()),
        median(s.iter().map(|x| x.2).collect()),
        median(s.iter().map(|x| x.3).collect()),
    )
}

fn main() {
    let o = parse_args();
    if !o.large_kib.is_multiple_of(4) || o.large_kib * o.large_depth > 8192 {
        fail("--large-kib must be a multiple of 4 and --large-kib x --large-depth at most 8192");
    }
    let launcher = o.common.launcher("disk");
    let hz = tsc_hz();
    let image = o
        .dir
        .join(format!("lvm-diskbench-{}.img", std::process::id()));
    let small = Workload {
        modes: &MODES,
        count: o.count,
        bytes: BLOCK,
        depth: 1,
    };
    // Large requests one at a time, and --large-depth of them in flight.
    let mut depths = vec![1];
    if o.large_depth > 1 {
        depths.push(o.large_depth);
    }
    let large: Vec<Workload> = depths
        .iter()
        .map(|&depth| Workload {
            modes: &LARGE_MODES,
            count: o.large_count,
            bytes: u64::from(o.large_kib) * 1024,
            depth,
        })
        .collect();
    let mut samples: Samples = vec![Vec::new(); MODES.len()];
    let mut large_samples: Vec<Samples> = vec![vec![Vec::new(); LARGE_MODES.len()]; large.len()];
    for run in 0..o.runs {
        eprintln!("disk: run {run}");
        run_all(&o, &launcher, &image, &small, hz, &mut samples);
        for (w, s) in large.iter().zip(large_samples.iter_mut()) {
            run_all(&o, &launcher, &image, w, hz, s);
        }
    }
    let _ = std::fs::remove_file(&image);
    let bytes = f64::from(o.count) * BLOCK as f64;
    let mut table = String::from(
        "| 4 KiB pattern | launcher (virtio-blk) | by guest TSC | QEMU 7.2 | host pread/pwrite | launcher IOPS | QEMU IOPS | launcher / QEMU | launcher / host |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (i, m) in MODES.iter().enumerate() {
        let (g, t, q, h) = medians(&samples[i]);
        table.push_str(&format!(
            "| {} | {:.1} MB/s | {:.1} MB/s | {:.1} MB/s | {:.1} MB/s | {:.0} | {:.0} | {:.2} | {:.3} |\n",
            mode_name(m),
            bytes / g / 1e6,
            bytes / t / 1e6,
            bytes / q / 1e6,
            bytes / h / 1e6,
            f64::from(o.count) / g,
            f64::from(o.count) / q,
            q / g,
            h / g
        ));
    }
    let lbytes = f64::from(o.large_count) * f64::from(o.large_kib) * 1024.0;
    let mut ltable = format!(
        "| {} KiB pattern | in flight | launcher (virtio-blk) | by guest TSC | QEMU 7.2 | host pread/pwrite | launcher / QEMU | launcher / host |\n|---|---|---|---|---|---|---|---|\n",
        o.large_kib
    );
    for (i, m) in LARGE_MODES.iter().enumerate() {
        for (w, s) in large.iter().zip(&large_samples) {
            let (g, t, q, h) = medians(&s[i]);
            ltable.push_str(&format!(
                "| {} | {} | {:.1} MB/s | {:.1} MB/s | {:.1} MB/s | {:.1} MB/s | {:.2} | {:.2} |\n",
                mode_name(m),
                w.depth,
                lbytes / g / 1e6,
                lbytes / t / 1e6,
                lbytes / q / 1e6,
                lbytes / h / 1e6,
                q / g,
                h / g
            ));
        }
    }
    println!("{table}\n{ltable}");
    {
        let path = workspace_root().join("docs/disk-benchmarks.md");
        let notes = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.find(NOTES_MARKER).map(|i| t[i..].to_string()))
            .unwrap_or_else(|| format!("{NOTES_MARKER}\n"));
        let doc = format!(
            "# virtio-blk benchmark\n\nGenerated by `cargo run --release -p benches --bin disk -- --runs {} \
             --count {} --disk-mib {} --large-kib {} --large-count {} --large-depth {} --write-docs` \
             (medians over the runs; 2-core nested-KVM machine, see docs/platform.md), on a fresh \
             sparse {} MiB raw image on {} for each of the three columns; host TSC {:.0} MHz. How it \
             is measured: see the module comment of `benches/src/bin/disk.rs` and the notes below.\n\n\
             **Small requests**: {} requests of 4 KiB per pattern, one in flight.\n\n{table}\n\
             **Large requests**: {} requests of {} KiB per pattern, one in flight and {} in flight \
             in the guest (the host baseline issues them one at a time, rotating over as many \
             buffers as the guest has requests in flight).\n\n{ltable}\n{notes}",
            o.runs,
            o.count,
            o.disk_mib,
            o.large_kib,
            o.large_count,
            o.large_depth,
            o.disk_mib,
            o.dir.display(),
            hz / 1e6,
            o.count,
            o.large_count,
            o.large_kib,
            o.large_depth,
        );
        o.common.docs.write("disk", "docs/disk-benchmarks.md", &doc);
    }
}

fn fail(msg: &str) -> ! {
    benches::fail("disk", msg)
}

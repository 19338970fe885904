//! Disk benchmark: 4 KiB requests from the `blkjournal` guest on our virtio-blk (raw file
//! backend), the same guest under QEMU 7.2's virtio-blk-pci in the same run, and the same
//! pattern of `pwrite`/`pread` on a raw file from the host.
//!
//! ```text
//! cargo run --release -p benches --bin disk [-- --runs N] [--count N] [--disk-mib N]
//!                         [--dir DIR] [--launcher PATH] [--qemu PATH] [--write-docs]
//! ```
//!
//! Per run, on a fresh sparse image of `--disk-mib` MiB (default 64) in `--dir` (default
//! the system temp directory):
//! - **guest**: `launcher run` boots `blkjournal bench=all count=N` (default 8192) with the
//!   image as its disk and its serial console on a pipe. The guest runs four modes in this
//!   order: `seqw`, `seqr`, `randw`, `randr` (sequential: 4 KiB block i modulo the disk's
//!   blocks; random: xorshift32 from a fixed seed), one request in flight, polled (no
//!   interrupts); write modes end with one FLUSH (fdatasync on the host), inside the timed
//!   part. Time per mode = host timestamp of the line `blkbench: <mode> <n> requests ...`
//!   minus that of `blkbench: <mode> start` (each stamped when its `\n` arrives on the
//!   pipe). The guest's own `rdtsc` delta, converted with the host TSC rate measured here,
//!   is printed as a cross-check.
//! - **QEMU**: the same guest and command line with `-M q35`, a modern virtio-blk-pci on
//!   the image (`cache=writeback`), timed the same way.
//! - **host**: the same block sequence with `pwrite`/`pread` of 4 KiB on another fresh
//!   image of the same size, then `fdatasync` after the write modes, timed with `Instant`.
//!
//! Both go through the host page cache (no O_DIRECT): reads after writes are cache hits in
//! both cases. The table shows medians over the runs and, with `--write-docs`, is written to
//! `docs/disk-benchmarks.md` (hand-written notes below the marker are kept).

use benches::{median, workspace_root};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NOTES_MARKER: &str = "<!-- hand-written notes below: kept when the table is regenerated -->";
const BLOCK: u64 = 4096;
const MODES: [&str; 4] = ["seqw", "seqr", "randw", "randr"];

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
fn launcher_cmd(launcher: &Path, image: &Path, count: u32) -> Command {
    let mut c = Command::new(launcher);
    c.args(["run", "--kernel"])
        .arg(test_guests::blkjournal_path())
        .args(["--cmdline", &format!("bench=all count={count}")])
        .args(["--memory", "32Mi", "--serial", "stdio", "--disk"])
        .arg(format!("path={}", image.display()));
    c
}

/// The same guest under QEMU: q35, a modern-only virtio-blk-pci (device id 0x1042, as the
/// guest looks for) on the raw image through the page cache (`cache=writeback`, as ours),
/// QEMU's default AIO (a thread pool) and its own ioeventfd.
fn qemu_cmd(qemu: &str, image: &Path, count: u32) -> Command {
    let mut c = Command::new(qemu);
    c.args(["-accel", "kvm", "-M", "q35", "-m", "32", "-nodefaults"])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(test_guests::blkjournal_path())
        .args(["-append", &format!("bench=all count={count}")])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=raw,cache=writeback",
            image.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]);
    c
}

fn run_guest(mut cmd: Command) -> GuestRun {
    let count: u32 = cmd
        .get_args()
        .filter_map(|a| a.to_str())
        .find_map(|a| a.strip_prefix("bench=all count="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| fail("no count in the guest command line"));
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
    MODES
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

/// Seconds per mode for the same pattern with pread/pwrite on the host.
fn run_host(image: &Path, count: u32, nblocks: u32) -> Vec<f64> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap_or_else(|e| fail(&format!("{}: {e}", image.display())));
    MODES
        .iter()
        .map(|m| {
            let write = m.ends_with('w');
            let seq = blocks(m.starts_with("rand"), count, nblocks);
            let mut buf: Vec<u8> = (0..BLOCK as u32)
                .map(|i| (i * 7 + u32::from(write)) as u8)
                .collect();
            let t0 = Instant::now();
            for b in &seq {
                let r = if write {
                    f.write_all_at(&buf, b * BLOCK)
                } else {
                    f.read_exact_at(&mut buf, b * BLOCK)
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

fn main() {
    let o = parse_args();
    let launcher = o.common.launcher("disk");
    let hz = tsc_hz();
    let nblocks = u32::try_from((o.disk_mib << 20) / BLOCK).unwrap_or(u32::MAX);
    let image = o
        .dir
        .join(format!("lvm-diskbench-{}.img", std::process::id()));
    let bytes = f64::from(o.count) * BLOCK as f64;
    // [mode] -> samples of (ours s, ours by TSC s, QEMU s, host s)
    let mut samples: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); MODES.len()];
    for run in 0..o.runs {
        fresh_image(&image, o.disk_mib);
        let g = run_guest(launcher_cmd(&launcher, &image, o.count));
        fresh_image(&image, o.disk_mib);
        let q = run_guest(qemu_cmd(&o.qemu, &image, o.count));
        fresh_image(&image, o.disk_mib);
        let h = run_host(&image, o.count, nblocks);
        for (i, m) in MODES.iter().enumerate() {
            let (gs, tsc) = g[i];
            let ts = tsc as f64 / hz;
            eprintln!(
                "disk: run {run} {m}: ours {:.1} MB/s ({:.1} by TSC), QEMU {:.1} MB/s, host {:.1} MB/s",
                bytes / gs / 1e6,
                bytes / ts / 1e6,
                bytes / q[i].0 / 1e6,
                bytes / h[i] / 1e6
            );
            samples[i].push((gs, ts, q[i].0, h[i]));
        }
    }
    let _ = std::fs::remove_file(&image);
    let mut table = String::from(
        "| 4 KiB pattern | launcher (virtio-blk) | by guest TSC | QEMU 7.2 | host pread/pwrite | launcher IOPS | QEMU IOPS | launcher / QEMU | launcher / host |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (i, m) in MODES.iter().enumerate() {
        let g = median(samples[i].iter().map(|s| s.0).collect());
        let t = median(samples[i].iter().map(|s| s.1).collect());
        let q = median(samples[i].iter().map(|s| s.2).collect());
        let h = median(samples[i].iter().map(|s| s.3).collect());
        let name = match *m {
            "seqw" => "sequential write (+1 flush)",
            "seqr" => "sequential read",
            "randw" => "random write (+1 flush)",
            _ => "random read",
        };
        table.push_str(&format!(
            "| {name} | {:.1} MB/s | {:.1} MB/s | {:.1} MB/s | {:.1} MB/s | {:.0} | {:.0} | {:.2} | {:.3} |\n",
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
    println!("{table}");
    {
        let path = workspace_root().join("docs/disk-benchmarks.md");
        let notes = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.find(NOTES_MARKER).map(|i| t[i..].to_string()))
            .unwrap_or_else(|| format!("{NOTES_MARKER}\n"));
        let doc = format!(
            "# virtio-blk benchmark\n\nGenerated by `cargo run --release -p benches --bin disk -- --runs {} \
             --count {} --disk-mib {} --write-docs` (medians over the runs; 2-core nested-KVM machine, see \
             docs/platform.md). {} requests of 4 KiB per pattern, one in flight, on a fresh \
             sparse {} MiB raw image on {}; host TSC {:.0} MHz. How it is measured: see the module \
             comment of `benches/src/bin/disk.rs` and the notes below.\n\n{table}\n{notes}",
            o.runs,
            o.count,
            o.disk_mib,
            o.count,
            o.disk_mib,
            o.dir.display(),
            hz / 1e6
        );
        o.common.docs.write("disk", "docs/disk-benchmarks.md", &doc);
    }
}

fn fail(msg: &str) -> ! {
    benches::fail("disk", msg)
}

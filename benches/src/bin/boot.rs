//! Boot benchmark: our `launcher` against QEMU q35, booting the same tiny PVH guest in
//! the same run, interleaved.
//!
//! ```text
//! cargo run --release -p benches --bin boot [-- --runs N] [--write-docs]
//!                                           [--launcher PATH] [--qemu PATH]
//! ```
//!
//! Per run and per VMM it measures:
//! - **first byte**: process spawn to the first byte on the child's stdout (the serial
//!   console on stdio), booting `hello`;
//! - **first guest line**: spawn to the arrival of the guest's `hello:` line (QEMU's
//!   firmware may print before the guest does; ours prints nothing of its own);
//! - **CPU**: user + system CPU time of the whole `hello` run, spawn to exit (wait4);
//! - **memory overhead**: with the idle `timer` guest (halted, waiting for interrupts),
//!   once it has printed its banner: peak RSS (`VmHWM`) and current RSS (`VmRSS`) minus
//!   the resident part of the guest-RAM mapping (from `/proc/PID/smaps`), i.e. what the
//!   VMM process costs beyond the guest memory the guest (and firmware) touched.
//!
//! It prints a Markdown table of medians with the ratio ours/QEMU and, with
//! `--write-docs`, writes it to `docs/benchmarks.md` together with the command.

use benches::{first_line, median};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Guest memory for every VM, MiB.
const GUEST_MIB: u64 = 64;
/// Safety deadline for one boot (kills a hung child; never part of a result).
const SAFETY: Duration = Duration::from_secs(60);

/// Boots the hello guest N times under our launcher and under QEMU q35 and prints
/// medians; with --write-docs also writes docs/benchmarks.md.
#[derive(clap::Parser)]
#[command(name = "boot")]
struct Opts {
    #[command(flatten)]
    common: benches::CommonArgs,
    /// Boots per VMM.
    #[arg(long, default_value_t = 20, value_parser = benches::positive)]
    runs: usize,
    /// The QEMU binary.
    #[arg(long, value_name = "PATH", default_value = benches::QEMU)]
    qemu: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Ours,
    Qemu,
}

fn command(vmm: Vmm, o: &Opts, launcher: &Path, kernel: &Path, cmdline: &str) -> Command {
    match vmm {
        Vmm::Ours => {
            let mut c = Command::new(launcher);
            c.arg("run").arg("--kernel").arg(kernel).args([
                "--memory",
                &format!("{GUEST_MIB}Mi"),
                "--serial",
                "stdio",
            ]);
            if !cmdline.is_empty() {
                c.args(["--cmdline", cmdline]);
            }
            c
        }
        Vmm::Qemu => {
            let mut c = Command::new(&o.qemu);
            c.args(["-accel", "kvm", "-M", "q35", "-m", &GUEST_MIB.to_string()])
                .args(["-nographic", "-no-reboot", "-kernel"])
                .arg(kernel);
            if !cmdline.is_empty() {
                c.args(["-append", cmdline]);
            }
            c
        }
    }
}

/// Kill `pid` with SIGKILL unless `done` is set by then: a safety net only.
fn watchdog(pid: i32, done: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    std::thread::spawn(move || {
        let end = Instant::now() + SAFETY;
        while Instant::now() < end {
            if done.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("boot: child {pid} hung; killing it");
        // SAFETY: kill(2) with a pid we spawned; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
}

/// wait4 the child, returning its user+system CPU time.
fn reap(pid: i32) -> (i32, Duration) {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 writes only to the two out-pointers, which point to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r != pid {
        fail(&format!("wait4: {}", std::io::Error::last_os_error()));
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (status, tv(ru.ru_utime) + tv(ru.ru_stime))
}

struct BootSample {
    first_byte: Duration,
    first_guest_line: Duration,
    cpu: Duration,
}

/// Boot `hello` once; time the first stdout byte and the guest's first line.
#[allow(clippy::zombie_processes)] // the child is reaped by `reap` (wait4, for its rusage)
fn boot_once(vmm: Vmm, o: &Opts, launcher: &Path) -> BootSample {
    let mut cmd = command(vmm, o, launcher, test_guests::hello_path(), "");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {:?}: {e}", cmd.get_program())));
    let pid = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    watchdog(pid, done.clone());
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    let mut first_byte = None;
    let mut first_line = None;
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => fail(&format!("reading the console: {e}")),
        };
        let now = t0.elapsed();
        first_byte.get_or_insert(now);
        seen.extend_from_slice(&buf[..n]);
        if first_line.is_none() && seen.windows(6).any(|w| w == b"hello:") {
            first_line = Some(now);
        }
    }
    let (_, cpu) = reap(pid);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let text = String::from_utf8_lossy(&seen);
    let (Some(first_byte), Some(first_guest_line)) = (first_byte, first_line) else {
        fail(&format!(
            "the hello guest printed nothing recognisable:\n{text}"
        ));
    };
    if !text.contains("hello: done") {
        fail(&format!("the hello guest did not finish:\n{text}"));
    }
    BootSample {
        first_byte,
        first_guest_line,
        cpu,
    }
}

struct MemSample {
    /// Peak RSS minus resident guest RAM, KiB.
    peak_overhead: u64,
    /// Current RSS minus resident guest RAM, KiB.
    rss_overhead: u64,
    /// Resident guest RAM, KiB.
    guest_resident: u64,
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| fail(&format!("no {key} in /proc/PID/status")))
}

/// Resident KiB of the mappings that hold guest RAM: those of about the guest's size.
fn guest_ram_resident(smaps: &str) -> u64 {
    let lo = GUEST_MIB << 20;
    let hi = lo + (8 << 20);
    let mut total = 0;
    let mut in_ram = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let size = b - a;
                in_ram = size >= lo && size <= hi;
                continue;
            }
        }
        if in_ram {
            if let Some(v) = line.strip_prefix("Rss:") {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// Boot the idle `timer` guest, wait for its banner and a moment, then measure memory.
#[allow(clippy::zombie_processes)] // the child is reaped by `reap` (wait4, for its rusage)
fn memory_once(vmm: Vmm, o: &Opts, launcher: &Path) -> MemSample {
    let mut cmd = command(
        vmm,
        o,
        launcher,
        test_guests::timer_path(),
        "lapic=1000000 pit=1000000",
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {:?}: {e}", cmd.get_program())));
    let pid = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    watchdog(pid, done.clone());
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(13).any(|w| w == b"timer: booted") {
        match out.read(&mut buf) {
            Ok(0) => fail(&format!(
                "the timer guest exited early:\n{}",
                String::from_utf8_lossy(&seen)
            )),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => fail(&format!("reading the console: {e}")),
        }
    }
    // Let the guest settle into its idle loop (interrupts arriving, vCPU halted).
    std::thread::sleep(Duration::from_millis(300));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    drop(out);
    reap(pid);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let hwm = status_kib(&status, "VmHWM:");
    let rss = status_kib(&status, "VmRSS:");
    let guest = guest_ram_resident(&smaps);
    if guest == 0 {
        eprintln!(
            "boot: warning: no guest-RAM mapping of ~{GUEST_MIB} MiB found in smaps of {pid}"
        );
    }
    MemSample {
        peak_overhead: hwm.saturating_sub(guest),
        rss_overhead: rss.saturating_sub(guest),
        guest_resident: guest,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let o = <Opts as clap::Parser>::parse();
    let launcher = launcher_path(&o);
    let (launcher_version, qemu_version) =
        benches::versions_side_by_side("boot", &launcher, &o.qemu);

    let (boots, mems) = measure(&o, &launcher);
    let table = table(&boots, &mems);
    let host = format!(
        "{} CPUs, {}; ours: {launcher_version} (release build); QEMU: {qemu_version}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        first_line("uname", &["-srm"]),
    );
    println!("{table}\n{host}; {} runs each", o.runs);
    o.common
        .docs
        .write("boot", "docs/benchmarks.md", &doc(&table, &host, o.runs));
}

/// One warm-up boot per VMM, then `o.runs` interleaved boots and memory samples of each
/// (index 0: ours, 1: QEMU).
fn measure(o: &Opts, launcher: &Path) -> ([Vec<BootSample>; 2], [Vec<MemSample>; 2]) {
    let mut boots: [Vec<BootSample>; 2] = [Vec::new(), Vec::new()];
    let mut mems: [Vec<MemSample>; 2] = [Vec::new(), Vec::new()];
    // One warm-up boot each (page cache, KVM module state), not recorded.
    for vmm in [Vmm::Ours, Vmm::Qemu] {
        boot_once(vmm, o, launcher);
    }
    for i in 0..o.runs {
        // Alternate which VMM goes first so neither always runs on a warmer machine.
        let order = if i % 2 == 0 {
            [Vmm::Ours, Vmm::Qemu]
        } else {
            [Vmm::Qemu, Vmm::Ours]
        };
        for vmm in order {
            let k = usize::from(vmm == Vmm::Qemu);
            boots[k].push(boot_once(vmm, o, launcher));
            mems[k].push(memory_once(vmm, o, launcher));
        }
        eprint!("\rboot: run {}/{}", i + 1, o.runs);
    }
    eprintln!();

    (boots, mems)
}

/// The Markdown table of medians, ours against QEMU.
fn table(boots: &[Vec<BootSample>; 2], mems: &[Vec<MemSample>; 2]) -> String {
    let med_boot =
        |k: usize, f: &dyn Fn(&BootSample) -> f64| median(boots[k].iter().map(f).collect());
    let med_mem = |k: usize, f: &dyn Fn(&MemSample) -> f64| median(mems[k].iter().map(f).collect());
    let rows: Vec<(&str, &str, f64, f64)> = vec![
        (
            "spawn to first serial byte",
            "ms",
            med_boot(0, &|s| ms(s.first_byte)),
            med_boot(1, &|s| ms(s.first_byte)),
        ),
        (
            "spawn to the guest's first line (`hello:`)",
            "ms",
            med_boot(0, &|s| ms(s.first_guest_line)),
            med_boot(1, &|s| ms(s.first_guest_line)),
        ),
        (
            "CPU time of a whole `hello` run (user+sys)",
            "ms",
            med_boot(0, &|s| ms(s.cpu)),
            med_boot(1, &|s| ms(s.cpu)),
        ),
        (
            "memory overhead: peak RSS (VmHWM) − resident guest RAM",
            "MiB",
            med_mem(0, &|s| s.peak_overhead as f64 / 1024.0),
            med_mem(1, &|s| s.peak_overhead as f64 / 1024.0),
        ),
        (
            "memory overhead: RSS (VmRSS) − resident guest RAM",
            "MiB",
            med_mem(0, &|s| s.rss_overhead as f64 / 1024.0),
            med_mem(1, &|s| s.rss_overhead as f64 / 1024.0),
        ),
        (
            "resident guest RAM (not overhead, for reference)",
            "MiB",
            med_mem(0, &|s| s.guest_resident as f64 / 1024.0),
            med_mem(1, &|s| s.guest_resident as f64 / 1024.0),
        ),
    ];
    let mut table = String::new();
    table.push_str("| metric (median) | ours | QEMU q35 | ours / QEMU |\n|---|---:|---:|---:|\n");
    for (name, unit, ours, qemu) in &rows {
        let ratio = if *qemu > 0.0 {
            format!("{:.3}", ours / qemu)
        } else {
            "n/a".into()
        };
        table.push_str(&format!(
            "| {name} | {ours:.2} {unit} | {qemu:.2} {unit} | {ratio} |\n"
        ));
    }
    table
}

/// docs/benchmarks.md around `table`.
fn doc(table: &str, host: &str, runs: usize) -> String {
    format!(
        "# Benchmarks\n\n\
         ## Boot: our launcher against QEMU q35\n\n\
         Measured with\n\n\
         ```\ncargo run --release -p benches --bin boot -- --runs {runs} --write-docs\n```\n\n\
         Both VMMs boot the same tiny PVH guest ELF (`tests/guests`, `hello` for the times,\n\
         the idle `timer` guest for memory) with {GUEST_MIB} MiB of guest memory, interleaved in one\n\
         run ({runs} runs each, after one warm-up boot each):\n\
         `launcher run --kernel hello.elf --memory {GUEST_MIB}M --serial stdio` and\n\
         `qemu-system-x86_64 -accel kvm -M q35 -m {GUEST_MIB} -nographic -no-reboot -kernel hello.elf`.\n\n\
         {table}\n\
         Host: {host}.\n\n\
         How each number is taken (`benches/src/bin/boot.rs`):\n\n\
         - *first serial byte*: from just before `spawn` to the first byte read from the\n  \
           child's stdout pipe (the serial console is on stdio for both).\n\
         - *guest's first line*: the same, to the read that delivers `hello:`; QEMU's SeaBIOS\n  \
           may print before the guest, our launcher prints nothing of its own.\n\
         - *CPU time*: user + system time of the child from `wait4`, for the whole run\n  \
           (boot, guest output, power-off, exit).\n\
         - *memory overhead*: with the `timer` guest idling (halted between timer\n  \
           interrupts), 300 ms after its banner: `VmHWM` and `VmRSS` from\n  \
           `/proc/PID/status` minus the resident size of the guest-RAM mapping (the\n  \
           mapping of about {GUEST_MIB} MiB in `/proc/PID/smaps`).\n\n\
         The machines here run on a nested, shadow-paging KVM where guest code at CPL0 is\n\
         emulated (see `docs/platform.md`), so absolute times are rough; the ratios\n\
         are the meaningful part. Anchors from the project brief: Firecracker starts its VMM\n\
         within 8 ms of CPU and keeps its overhead under 5 MiB; a minimal C VMM here reaches\n\
         the first guest port write 1.5 ms after spawn.\n",
        runs = runs,
    )
}

fn fail(msg: &str) -> ! {
    benches::fail("boot", msg)
}

fn launcher_path(o: &Opts) -> PathBuf {
    o.common.launcher("boot")
}

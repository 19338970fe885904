//! Network benchmark: the `netecho` guest on virtio-net over a TAP, our launcher against
//! QEMU's virtio-net-pci (userspace backend, `vhost=off`) on the same guest, same host,
//! same run. Everything runs in a network namespace made for the run (needs root and
//! iproute2).
//!
//! ```text
//! cargo run --release -p benches --bin net [-- --runs N] [--write-docs]
//!                                           [--launcher PATH] [--qemu PATH]
//! ```
//!
//! Per VMM and run:
//! - **round trip**: 2000 UDP ping-pongs (32-byte payload, one in flight) from the host
//!   side of the TAP to the guest's echo port; median and 99th percentile.
//! - **guest to host**: one `FLOOD` request makes the guest send 20000 datagrams of 1400
//!   bytes as fast as it can; the host counts what arrives until 300 ms of silence.
//!   Throughput = payload bytes received / time from the request to the last one.
//!
//! It prints a Markdown table of medians over the runs and, with `--write-docs`, writes it
//! to `docs/net-benchmarks.md` (hand-written notes below the marker are kept).

use benches::{median, workspace_root};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::netns::{ip_available, Netns};

const NOTES_MARKER: &str = "<!-- hand-written notes below: kept when the table is regenerated -->";
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 9, 2);
const FLOOD_COUNT: u32 = 20000;
const FLOOD_SIZE: u32 = 1400;
const PINGS: usize = 2000;

/// Command line (see the module comment).
#[derive(clap::Parser)]
#[command(about = "virtio-net benchmark: our launcher against QEMU on the netecho guest")]
struct Opts {
    /// Runs per VMM (the table shows medians).
    #[arg(long, default_value_t = 3, value_parser = benches::positive)]
    runs: usize,
    #[command(flatten)]
    common: benches::CommonArgs,
    /// The QEMU binary.
    #[arg(long, default_value = benches::QEMU)]
    qemu: String,
}

fn parse_args() -> Opts {
    <Opts as clap::Parser>::parse()
}

/// A VM process in the namespace, killed on drop.
struct Vmm {
    child: Child,
    console: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmm {
    /// Wait for the guest's "up" line; returns whether its driver negotiated the checksum
    /// offload (its "virtio ... csum=1" line).
    fn wait_up(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&self.console).unwrap_or_default();
            if text.contains("netecho: up") {
                return text
                    .lines()
                    .any(|l| l.starts_with("netecho: virtio ") && l.ends_with(" csum=1"));
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                fail(&format!("VM exited ({s}) before coming up: {text}"));
            }
            if Instant::now() > deadline {
                fail(&format!("VM did not come up: {text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `csum=1`: the guest's UDP datagrams carry checksums that the host completes
/// (VIRTIO_NET_F_CSUM, which both VMMs offer on a TAP with a vnet header).
fn cmdline() -> String {
    format!("ip={GUEST_IP} port=7 every_ms=0 csum=1")
}

fn start_ours(ns: &Netns, launcher: &Path, dir: &Path) -> Vmm {
    let console = dir.join("ours.log");
    let _ = std::fs::remove_file(&console);
    let child = ns
        .command(launcher)
        .args(["run", "--kernel"])
        .arg(test_guests::netecho_path())
        .args(["--cmdline", &cmdline(), "--memory", "64Mi"])
        .args(["--net", "tap=tapo,mac=52:54:00:00:00:01", "--serial"])
        .arg(&console)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start the launcher: {e}")));
    Vmm { child, console }
}

fn start_qemu(ns: &Netns, qemu: &str, dir: &Path) -> Vmm {
    let console = dir.join("qemu.log");
    let _ = std::fs::remove_file(&console);
    let child = ns
        .command(qemu)
        .args(["-accel", "kvm", "-M", "q35", "-m", "64M", "-nodefaults"])
        .args(["-display", "none", "-kernel"])
        .arg(test_guests::netecho_path())
        .args(["-append", &cmdline()])
        .args([
            "-netdev",
            "tap,id=n0,ifname=tapq,script=no,downscript=no,vhost=off",
        ])
        .args([
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:02,disable-legacy=on",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {qemu}: {e}")));
    Vmm { child, console }
}

#[derive(Clone, Copy, Default)]
struct Sample {
    rtt_median_us: f64,
    rtt_p99_us: f64,
    mbit_s: f64,
    kpps: f64,
    received: u32,
}

fn measure(ns: &Netns) -> Sample {
    let sock = ns.enter(|| {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        s.connect(SocketAddrV4::new(GUEST_IP, 7)).expect("connect");
        s
    });
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    // Round trips (the first ones also resolve ARP).
    let mut rtts = Vec::with_capacity(PINGS);
    let mut buf = [0u8; 2048];
    for i in 0..(PINGS + 100) {
        let payload = [i as u8; 32];
        let t = Instant::now();
        sock.send(&payload).expect("send");
        if sock.recv(&mut buf).is_ok() && i >= 100 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    rtts.sort_by(f64::total_cmp);
    let pct = |p: f64| rtts.get(((rtts.len() as f64 - 1.0) * p) as usize).copied();
    // Guest-to-host burst.
    let mut req = b"FLOOD".to_vec();
    req.extend_from_slice(&FLOOD_COUNT.to_be_bytes());
    req.extend_from_slice(&FLOOD_SIZE.to_be_bytes());
    let t0 = Instant::now();
    sock.send(&req).expect("send FLOOD");
    let (mut n, mut bytes, mut last) = (0u32, 0u64, t0);
    while let Ok(len) = sock.recv(&mut buf) {
        if len == FLOOD_SIZE as usize {
            n += 1;
            bytes += len as u64;
            last = Instant::now();
        }
        if n == FLOOD_COUNT {
            break;
        }
    }
    let secs = (last - t0).as_secs_f64().max(1e-6);
    Sample {
        rtt_median_us: pct(0.5).unwrap_or(f64::NAN),
        rtt_p99_us: pct(0.99).unwrap_or(f64::NAN),
        mbit_s: bytes as f64 * 8.0 / secs / 1e6,
        kpps: f64::from(n) / secs / 1e3,
        received: n,
    }
}

fn summarize(s: &[Sample]) -> Sample {
    Sample {
        rtt_median_us: median(s.iter().map(|x| x.rtt_median_us).collect()),
        rtt_p99_us: median(s.iter().map(|x| x.rtt_p99_us).collect()),
        mbit_s: median(s.iter().map(|x| x.mbit_s).collect()),
        kpps: median(s.iter().map(|x| x.kpps).collect()),
        received: s.iter().map(|x| x.received).min().unwrap_or(0),
    }
}

fn main() {
    let o = parse_args();
    if !ip_available() {
        fail("the ip tool (iproute2) is missing");
    }
    let launcher = o.common.launcher("net");
    let have_qemu = Command::new(&o.qemu)
        .arg("--version")
        .output()
        .is_ok_and(|x| x.status.success());
    let dir = std::env::temp_dir().join(format!("lvm-netbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ns = Netns::new("netbench");
    // One TAP per VMM, both on a bridge that holds the host side's address.
    ns.ip("link add br0 type bridge");
    for t in ["tapo", "tapq"] {
        ns.ip(&format!("tuntap add dev {t} mode tap"));
        ns.ip(&format!("link set {t} master br0"));
        ns.ip(&format!("link set {t} up"));
    }
    ns.ip("addr add 10.99.9.1/24 dev br0");
    ns.ip("link set br0 up");
    let mut rows = Vec::new();
    let mut csum_all: Vec<String> = Vec::new();
    let kinds: &[&str] = if have_qemu {
        &["ours", "qemu"]
    } else {
        &["ours"]
    };
    for kind in kinds {
        let mut samples = Vec::new();
        for run in 0..o.runs {
            let mut vm = match *kind {
                "ours" => start_ours(&ns, &launcher, &dir),
                _ => start_qemu(&ns, &o.qemu, &dir),
            };
            let csum = vm.wait_up();
            csum_all.push(format!("{kind}: {}", if csum { "yes" } else { "no" }));
            // Both TAPs carry the same guest IP in turn: forget the previous MAC.
            let _ = ns.try_ip("neigh flush dev br0");
            ns.wait_bridge_port_forwarding(if *kind == "ours" { "tapo" } else { "tapq" });
            let s = measure(&ns);
            eprintln!(
                "net: {kind} run {run}: rtt median {:.0} us p99 {:.0} us, guest->host {:.0} Mbit/s ({:.1} kpps, {} of {FLOOD_COUNT} datagrams)",
                s.rtt_median_us, s.rtt_p99_us, s.mbit_s, s.kpps, s.received
            );
            samples.push(s);
        }
        rows.push((*kind, summarize(&samples)));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut table = String::from(
        "| VMM | UDP round trip, median | p99 | guest → host, 1400-byte datagrams | packets/s | received of 20000 (worst run) |\n|---|---|---|---|---|---|\n",
    );
    for (kind, s) in &rows {
        let name = if *kind == "ours" {
            "launcher (virtio-net, TAP)"
        } else {
            "QEMU 7.2 (virtio-net-pci, TAP, vhost=off)"
        };
        table.push_str(&format!(
            "| {name} | {:.0} µs | {:.0} µs | {:.0} Mbit/s | {:.1} k | {} |\n",
            s.rtt_median_us, s.rtt_p99_us, s.mbit_s, s.kpps, s.received
        ));
    }
    if !have_qemu {
        table.push_str("\nQEMU was not found: only our launcher was measured.\n");
    }
    csum_all.dedup();
    let csum_note = format!(
        "The guest runs with `csum=1` (UDP checksums that the host completes when the device \
         offers `VIRTIO_NET_F_CSUM`); negotiated — {}.\n",
        csum_all.join(", ")
    );
    table.push_str(&format!("\n{csum_note}"));
    println!("{table}");
    {
        let path = workspace_root().join("docs/net-benchmarks.md");
        let notes = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.find(NOTES_MARKER).map(|i| t[i..].to_string()))
            .unwrap_or_else(|| format!("{NOTES_MARKER}\n"));
        let doc = format!(
            "# virtio-net benchmark\n\nGenerated by `cargo run --release -p benches --bin net -- --runs {} --write-docs` \
             (medians over the runs; {} of `netecho` on a 2-core nested-KVM machine, see \
             docs/platform.md). Both VMMs run the same guest ELF on a TAP in a private \
             network namespace; the host side is a UDP socket on the bridge.\n\n{table}\n{notes}",
            o.runs, PINGS
        );
        o.common.docs.write("net", "docs/net-benchmarks.md", &doc);
    }
}

fn fail(msg: &str) -> ! {
    benches::fail("net", msg)
}

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
//! Runs alternate between the VMMs (ours, QEMU, ours, ...). Per VMM and run, with one UDP
//! socket on the host side (receive buffer forced to 64 MiB with `SO_RCVBUFFORCE`, kernel
//! receive timestamps with `SO_TIMESTAMPNS`):
//! - **round trip**: 2000 UDP ping-pongs (32-byte payload, one in flight) from the host
//!   side of the TAP to the guest's echo port; median and 99th percentile. Also the median
//!   time from a ping's send to its reply's kernel timestamp: a TAP write runs the bridge
//!   and the UDP layer in the writer's context, so that timestamp is the moment the VMM
//!   wrote the reply into the TAP, and the rest of the round trip is the host receiver's
//!   wake-up.
//! - **guest to host**: one `FLOOD` request makes the guest send 20000 datagrams of 1400
//!   bytes as fast as it can. The benchmark does not read the socket meanwhile (it holds
//!   the whole flood) and takes no CPU from the VMM: it watches the TAP's receive counter
//!   (`/proc/net/dev` of the namespace: frames the VMM wrote into the TAP) every 5 ms
//!   until it reaches 20000 or stops for 300 ms, then reads the socket. Throughput =
//!   payload bytes of the datagrams received / (kernel timestamp of the last one − the
//!   request's send), i.e. the rate at which the VMM wrote them into the TAP. The frames
//!   counted on the TAP and the datagrams the socket received are both reported.
//!
//! - **kernel floor** (`net/floor.rs`): after each pair of runs, this process writes the
//!   same frames into a third TAP on the same bridge, with no VM: what the host kernel
//!   alone costs per frame, the bound for any VMM that writes its TAP frame by frame.
//!
//! `NETBENCH_DEBUG=1` also prints, per run, the CPU time each VMM thread spent during the
//! flood (QEMU runs with `-name ...,debug-threads=on` so its threads have names).
//!
//! It prints a Markdown table of medians over the runs and, with `--write-docs`, writes it
//! to `docs/net-benchmarks.md` (hand-written notes below the marker are kept).

use benches::{median, workspace_root};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::netns::{ip_available, Netns};

#[path = "net/floor.rs"]
mod floor;

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
        .args(["-name", "netbench,debug-threads=on"])
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
    /// Median time from a ping's send to its reply's entry into the host's stack (the
    /// reply's kernel timestamp, taken inside the VMM's write into the TAP): the round
    /// trip without the host receiver's own wake-up.
    reply_in_stack_us: f64,
    rtt_median_us: f64,
    rtt_p99_us: f64,
    /// Payload rate of the flood as the VMM wrote it into the TAP (kernel timestamps).
    mbit_s: f64,
    kpps: f64,
    /// Frames the VMM wrote into its TAP during the flood (the TAP's `rx_packets`).
    tap_frames: u64,
    /// Flood datagrams the host's socket received.
    received: u32,
    /// Datagrams the host's UDP layer dropped for a full receive buffer during the flood.
    rcvbuf_errors: u64,
}

/// The receive buffer forced on the host's socket (`SO_RCVBUFFORCE`; the kernel doubles
/// it): room for the whole flood, so that no datagram is lost to a receiver that was not
/// scheduled in time.
const RCVBUF: libc::c_int = 64 << 20;
/// How often the benchmark looks at the TAP's counter during the flood.
const WATCH_EVERY: Duration = Duration::from_millis(5);
/// The flood has ended once nothing arrived for this long.
const FLOOD_QUIET: Duration = Duration::from_millis(300);
const BATCH: usize = 64;

fn setsockopt_int(fd: libc::c_int, opt: libc::c_int, v: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a plain int option on a socket we own; the pointer and length describe `v`.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A counter of the calling thread's network namespace: `/proc/thread-self/net/dev`'s
/// receive packets of `dev` (what the kernel counts as received on a TAP is what the
/// process holding the TAP wrote into it) or `/proc/thread-self/net/snmp`'s UDP
/// `RcvbufErrors`.
fn dev_rx_packets(dev: &str) -> u64 {
    dev_field(dev, 1)
}

/// Column `i` after the name (0 receive bytes, 1 receive packets, 9 transmit packets) of `dev` in
/// `/proc/thread-self/net/dev`.
fn dev_field(dev: &str, i: usize) -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == dev).then(|| rest.split_whitespace().nth(i)?.parse().ok())?
        })
        .unwrap_or(0)
}

fn udp_rcvbuf_errors() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Datagrams received by one [`drain`]: (payload length, kernel receive time in ns since
/// the epoch, 0 if none).
fn drain(fd: libc::c_int, out: &mut Vec<(usize, u64)>) -> usize {
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut ctrl = vec![[0u64; 8]; BATCH];
    let mut total = 0;
    loop {
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(ctrl.iter_mut())
            .map(|(iov, c)| {
                // SAFETY: an all-zero msghdr is valid (no name, no iovec, no control).
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_control = c.as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = std::mem::size_of_val(c);
                h
            })
            .collect();
        // SAFETY: `msgs` holds BATCH headers whose iovecs and control buffers point into
        // `bufs` and `ctrl`, which outlive the call; non-blocking, no timeout.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            return total;
        }
        for m in &msgs[..n as usize] {
            let ts = cmsg_timestamp(&m.msg_hdr);
            out.push((m.msg_len as usize, ts));
        }
        total += n as usize;
    }
}

/// One datagram, blocking up to the socket's read timeout: (length, kernel timestamp in ns
/// since the epoch, 0 if none).
fn recv_one(fd: libc::c_int, buf: &mut [u8]) -> Option<(usize, u64)> {
    let mut ctrl = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no iovec, no control).
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = ctrl.as_mut_ptr().cast();
    h.msg_controllen = std::mem::size_of_val(&ctrl);
    // SAFETY: `h` points at `iov` (into `buf`) and `ctrl`, which outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut h, 0) };
    if n < 0 {
        return None;
    }
    Some((n as usize, cmsg_timestamp(&h)))
}

/// The `SCM_TIMESTAMPNS` of a received message, in ns since the epoch (0 if none).
fn cmsg_timestamp(h: &libc::msghdr) -> u64 {
    let mut ts = 0u64;
    // SAFETY: the kernel filled the control buffer of `h` and set its length; the CMSG
    // macros stay inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let t = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                ts = t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    ts
}

fn epoch_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn measure(ns: &Netns, tap: &'static str, pid: u32) -> Sample {
    ns.enter(move || measure_in_ns(tap, pid))
}

/// CPU time (ns) of each thread of `pid`, by thread name.
fn thread_times(pid: u32) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in d.flatten() {
            let p = e.path();
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            let ns = std::fs::read_to_string(p.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            v.push((comm.trim().to_string(), ns));
        }
    }
    v.sort();
    v
}

/// The host side's UDP socket, on a thread inside the namespace: connected to the guest's
/// echo port, with a receive buffer that holds a whole flood and kernel receive
/// timestamps, taken when the frame enters the host's stack: inside the VMM's write into
/// the TAP (a TAP write runs the bridge and the UDP layer in the writer's context). On
/// from the start, so the kernel's timestamping is on by the flood.
fn host_socket() -> UdpSocket {
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
    sock.connect(SocketAddrV4::new(GUEST_IP, 7))
        .expect("connect");
    let fd = sock.as_raw_fd();
    setsockopt_int(fd, libc::SO_RCVBUFFORCE, RCVBUF).expect("SO_RCVBUFFORCE (needs root)");
    setsockopt_int(fd, libc::SO_TIMESTAMPNS, 1).expect("SO_TIMESTAMPNS");
    sock
}

/// Runs on a thread inside the namespace (sockets, `/proc/thread-self/net`).
fn measure_in_ns(tap: &str, pid: u32) -> Sample {
    let sock = host_socket();
    let fd = sock.as_raw_fd();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    // Round trips (the first ones also resolve ARP).
    let mut rtts = Vec::with_capacity(PINGS);
    let mut buf = [0u8; 2048];
    let mut in_stack = Vec::with_capacity(PINGS);
    for i in 0..(PINGS + 100) {
        let payload = [i as u8; 32];
        let (t, te) = (Instant::now(), epoch_ns());
        sock.send(&payload).expect("send");
        if let Some((_, ts)) = recv_one(fd, &mut buf) {
            if i >= 100 {
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
                if ts != 0 {
                    in_stack.push(ts.saturating_sub(te) as f64 / 1e3);
                }
            }
        }
    }
    rtts.sort_by(f64::total_cmp);
    in_stack.sort_by(f64::total_cmp);
    let reply_in_stack_us = in_stack
        .get(in_stack.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    let pct = |p: f64| rtts.get(((rtts.len() as f64 - 1.0) * p) as usize).copied();
    while drain(fd, &mut Vec::new()) > 0 {}
    // Guest-to-host burst.
    let mut req = b"FLOOD".to_vec();
    req.extend_from_slice(&FLOOD_COUNT.to_be_bytes());
    req.extend_from_slice(&FLOOD_SIZE.to_be_bytes());
    let (tap0, drops0) = (dev_rx_packets(tap), udp_rcvbuf_errors());
    let tx0 = dev_field(tap, 9);
    let cpu0 = thread_times(pid);
    let t0 = epoch_ns();
    sock.send(&req).expect("send FLOOD");
    // Wait for the flood to end without reading the socket, which holds all of it: the
    // receiver takes no CPU from the VMM while it sends. The TAP's counter says when the
    // VMM has stopped writing.
    let (mut seen, mut quiet_since) = (tap0, Instant::now());
    loop {
        std::thread::sleep(WATCH_EVERY);
        let now = dev_rx_packets(tap);
        if now != seen {
            (seen, quiet_since) = (now, Instant::now());
        }
        if now - tap0 >= u64::from(FLOOD_COUNT) || quiet_since.elapsed() > FLOOD_QUIET {
            break;
        }
    }
    let mut got = Vec::with_capacity(FLOOD_COUNT as usize);
    while drain(fd, &mut got) > 0 {}
    let tap_frames = dev_rx_packets(tap) - tap0;
    let cpu1 = thread_times(pid);
    let rcvbuf_errors = udp_rcvbuf_errors() - drops0;
    let rate = FloodRate::of(&got, t0);
    if std::env::var_os("NETBENCH_DEBUG").is_some() {
        eprintln!(
            "debug: first ts +{} us, last ts +{} us, read done +{} us, tap tx delta {}",
            rate.first_ns.saturating_sub(t0) / 1000,
            rate.last_ns.saturating_sub(t0) / 1000,
            epoch_ns().saturating_sub(t0) / 1000,
            dev_field(tap, 9) - tx0
        );
        for ((name, a), (_, b)) in cpu0.iter().zip(cpu1.iter()) {
            if b - a > 1_000_000 {
                eprintln!("debug:   thread {name}: {} us on CPU", (b - a) / 1000);
            }
        }
    }
    Sample {
        reply_in_stack_us,
        rtt_median_us: pct(0.5).unwrap_or(f64::NAN),
        rtt_p99_us: pct(0.99).unwrap_or(f64::NAN),
        mbit_s: rate.mbit_s,
        kpps: rate.kpps,
        tap_frames,
        received: rate.received,
        rcvbuf_errors,
    }
}

/// A flood as the host socket received it: the datagrams of the flood's size among `got`
/// (payload length, kernel receive time), and their payload rate from `t0` (the request's
/// send, or the first write) to the last one's kernel timestamp.
struct FloodRate {
    received: u32,
    mbit_s: f64,
    kpps: f64,
    first_ns: u64,
    last_ns: u64,
}

impl FloodRate {
    fn of(got: &[(usize, u64)], t0: u64) -> FloodRate {
        let flood: Vec<u64> = got
            .iter()
            .filter(|(len, _)| *len == FLOOD_SIZE as usize)
            .map(|(_, ts)| *ts)
            .collect();
        let n = flood.len() as u32;
        let first_ns = flood.iter().copied().min().unwrap_or(t0);
        let last_ns = flood.iter().copied().max().unwrap_or(t0);
        let secs = (last_ns.saturating_sub(t0) as f64 / 1e9).max(1e-6);
        FloodRate {
            received: n,
            mbit_s: f64::from(n) * f64::from(FLOOD_SIZE) * 8.0 / secs / 1e6,
            kpps: f64::from(n) / secs / 1e3,
            first_ns,
            last_ns,
        }
    }
}

fn summarize(s: &[Sample]) -> Sample {
    Sample {
        reply_in_stack_us: median(s.iter().map(|x| x.reply_in_stack_us).collect()),
        rtt_median_us: median(s.iter().map(|x| x.rtt_median_us).collect()),
        rtt_p99_us: median(s.iter().map(|x| x.rtt_p99_us).collect()),
        mbit_s: median(s.iter().map(|x| x.mbit_s).collect()),
        kpps: median(s.iter().map(|x| x.kpps).collect()),
        tap_frames: s.iter().map(|x| x.tap_frames).min().unwrap_or(0),
        received: s.iter().map(|x| x.received).min().unwrap_or(0),
        rcvbuf_errors: s.iter().map(|x| x.rcvbuf_errors).max().unwrap_or(0),
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
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
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
    // And one for the kernel floor (floor.rs), written by this process.
    ns.ip(&format!("tuntap add dev {} mode tap", floor::FLOOR_TAP));
    ns.ip(&format!("link set {} master br0", floor::FLOOR_TAP));
    ns.ip(&format!("link set {} up", floor::FLOOR_TAP));
    ns.ip(&format!("link set br0 address {}", floor::BRIDGE_MAC));
    ns.ip("addr add 10.99.9.1/24 dev br0");
    ns.ip("link set br0 up");
    let mut floor_tap = Some(ns.enter(floor::open_tap));
    ns.wait_bridge_port_forwarding(floor::FLOOR_TAP);
    let mut floors = Vec::new();
    let mut rows = Vec::new();
    let mut csum_all: Vec<String> = Vec::new();
    let kinds: &[&str] = if have_qemu {
        &["ours", "qemu"]
    } else {
        &["ours"]
    };
    // Runs alternate between the VMMs, so that a change in the machine's load during the
    // benchmark weighs on both alike.
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); kinds.len()];
    for run in 0..o.runs {
        for (k, kind) in kinds.iter().enumerate() {
            let mut vm = match *kind {
                "ours" => start_ours(&ns, &launcher, &dir),
                _ => start_qemu(&ns, &o.qemu, &dir),
            };
            let csum = vm.wait_up();
            csum_all.push(format!("{kind}: {}", if csum { "yes" } else { "no" }));
            // Both TAPs carry the same guest IP in turn: forget the previous MAC.
            let _ = ns.try_ip("neigh flush dev br0");
            let tap = if *kind == "ours" { "tapo" } else { "tapq" };
            ns.wait_bridge_port_forwarding(tap);
            let s = measure(&ns, tap, vm.child.id());
            drop(vm);
            eprintln!(
                "net: {kind} run {run}: rtt median {:.0} us p99 {:.0} us (reply in the host stack after {:.0} us), guest->host {:.0} Mbit/s ({:.1} kpps; {} frames into the TAP, {} of {FLOOD_COUNT} datagrams received, {} dropped by the socket)",
                s.rtt_median_us, s.rtt_p99_us, s.reply_in_stack_us, s.mbit_s, s.kpps, s.tap_frames, s.received, s.rcvbuf_errors
            );
            samples[k].push(s);
        }
        if let Some(t) = floor_tap.take() {
            let (f, t) = ns.enter(move || {
                let mut t = t;
                (floor::measure_in_ns(&mut t), t)
            });
            eprintln!(
                "net: kernel floor run {run}: {:.0} Mbit/s ({:.1} kpps; {} of {FLOOD_COUNT} datagrams received)",
                f.mbit_s, f.kpps, f.received
            );
            floors.push(f);
            floor_tap = Some(t);
        }
    }
    for (k, kind) in kinds.iter().enumerate() {
        rows.push((*kind, summarize(&samples[k])));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut table = String::from(
        "| VMM | UDP round trip, median | p99 | reply in the host stack after (median) | guest → host, 1400-byte datagrams, into the TAP | datagrams/s | frames into the TAP / received by the socket (worst run, of 20000) |\n|---|---|---|---|---|---|---|\n",
    );
    for (kind, s) in &rows {
        let name = if *kind == "ours" {
            "launcher (virtio-net, TAP)"
        } else {
            "QEMU 7.2 (virtio-net-pci, TAP, vhost=off)"
        };
        table.push_str(&format!(
            "| {name} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} Mbit/s | {:.1} k | {} / {} |\n",
            s.rtt_median_us,
            s.rtt_p99_us,
            s.reply_in_stack_us,
            s.mbit_s,
            s.kpps,
            s.tap_frames,
            s.received
        ));
    }
    let floor_mbit = median(floors.iter().map(|f| f.mbit_s).collect());
    table.push_str(&format!(
        "| kernel floor: this benchmark writing the same frames into a TAP, one `write` each, no VM | — | — | — | {:.0} Mbit/s | {:.1} k | — / {} |\n",
        floor_mbit,
        median(floors.iter().map(|f| f.kpps).collect()),
        floors.iter().map(|f| f.received).min().unwrap_or(0)
    ));
    if let [(_, a), (_, b)] = rows.as_slice() {
        table.push_str(&format!(
            "\nRatios (ours / QEMU): round trip {:.2} ×, throughput {:.2} ×. Throughput against \
             the kernel floor: ours {:.2} ×, QEMU {:.2} ×; the floor is {:.2} × QEMU's, the most \
             a VMM writing its TAP frame by frame could lead it by here.\n",
            a.rtt_median_us / b.rtt_median_us,
            a.mbit_s / b.mbit_s,
            a.mbit_s / floor_mbit,
            b.mbit_s / floor_mbit,
            floor_mbit / b.mbit_s
        ));
    }
    if !have_qemu {
        table.push_str("\nQEMU was not found: only our launcher was measured.\n");
    }
    csum_all.sort();
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
             (medians over the runs, which alternate between the VMMs; {} of `netecho` on a \
             2-core nested-KVM machine, see docs/platform.md; load average {} when it \
             started). Both VMMs run the same guest ELF on a TAP in a private network \
             namespace; the host side is a UDP socket on the bridge. What each column \
             measures is in the notes below.\n\n{table}\n{notes}",
            o.runs, PINGS, load
        );
        o.common.docs.write("net", "docs/net-benchmarks.md", &doc);
    }
}

fn fail(msg: &str) -> ! {
    benches::fail("net", msg)
}

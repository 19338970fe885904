//! Network namespaces for the virtio-net tests and benchmark: a namespace made with
//! `ip netns add` (deleted on drop), commands and sockets inside it, a steady UDP flow to
//! the `netecho` guest and its report, and an ICMP echo.
//!
//! Nothing is configured outside the namespaces the tests create.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// True when the `ip` tool (iproute2) can be run.
pub fn ip_available() -> bool {
    Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Called first by a test that needs `ip`. Such tests are compiled as ignored where `ip`
/// was missing at build time outside CI (`tests/tool_probe.rs`), so a test that runs
/// expects it: its absence is a failure that says what to install.
pub fn require_ip() {
    assert!(
        ip_available(),
        "the `ip` tool (iproute2) is missing: install iproute2 (.ci/run does), or build the \
         tests without CI=true to have this test reported as ignored"
    );
}

/// A network namespace, deleted (with its interfaces) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add lvm-<tag>-<pid>`; panics with the tool's message on failure.
    pub fn new(tag: &str) -> Self {
        let name = format!("lvm-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Run `ip -n NAME <args>` (space-separated); panics on failure.
    pub fn ip(&self, args: &str) {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend(args.split_whitespace());
        run_ip(&v);
    }

    /// A TAP `dev` with the host-side address `cidr`, up: the host end of a guest NIC.
    pub fn tap_up(&self, dev: &str, cidr: &str) {
        self.ip(&format!("tuntap add dev {dev} mode tap"));
        self.ip(&format!("addr add {cidr} dev {dev}"));
        self.ip(&format!("link set {dev} up"));
    }

    /// `ip -n NAME <args>`, returning whether it succeeded (and stderr).
    pub fn try_ip(&self, args: &str) -> Result<(), String> {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend(args.split_whitespace());
        let o = Command::new("ip")
            .args(&v)
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }

    /// Wait (up to 10 s) until the bridge port `dev` forwards. A TAP's port forwards only
    /// once the kernel's link watcher noticed its carrier (a launcher attached to it),
    /// which can take up to a second; frames the guest sends before are dropped.
    pub fn wait_bridge_port_forwarding(&self, dev: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = Command::new("ip")
                .args(["-n", &self.name, "-d", "link", "show", "dev", dev])
                .output()
                .expect("run ip");
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            if text.contains("state forwarding") {
                return;
            }
            assert!(Instant::now() < deadline, "{dev} never forwards: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`, which execs
    /// it: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Run `f` on a thread that has joined the namespace (sockets it creates live there).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a descriptor we own; it changes only this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in the namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run_ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// One answer of the `netecho` guest.
#[derive(Debug, Clone, Copy)]
struct Answer {
    at: Instant,
    counter: u32,
    nonce: u32,
}

/// What a [`UdpFlow`] saw.
#[derive(Debug, Clone)]
pub struct FlowReport {
    /// Datagrams sent.
    pub sent: u64,
    /// Distinct datagrams answered.
    pub answered: u64,
    /// Sequence numbers never answered.
    pub lost: Vec<u64>,
    /// Longest time between two consecutive answers.
    pub longest_gap: Duration,
    /// Boot nonces seen in the answers (one unless the guest restarted).
    pub nonces: BTreeSet<u32>,
    /// The guest's answer counters, in sequence order of the datagrams.
    pub counters: Vec<u32>,
    /// Answers to the same datagram more than once.
    pub duplicates: u64,
}

impl std::fmt::Display for FlowReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let range = match (self.lost.first(), self.lost.last()) {
            (Some(a), Some(b)) => format!(" (seq {a}..={b})"),
            _ => String::new(),
        };
        write!(
            f,
            "sent {}, answered {}, lost {}{range}, longest gap {:.1} ms, duplicates {}, guest boots seen {}",
            self.sent,
            self.answered,
            self.lost.len(),
            self.longest_gap.as_secs_f64() * 1e3,
            self.duplicates,
            self.nonces.len()
        )
    }
}

impl FlowReport {
    /// The guest answered every answered datagram from one boot, counting up by one per
    /// answer (no answer lost inside the guest, no restart).
    pub fn guest_continuous(&self) -> bool {
        let mut c = self.counters.clone();
        c.sort_unstable();
        self.nonces.len() == 1 && c.windows(2).all(|w| w[1] == w[0] + 1)
    }
}

/// A steady stream of UDP datagrams (payload: the sequence number, 8 bytes big endian)
/// from inside a namespace to the guest's echo port, with the answers recorded.
pub struct UdpFlow {
    stop: Arc<AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    sender: Option<JoinHandle<u64>>,
    receiver: Option<JoinHandle<()>>,
    answers: Arc<Mutex<BTreeMap<u64, Answer>>>,
    duplicates: Arc<Mutex<u64>>,
}

impl UdpFlow {
    /// Start sending every `interval` from a socket bound in `ns` to `target`.
    pub fn start(ns: &Netns, target: SocketAddrV4, interval: Duration) -> Self {
        let sock = ns.enter(move || {
            let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            s.connect(target).expect("connect");
            s
        });
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let rx = sock.try_clone().expect("clone socket");
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(BTreeMap::new()));
        let duplicates = Arc::new(Mutex::new(0));
        let (stop2, answers2, dup2) = (stop.clone(), answers.clone(), duplicates.clone());
        let receiver = std::thread::spawn(move || {
            let mut b = [0u8; 2048];
            // Keep reading a little after the stop, for answers still on their way.
            let mut grace: Option<Instant> = None;
            loop {
                if stop2.load(Ordering::SeqCst) {
                    let g = *grace.get_or_insert_with(Instant::now);
                    if g.elapsed() > Duration::from_millis(500) {
                        return;
                    }
                }
                let Ok(n) = rx.recv(&mut b) else { continue };
                let Some((counter, nonce, payload)) = test_guests::netecho_answer(&b[..n]) else {
                    continue;
                };
                let Ok(seq) = <[u8; 8]>::try_from(payload) else {
                    continue;
                };
                let seq = u64::from_be_bytes(seq);
                let a = Answer {
                    at: Instant::now(),
                    counter,
                    nonce,
                };
                if answers2.lock().unwrap().insert(seq, a).is_some() {
                    *dup2.lock().unwrap() += 1;
                }
            }
        });
        let stop3 = stop.clone();
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sent2 = sent.clone();
        let sender = std::thread::spawn(move || {
            let start = Instant::now();
            let mut seq = 0u64;
            while !stop3.load(Ordering::SeqCst) {
                let _ = sock.send(&seq.to_be_bytes());
                seq += 1;
                sent2.store(seq, Ordering::SeqCst);
                // Paced against the start time, so a slow send does not stretch the rate.
                let next = start + interval * seq as u32;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            seq
        });
        UdpFlow {
            stop,
            sent,
            sender: Some(sender),
            receiver: Some(receiver),
            answers,
            duplicates,
        }
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Answers so far.
    pub fn answered(&self) -> usize {
        self.answers.lock().unwrap().len()
    }

    /// Stop sending, wait for late answers, and report.
    pub fn stop(mut self) -> FlowReport {
        self.stop.store(true, Ordering::SeqCst);
        let sent = self.sender.take().and_then(|h| h.join().ok()).unwrap_or(0);
        if let Some(h) = self.receiver.take() {
            let _ = h.join();
        }
        let answers = self.answers.lock().unwrap().clone();
        let mut times: Vec<Instant> = answers.values().map(|a| a.at).collect();
        times.sort_unstable();
        let longest_gap = times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        FlowReport {
            sent,
            answered: answers.len() as u64,
            lost: (0..sent).filter(|s| !answers.contains_key(s)).collect(),
            longest_gap,
            nonces: answers.values().map(|a| a.nonce).collect(),
            counters: answers.values().map(|a| a.counter).collect(),
            duplicates: *self.duplicates.lock().unwrap(),
        }
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Send one ICMP echo request from inside `ns` to `ip` and wait up to `timeout` for the
/// reply; returns the round-trip time.
pub fn ping(ns: &Netns, ip: Ipv4Addr, timeout: Duration) -> Option<Duration> {
    ns.enter(move || {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if fd < 0 {
            return None;
        }
        // SAFETY: we own the new descriptor.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut req = [0u8; 64];
        req[0] = 8; // echo request
        req[4..6].copy_from_slice(&0x4c56u16.to_be_bytes()); // identifier
        req[6..8].copy_from_slice(&1u16.to_be_bytes()); // sequence
        for (i, b) in req[8..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let sum = inet_checksum(&req);
        req[2..4].copy_from_slice(&sum.to_be_bytes());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let t = Instant::now();
        // SAFETY: sendto reads `req` and `addr`, both live for the call.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return None;
        }
        let mut buf = [0u8; 1500];
        while t.elapsed() < timeout {
            let mut p = libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
                continue;
            }
            // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 28 {
                continue;
            }
            let ihl = usize::from(buf[0] & 15) * 4;
            let icmp = &buf[ihl..n as usize];
            if icmp.len() >= 8 && icmp[0] == 0 && icmp[4..8] == req[4..8] && icmp[8..] == req[8..] {
                return Some(t.elapsed());
            }
        }
        None
    })
}

/// The Internet checksum (RFC 1071) of `b`: IPv4 headers, ICMP.
pub fn inet_checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

//! virtio-net on TAP through the real launcher: the `netecho` guest answers ARP, ICMP and
//! UDP in a network namespace made by the test, while its launcher is replaced by local
//! handover (no datagram may be lost) or the VM is copy-migrated to a TAP in another
//! namespace joined by a veth pair (losses bounded by the downtime). Bad `--net` input must
//! give clear errors. The guest runs with `csum=1`: its UDP answers carry a checksum that
//! only the host kernel completes (virtio-net `VIRTIO_NET_F_CSUM`, the guest's
//! `VIRTIO_NET_HDR_F_NEEDS_CSUM` header passed to the TAP unchanged), so an answer arrives
//! only if the offload negotiated at boot is still applied by every later launcher. Everything happens inside namespaces the test creates (private
//! 10.99.0.0/16 addresses); only the `ip` tool is needed (.ci/run installs iproute2).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use integration_tests::netns::{ping, require_ip, Netns, UdpFlow};
use integration_tests::{bin, guests, path_str, Launcher, MigrateJob, TempDir};

/// Gap between two datagrams of the flow (500 per second).
const INTERVAL: Duration = Duration::from_millis(2);
const MAC: &str = "52:54:00:12:34:56";

/// `launcher run <args>` inside `ns`, console in `serial`.
fn launcher_in(ns: &Netns, args: &[&str], serial: &Path, api: &Path) -> Launcher {
    let mut cmd = ns.command(bin("launcher"));
    cmd.arg("run")
        .args(args)
        .arg("--serial")
        .arg(serial)
        .arg("--api-socket")
        .arg(api);
    let stderr = std::fs::File::create(serial.with_extension(format!(
        "{}.stderr",
        api.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    )))
    .expect("stderr file");
    cmd.stdout(Stdio::null()).stderr(stderr);
    Launcher {
        child: cmd.spawn().expect("spawn launcher"),
        serial: serial.to_path_buf(),
        api: Some(api.to_path_buf()),
    }
}

fn boot_netecho(ns: &Netns, dir: &TempDir, tap: &str, ip: &str, api: &str) -> Launcher {
    // csum=1: UDP answers with a checksum the device has the host complete.
    let cmdline = format!("ip={ip} port=7 every_ms=500 csum=1");
    let net = format!("tap={tap},mac={MAC}");
    let mut l = launcher_in(
        ns,
        &[
            "--kernel",
            path_str(guests::netecho_path()),
            "--cmdline",
            &cmdline,
            "--memory",
            "64Mi",
            "--net",
            &net,
        ],
        &dir.join("console.log"),
        &dir.join(api),
    );
    l.wait_console(&format!("netecho: up mac={MAC} ip={ip} port=7"));
    l.wait_api();
    assert!(
        l.console().contains(" csum=1\n"),
        "the guest did not negotiate VIRTIO_NET_F_CSUM: {}",
        l.console()
    );
    l
}

/// Let the flow run until `n` more answers arrived (the path works).
fn wait_answers(flow: &UdpFlow, n: usize) {
    let deadline = std::time::Instant::now() + integration_tests::SAFETY;
    let start = flow.answered();
    while flow.answered() < start + n {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest does not answer"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[cfg_attr(
    not(has_ip),
    ignore = "the `ip` tool (iproute2) is not installed (CI installs it)"
)]
fn local_handover_loses_no_datagram() {
    require_ip();
    let ns = Netns::new("netlocal");
    ns.tap_up("tap0", "10.99.0.1/24");
    let dir = TempDir::new("net-local");
    let mut a = boot_netecho(&ns, &dir, "tap0", "10.99.0.2", "a.sock");
    let rtt = ping(&ns, Ipv4Addr::new(10, 99, 0, 2), Duration::from_secs(5));
    assert!(rtt.is_some(), "no ICMP echo reply: {}", a.console());
    assert!(
        a.console().contains("virtio msix=1 event_idx=1"),
        "{}",
        a.console()
    );

    let flow = UdpFlow::start(
        &ns,
        SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 7),
        INTERVAL,
    );
    wait_answers(&flow, 100);
    let mut total_lost = 0;
    let mut gaps = Vec::new();
    // Two updates in a row: launcher a -> b -> c, each by local handover.
    let mut current = "a.sock".to_string();
    for next in ["b.sock", "c.sock"] {
        let mig = format!("unix:{}", path_str(&dir.join(&format!("{next}.mig"))));
        let mut b = launcher_in(
            &ns,
            &["--incoming", &mig],
            &dir.join("console.log"),
            &dir.join(next),
        );
        b.wait_api();
        let out = MigrateJob::start(&dir.join(&current), &mig, &["--local"], dir.path()).finish();
        assert!(
            out.status.success(),
            "local migration failed: {}\n{}",
            out.report,
            out.stderr
        );
        assert_eq!(out.str("status"), "completed");
        assert_eq!(a.wait().code(), Some(64), "source: {}", a.stderr());
        wait_answers(&flow, 100);
        a = b;
        current = next.to_string();
        gaps.push(out.report["downtimeMs"].as_f64().unwrap_or(0.0));
    }
    let report = flow.stop();
    total_lost += report.lost.len();
    eprintln!("local handover x2 (downtimes {gaps:?} ms): {report}");
    assert_eq!(
        total_lost, 0,
        "datagrams lost across a local handover: {:?}",
        report.lost
    );
    assert!(
        report.guest_continuous(),
        "guest restarted or skipped: {report}"
    );
    assert!(
        ping(&ns, Ipv4Addr::new(10, 99, 0, 2), Duration::from_secs(5)).is_some(),
        "no ICMP echo after the handovers"
    );
    assert_eq!(
        a.console().matches("netecho: booted").count(),
        1,
        "the guest booted more than once"
    );
}

#[test]
#[cfg_attr(
    not(has_ip),
    ignore = "the `ip` tool (iproute2) is not installed (CI installs it)"
)]
fn copy_migration_to_another_namespace_bounds_losses() {
    require_ip();
    // Two "hosts": each namespace has a bridge with its TAP; a veth pair joins the bridges.
    let na = Netns::new("netcpa");
    let nb = Netns::new("netcpb");
    na.ip("tuntap add dev tapa mode tap");
    nb.ip("tuntap add dev tapb mode tap");
    na.ip("link add br0 type bridge");
    nb.ip("link add br0 type bridge");
    na.ip(&format!(
        "link add vetha type veth peer name vethb netns {}",
        nb.name()
    ));
    for (ns, tap, veth) in [(&na, "tapa", "vetha"), (&nb, "tapb", "vethb")] {
        ns.ip(&format!("link set {tap} master br0"));
        ns.ip(&format!("link set {veth} master br0"));
        for l in [tap, veth, "br0"] {
            ns.ip(&format!("link set {l} up"));
        }
    }
    na.ip("addr add 10.99.1.1/24 dev br0");
    let dir = TempDir::new("net-copy");
    let mut a = boot_netecho(&na, &dir, "tapa", "10.99.1.2", "a.sock");
    let flow = UdpFlow::start(
        &na,
        SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), 7),
        INTERVAL,
    );
    wait_answers(&flow, 200);
    let mig = format!("unix:{}", path_str(&dir.join("b.mig")));
    // The destination attaches to its own host's TAP; the MAC comes with the VM.
    let mut b = launcher_in(
        &nb,
        &["--incoming", &mig, "--net", "tap=tapb"],
        &dir.join("console.log"),
        &dir.join("b.sock"),
    );
    b.wait_api();
    // The incoming launcher attached tapb at start-up. Bridge ports forward only once
    // the kernel noticed their carrier (up to a second for new links): wait, or the
    // announcement would be dropped on the way.
    nb.wait_bridge_port_forwarding("tapb");
    nb.wait_bridge_port_forwarding("vethb");
    na.wait_bridge_port_forwarding("vetha");
    let before = flow.sent();
    let out = MigrateJob::start(&dir.join("a.sock"), &mig, &[], dir.path()).finish();
    eprintln!(
        "migration ran while seq {before}..{} were sent",
        flow.sent()
    );
    assert!(
        out.status.success(),
        "copy migration failed: {}\n{}",
        out.report,
        out.stderr
    );
    assert_eq!(a.wait().code(), Some(64));
    wait_answers(&flow, 200);
    let report = flow.stop();
    let downtime_ms = out.report["downtimeMs"].as_f64().unwrap_or(0.0);
    eprintln!("copy migration (downtime {downtime_ms:.2} ms): {report}");
    // Frames sent while the guest is paused, or before the RARP announcement moved the
    // bridges' entry to the new TAP, are lost: about (downtime + announce) / interval.
    let bound = ((downtime_ms + 50.0) / INTERVAL.as_secs_f64() / 1e3).ceil() as usize + 2;
    assert!(
        report.lost.len() <= bound,
        "{} datagrams lost, more than the {bound} the downtime explains: {report}",
        report.lost.len()
    );
    assert!(
        report.guest_continuous(),
        "guest restarted or skipped: {report}"
    );
    assert!(
        ping(&na, Ipv4Addr::new(10, 99, 1, 2), Duration::from_secs(5)).is_some(),
        "no ICMP echo from the guest on the other host"
    );
    drop(b);
}

/// `launcher run` in `ns` that must fail: returns its stderr.
fn run_fails(ns: &Netns, net: &str, stdin: Stdio) -> String {
    let out = ns
        .command(bin("launcher"))
        .args(["run", "--kernel", path_str(guests::netecho_path())])
        .args(["--memory", "64Mi", "--serial", "/dev/null", "--net", net])
        .stdin(stdin)
        .output()
        .expect("run launcher");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "--net {net}: {err}");
    err
}

#[test]
#[cfg_attr(
    not(has_ip),
    ignore = "the `ip` tool (iproute2) is not installed (CI installs it)"
)]
fn bad_net_options_are_refused_clearly() {
    require_ip();
    let ns = Netns::new("netbad");
    ns.ip("tuntap add dev tap0 mode tap");
    ns.ip("tuntap add dev tun0 mode tun");
    ns.ip("tuntap add dev tap1 mode tap");
    ns.ip("tuntap add dev tap2 mode tap");
    let e = run_fails(&ns, "tap=nosuch0", Stdio::null());
    assert!(e.contains("no network interface \"nosuch0\""), "{e}");
    let e = run_fails(&ns, "tap=tun0", Stdio::null());
    assert!(e.contains("tun0 is not a TAP device"), "{e}");
    let e = run_fails(&ns, "tap=tap0,mac=zz:00", Stdio::null());
    assert!(e.contains("not a MAC address"), "{e}");
    let e = run_fails(&ns, "tap=tap0,mac=01:00:5e:00:00:01", Stdio::null());
    assert!(e.contains("multicast"), "{e}");
    let e = run_fails(
        &ns,
        "fd=0",
        Stdio::from(std::fs::File::open("/dev/null").unwrap()),
    );
    assert!(
        e.contains("fd=0: the file descriptor is not a TAP device"),
        "{e}"
    );
    let e = run_fails(&ns, "fd=77", Stdio::null());
    assert!(e.contains("file descriptor 77 is not open"), "{e}");
    // An incoming launcher attaches its TAPs at start-up, so a bad one fails at once.
    let out = ns
        .command(bin("launcher"))
        .args([
            "run",
            "--incoming",
            "unix:/nonexistent/x.sock",
            "--net",
            "tap=nosuch0",
        ])
        .output()
        .expect("run launcher");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no network interface \"nosuch0\""), "{err}");
    let e = run_fails(&ns, "tap=tap0,fd=3", Stdio::null());
    assert!(e.contains("not both"), "{e}");

    // A TAP already in use by a running VM.
    let dir = TempDir::new("net-bad");
    let _a = boot_netecho(&ns, &dir, "tap0", "10.99.2.2", "a.sock");
    let e = run_fails(&ns, "tap=tap0", Stdio::null());
    assert!(e.contains("already attached"), "{e}");

    // An incoming launcher whose --net count does not match the VM's interfaces: the
    // migration is refused and the source keeps running.
    let mig = format!("unix:{}", path_str(&dir.join("b.mig")));
    let mut b = launcher_in(
        &ns,
        &["--incoming", &mig, "--net", "tap=tap1", "--net", "tap=tap2"],
        &dir.join("b-console.log"),
        &dir.join("b.sock"),
    );
    b.wait_api();
    let out = MigrateJob::start(&dir.join("a.sock"), &mig, &[], dir.path()).finish();
    assert!(!out.status.success());
    assert!(
        out.report.to_string().contains("2 --net options"),
        "{}\n{}",
        out.report,
        out.stderr
    );
}

/// `/dev/net/tun` attached to TAP `name` of the calling thread's namespace, without
/// `IFF_VNET_HDR` (as a tool that knows nothing of vnet headers would hand it over).
fn open_tap_without_vnet_hdr(name: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // struct ifreq: name[16], flags (short), padding to 40 bytes.
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is large enough for.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    file
}

#[test]
#[cfg_attr(
    not(has_ip),
    ignore = "the `ip` tool (iproute2) is not installed (CI installs it)"
)]
fn a_handed_in_tap_without_the_vnet_header_works_without_offloads() {
    require_ip();
    let ns = Netns::new("netnohdr");
    ns.tap_up("tap0", "10.99.3.1/24");
    let tap = ns.enter(|| open_tap_without_vnet_hdr("tap0"));
    let dir = TempDir::new("net-nohdr");
    let (serial, api) = (dir.join("console.log"), dir.join("a.sock"));
    let net = format!("fd=0,mac={MAC}");
    let mut cmd = ns.command(bin("launcher"));
    cmd.args(["run", "--kernel", path_str(guests::netecho_path())])
        .args(["--cmdline", "ip=10.99.3.2 port=7 every_ms=500 csum=1"])
        .args(["--memory", "64Mi", "--net", &net, "--serial"])
        .arg(&serial)
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::from(tap))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).expect("stderr file"));
    let mut l = Launcher {
        child: cmd.spawn().expect("spawn launcher"),
        serial,
        api: Some(api),
    };
    l.wait_console(&format!("netecho: up mac={MAC} ip=10.99.3.2 port=7"));
    // The device offered no offload, so the guest checksums its datagrams itself...
    assert!(l.console().contains(" csum=0\n"), "{}", l.console());
    // ...and they arrive: the device added the header the TAP does not take.
    let flow = UdpFlow::start(
        &ns,
        SocketAddrV4::new(Ipv4Addr::new(10, 99, 3, 2), 7),
        INTERVAL,
    );
    wait_answers(&flow, 50);
    let report = flow.stop();
    assert!(report.guest_continuous(), "{report}");
}

//! End to end: a noded VM with a network interface (`interfaces: [{tap}]`) keeps answering
//! a steady UDP flow, without losing a datagram, while noded live-updates it to a newly
//! installed launcher version by local handover (the TAP descriptor travels with the guest
//! memory). The `netecho` guest runs in a network namespace made by the test (private
//! 10.99.5.0/24 addresses); noded's launchers are started inside it by a wrapper script
//! (`ip netns exec`), since a TAP is opened by name in the launcher's namespace. Only the
//! `ip` tool is needed (.ci/run installs iproute2).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::netns::{ping, require_ip, Netns, UdpFlow};
use integration_tests::node::{processes_mentioning, Node};
use integration_tests::{guests, SAFETY};

/// Gap between two datagrams of the flow (500 per second).
const INTERVAL: Duration = Duration::from_millis(2);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 5, 2);

/// A wrapper around `real` whose `run` happens inside `ns` (other commands, such as
/// `capabilities`, run directly). `ip netns exec` execs the launcher, so the pid noded
/// records is the launcher's.
fn launcher_in_ns(node: &Node, ns: &Netns, name: &str, real: &Path) -> std::path::PathBuf {
    node.launcher_script_named(
        name,
        real,
        &format!(
            "exec ip netns exec {} '{}' \"$@\"",
            ns.name(),
            real.display()
        ),
    )
}

/// Let the flow run until `n` more answers arrived (the path works).
fn wait_answers(flow: &UdpFlow, n: usize, node: &Node) {
    let deadline = Instant::now() + SAFETY;
    let start = flow.answered();
    while flow.answered() < start + n {
        assert!(
            Instant::now() < deadline,
            "the guest does not answer\nconsole:\n{}\nnoded log:\n{}",
            node.console("echo"),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[cfg_attr(
    not(has_ip),
    ignore = "the `ip` tool (iproute2) is not installed (CI installs it)"
)]
fn noded_updates_a_networked_vm_without_losing_a_datagram() {
    require_ip();
    let ns = Netns::new("nodenet");
    ns.tap_up("tap0", "10.99.5.1/24");
    ns.ip("tuntap add dev tap1 mode tap");

    let node = Node::start("net", "{}\n");
    // Build version B first, so that the flow does not wait for a compiler.
    let b = launcher_in_ns(
        &node,
        &ns,
        "launcher-b-ns",
        &node.launcher_version("9.0.0", false),
    );
    let a = launcher_in_ns(&node, &ns, "launcher-a-ns", &node.launcher_a());
    let va = node.install(&a)["version"]
        .as_str()
        .expect("version")
        .to_string();

    // No MAC in the spec: noded chooses one at creation and stores it.
    let spec = format!(
        "name: echo\nkernel: {}\ncmdline: ip={GUEST_IP} port=7 every_ms=500\nmemory: 64Mi\n\
         interfaces: [{{tap: tap0}}]\n",
        guests::netecho_path().display()
    );
    let f = node.file("echo.yaml", &spec);
    node.ctl(&["vm", "create", "-f", &f]);
    let stored = node.vm("echo")["spec"]["interfaces"].clone();
    let mac = stored[0]["mac"]
        .as_str()
        .unwrap_or_else(|| panic!("no MAC stored: {stored}"))
        .to_string();
    assert_eq!(stored[0]["tap"], "tap0");
    assert!(mac.starts_with("52:54:00:"), "{mac}");

    // Bad input: a TAP another VM uses, a malformed MAC, too long a TAP name.
    let other = |ifs: &str| {
        let f = node.file(
            "other.yaml",
            &format!("name: other\nkernel: /k\nmemory: 64Mi\ninterfaces: [{ifs}]\n"),
        );
        node.try_ctl(&["vm", "create", "-f", &f])
            .expect_err("the spec must be refused")
    };
    let e = other("{tap: tap0}");
    assert!(e.contains("TAP \"tap0\" is already used by VM echo"), "{e}");
    let e = other(&format!("{{tap: tap1, mac: \"{mac}\"}}"));
    assert!(e.contains("is already the MAC of VM echo"), "{e}");
    let e = other("{tap: tap1, mac: \"52:54:00:zz:00:01\"}");
    assert!(e.contains("interfaces[0].mac"), "{e}");
    let e = other("{tap: this-name-is-too-long}");
    assert!(e.contains("interfaces[0].tap"), "{e}");

    node.wait_vm("echo", "Running", Some(&va));
    node.wait_until("netecho up", || {
        node.console("echo")
            .contains(&format!("netecho: up mac={mac} ip={GUEST_IP} port=7"))
            .then_some(())
    });
    assert!(
        ping(&ns, GUEST_IP, Duration::from_secs(5)).is_some(),
        "no ICMP echo reply: {}",
        node.console("echo")
    );
    let flow = UdpFlow::start(&ns, SocketAddrV4::new(GUEST_IP, 7), INTERVAL);
    wait_answers(&flow, 250, &node);

    // Install version B: noded moves the VM by local handover while the flow runs.
    node.install(&b);
    let v = node.wait_vm("echo", "Running", Some("9.0.0"));
    assert_eq!(v["outdated"], false);
    wait_answers(&flow, 250, &node);
    let report = flow.stop();
    let recs = node.ctl(&["migrations", "echo"]);
    let downtime = recs[0]["report"]["downtimeMs"].as_f64().unwrap_or(-1.0);
    eprintln!("noded update by local handover (downtime {downtime:.2} ms): {report}");
    assert_eq!(recs.as_array().map(Vec::len), Some(1), "{recs}");
    assert_eq!(recs[0]["outcome"], "Succeeded", "{recs}");
    assert!(
        report.lost.is_empty(),
        "datagrams lost across the update: {report}"
    );
    assert!(
        report.guest_continuous(),
        "guest restarted or skipped: {report}"
    );
    assert!(
        ping(&ns, GUEST_IP, Duration::from_secs(5)).is_some(),
        "no ICMP echo after the update"
    );
    let console = node.console("echo");
    assert_eq!(
        console.matches("netecho: booted").count(),
        1,
        "the guest booted more than once:\n{console:.2000}"
    );
    assert_eq!(
        node.vm("echo")["spec"]["interfaces"],
        stored,
        "the interface and its MAC are unchanged by the update"
    );
    // Exactly one launcher runs the VM.
    assert_eq!(
        processes_mentioning(&node.state().join("vms/echo/").display().to_string()).len(),
        1
    );
}

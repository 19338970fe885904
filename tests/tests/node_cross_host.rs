//! End to end: an operator moves a running VM from one noded to another over TCP with
//! mutual TLS (`nodectl vm receive` on the target node, `nodectl vm migrate` on the
//! source node). Two test "hosts" are network namespaces joined by a veth pair
//! (10.123.1.1/24 and 10.123.1.2/24, as in cross_host.rs); each has its own noded (on the
//! host file system) whose launchers run inside its namespace through a wrapper script
//! (`ip netns exec`, as in node_net.rs), so the migration can only go over the veth pair.
//!
//! The `pattern` guest created on node A is first sent to an address where nothing
//! listens (the migration fails, the VM keeps running on A), then received on node B and
//! migrated A→B: it runs on B with its pass numbers continuing (one boot, no STALE page),
//! and A records it as MovedAway and never restarts it.

use std::path::PathBuf;
use std::time::Duration;

use integration_tests::netns::{require_ip, Netns};
use integration_tests::node::{last_pass, processes_mentioning, Node};
use integration_tests::tls_ca::Ca;
use integration_tests::{assert_pattern_consistent, guests, vm_state};

const EVERY: u64 = 200;
const IP_A: &str = "10.123.1.1";
const IP_B: &str = "10.123.1.2";
const PORT: u16 = 4792;

/// The node's launcher, whose `run` happens inside `ns`.
fn launcher_in_ns(node: &Node, ns: &Netns) -> PathBuf {
    let real = node.launcher_a();
    node.launcher_script_named(
        "launcher-ns",
        &real,
        &format!(
            "exec ip netns exec {} '{}' \"$@\"",
            ns.name(),
            real.display()
        ),
    )
}

#[test]
#[cfg_attr(
    not(has_ip),
    ignore = "the `ip` tool (iproute2) is not installed (CI installs it)"
)]
fn noded_moves_a_vm_to_another_node_over_tls() {
    require_ip();
    // Declared first, dropped last: the nodes (and their launchers) go first.
    let a_ns = Netns::new("nxa");
    let b_ns = Netns::new("nxb");
    a_ns.ip(&format!(
        "link add veth0 type veth peer name veth0 netns {}",
        b_ns.name()
    ));
    for (ns, ip) in [(&a_ns, IP_A), (&b_ns, IP_B)] {
        ns.ip(&format!("addr add {ip}/24 dev veth0"));
        ns.ip("link set veth0 up");
    }
    let a = Node::start("xhost-a", "{}\n");
    let b = Node::start("xhost-b", "{}\n");
    let ca = Ca::new("node test CA");
    let tls_a = ca.tls_dir(&a.dir.join("tls"), &[IP_A]);
    let tls_b = ca.tls_dir(&b.dir.join("tls"), &[IP_B]);
    let va = a.install(&launcher_in_ns(&a, &a_ns))["version"]
        .as_str()
        .expect("version")
        .to_string();
    b.install(&launcher_in_ns(&b, &b_ns));

    let spec = format!(
        "name: pat\nkernel: {}\ncmdline: mib=4 every={EVERY}\nmemory: 64Mi\n",
        guests::pattern_path().display()
    );
    let fa = a.file("pat.yaml", &spec);
    a.ctl(&["vm", "create", "-f", &fa]);
    a.wait_vm("pat", "Running", Some(&va));
    a.wait_pass_above("pat", 2 * EVERY);
    let to = format!("tcp:{IP_B}:{PORT}");

    // Nobody listens on B yet: the migration fails and the VM keeps running on A.
    let e = a
        .try_ctl(&["vm", "migrate", "pat", "--to", &to, "--tls-dir", &tls_a])
        .expect_err("a migration to nowhere must fail");
    assert!(e.contains("did not move"), "{e}");
    let v = a.wait_vm("pat", "Running", Some(&va));
    assert!(
        v["message"].as_str().unwrap_or("").contains("failed"),
        "{v}"
    );
    let before = a.wait_pass_above("pat", last_pass(&a.console("pat")).unwrap_or(0));

    // Bad input is refused up front.
    let e = b
        .try_ctl(&[
            "vm",
            "receive",
            "-f",
            &fa,
            "--listen",
            "10.0.0.1",
            "--tls-dir",
            &tls_b,
        ])
        .expect_err("a listen address without tcp: must be refused");
    assert!(e.contains("tcp:HOST:PORT"), "{e}");

    // B waits for the VM.
    let fb = b.file("pat.yaml", &spec);
    let r = b.ctl(&[
        "vm",
        "receive",
        "-f",
        &fb,
        "--listen",
        &to,
        "--tls-dir",
        &tls_b,
    ]);
    assert_eq!(r["phase"], "Receiving", "{r}");
    let b_api = b.state().join("vms/pat/api-1.sock");
    b.wait_until("B's incoming launcher", || {
        (b_api.exists() && vm_state(&b_api) == "incoming").then_some(())
    });
    assert_eq!(b.vm("pat")["phase"], "Receiving");

    // A → B.
    let v = a.ctl(&["vm", "migrate", "pat", "--to", &to, "--tls-dir", &tls_a]);
    assert_eq!(v["phase"], "MovedAway", "{v}");
    let vb = b.wait_vm("pat", "Running", None);
    assert!(vb["pid"].as_u64().is_some(), "{vb}");
    let cb_pass = b.wait_pass_above("pat", before + EVERY);
    assert!(cb_pass > before);

    // One boot, passes continuing across the two consoles, no STALE page.
    let (ca_text, cb_text) = (a.console("pat"), b.console("pat"));
    assert!(
        !cb_text.contains("pattern: booted"),
        "the guest booted again on B:\n{cb_text}"
    );
    assert_pattern_consistent(&(ca_text + &cb_text), EVERY);

    // A: moved away, not restarted, its launcher gone; a start is refused.
    std::thread::sleep(Duration::from_secs(2));
    let va_view = a.vm("pat");
    assert_eq!(va_view["phase"], "MovedAway", "{va_view}");
    assert!(va_view["pid"].is_null(), "{va_view}");
    assert!(
        va_view["message"].as_str().unwrap_or("").contains(&to),
        "{va_view}"
    );
    let a_vm_dir = a.state().join("vms/pat").display().to_string();
    let left: Vec<i32> = processes_mentioning(&a_vm_dir);
    assert!(left.is_empty(), "launchers still running on A: {left:?}");
    let e = a
        .try_ctl(&["vm", "start", "pat"])
        .expect_err("starting a moved VM must be refused");
    assert!(e.contains("would run it twice"), "{e}");
    let list = a.ctl(&["vm", "list"]);
    assert_eq!(list[0]["phase"], "MovedAway", "{list}");
    let list = b.ctl(&["vm", "list"]);
    assert_eq!(list[0]["phase"], "Running", "{list}");
    let migs = a.ctl(&["migrations", "pat"]);
    let outcomes: Vec<&str> = migs
        .as_array()
        .expect("migrations")
        .iter()
        .filter_map(|m| m["outcome"].as_str())
        .collect();
    assert!(outcomes.contains(&"Succeeded"), "{migs}");
    assert!(outcomes.contains(&"Failed"), "{migs}");
    // The guest keeps running on B.
    b.wait_pass_above("pat", cb_pass);
    // Deleting the moved-away record on A leaves B alone.
    a.ctl(&["vm", "delete", "pat"]);
    b.wait_pass_above("pat", cb_pass + EVERY);
    assert_eq!(b.vm("pat")["phase"], "Running");
}

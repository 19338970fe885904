//! Cross-host migration over TLS, through the real binaries: two test "hosts" are network
//! namespaces made by the test (`ip netns add`), joined by a veth pair with private
//! addresses that exist only inside them (10.123.0.1/24 on host A, 10.123.0.2/24 on host
//! B). Each host has its own TLS directory, with a certificate for its IP from a test CA
//! (generated here with `rcgen`).
//!
//! Host A runs a `pattern` guest (`ip netns exec A launcher run ...`); host B waits with
//! `launcher run --incoming tcp:10.123.0.2:PORT --tls-dir B` in its namespace. The test
//! runs `launcher migrate --api-socket A.sock --to tcp:10.123.0.2:PORT --tls-dir A`: the
//! CLI talks to A's API socket (a filesystem path), and the migration connection is made
//! by A's launcher inside namespace A, so it can only go over the veth pair. Then the VM
//! comes back from B to A the same way. A host whose certificate comes from another CA
//! is refused, and the source keeps running.
//!
//! Namespaces and launchers are removed on drop, even when an assertion fails. Only the
//! `ip` tool (iproute2) and root are needed; nothing is configured outside the
//! namespaces.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use integration_tests::netns::{require_ip, Netns};
use integration_tests::tls_ca::Ca;
use integration_tests::{
    assert_pattern_consistent, bin, guests, last_pass, migrate, path_str, shutdown, vm_state,
    wait_console_until, wait_new_pass, wait_pass_beyond, Launcher, TempDir,
};

/// `pass=` line period of the `pattern` guest.
const EVERY: u64 = 200;
/// Host A's address (inside namespace A only).
const IP_A: &str = "10.123.0.1";
/// Host B's address (inside namespace B only).
const IP_B: &str = "10.123.0.2";
/// The migration port (the namespaces are fresh: any port is free there).
const PORT: u16 = 4791;

/// Two test hosts. Fields drop in order: the launchers are killed (and reaped) first,
/// then the namespaces (with the veth pair) are deleted, then the directory is removed;
/// this runs on a failed assertion too.
struct Hosts {
    launchers: Vec<Launcher>,
    a: Netns,
    b: Netns,
    dir: TempDir,
}

impl Hosts {
    /// Namespaces `lvm-<tag>a-<pid>` and `lvm-<tag>b-<pid>`, joined by a veth pair.
    fn new(tag: &str) -> Hosts {
        let dir = TempDir::new(&format!("cross-{tag}"));
        let a = Netns::new(&format!("{tag}a"));
        let b = Netns::new(&format!("{tag}b"));
        a.ip(&format!(
            "link add veth0 type veth peer name veth0 netns {}",
            b.name()
        ));
        for (ns, ip) in [(&a, IP_A), (&b, IP_B)] {
            ns.ip(&format!("addr add {ip}/24 dev veth0"));
            ns.ip("link set veth0 up");
        }
        Hosts {
            launchers: Vec::new(),
            a,
            b,
            dir,
        }
    }

    fn ns(&self, host: char) -> &Netns {
        if host == 'a' {
            &self.a
        } else {
            &self.b
        }
    }

    /// `ip netns exec <host> launcher run <args> --serial console.log --api-socket
    /// <name>.sock`, stderr in `<name>.stderr`; returns its index in `launchers` once the
    /// API answers.
    fn launcher(&mut self, host: char, name: &str, args: &[&str]) -> usize {
        let serial = self.dir.join("console.log");
        let api = self.dir.join(&format!("{name}.sock"));
        let stderr = std::fs::File::create(self.stderr_path(name)).expect("stderr file");
        let mut cmd = self.ns(host).command(bin("launcher"));
        cmd.arg("run")
            .args(args)
            .arg("--serial")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&api)
            .stdout(Stdio::null())
            .stderr(stderr);
        self.launchers.push(Launcher {
            child: cmd.spawn().expect("spawn launcher"),
            serial,
            api: Some(api),
        });
        let i = self.launchers.len() - 1;
        self.launchers[i].wait_api();
        i
    }

    fn stderr_path(&self, name: &str) -> PathBuf {
        self.dir.join(&format!("{name}.stderr"))
    }

    fn stderr(&self, name: &str) -> String {
        std::fs::read_to_string(self.stderr_path(name)).unwrap_or_default()
    }

    /// Boot the `pattern` guest (4 MiB region) on `host`, waiting for two passes.
    fn boot_pattern(&mut self, host: char, name: &str) -> usize {
        let kernel = path_str(guests::pattern_path());
        let cmdline = format!("mib=4 every={EVERY}");
        let i = self.launcher(
            host,
            name,
            &[
                "--kernel",
                kernel,
                "--memory",
                "64Mi",
                "--cmdline",
                &cmdline,
            ],
        );
        wait_console_until(&mut self.launchers[i], "two pass= lines", |c| {
            last_pass(c) >= 2 * EVERY
        });
        i
    }

    /// A destination on `host` listening on its own address with `tls`.
    fn incoming(&mut self, host: char, name: &str, tls: &Path) -> (usize, String) {
        let uri = format!("tcp:{}:{PORT}", if host == 'a' { IP_A } else { IP_B });
        let i = self.launcher(
            host,
            name,
            &["--incoming", &uri, "--tls-dir", path_str(tls)],
        );
        (i, uri)
    }

    /// Bytes received on `host`'s end of the veth pair (`ip -j -s link`).
    fn veth_rx_bytes(&self, host: char) -> u64 {
        let o = std::process::Command::new("ip")
            .args([
                "-n",
                self.ns(host).name(),
                "-j",
                "-s",
                "link",
                "show",
                "veth0",
            ])
            .output()
            .expect("run ip");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("ip -j output");
        v[0]["stats64"]["rx"]["bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no rx bytes in {v}"))
    }

    fn api(&self, i: usize) -> &Path {
        self.launchers[i].api.as_deref().expect("API socket")
    }

    /// Migrate the VM of launcher `src` to `uri` with `tls`, and check the handover:
    /// completed, the source exited 64, the guest keeps passing on `dst` with one boot
    /// and no stale page.
    fn migrate_and_check(&mut self, src: usize, dst: usize, uri: &str, tls: &Path, what: &str) {
        let before = last_pass(&self.launchers[src].console());
        let out = migrate(
            self.api(src),
            uri,
            &["--tls-dir", path_str(tls)],
            self.dir.path(),
        );
        assert!(
            out.status.success(),
            "{what}: migration failed: {}\n{}",
            out.report,
            out.stderr
        );
        assert_eq!(out.str("status"), "completed", "{what}: {}", out.report);
        assert!(out.u64("normalPages") >= 4 * 256, "{what}: {}", out.report);
        let s = &mut self.launchers[src];
        assert_eq!(s.wait().code(), Some(64), "{what}: source exited otherwise");
        let d = &mut self.launchers[dst];
        let at_handover = last_pass(&d.console()).max(before);
        wait_pass_beyond(d, at_handover);
        let now = last_pass(&d.console());
        wait_pass_beyond(d, now);
        assert!(d.alive(), "{what}: destination exited");
        assert_eq!(vm_state(self.api(dst)), "running", "{what}");
        assert_pattern_consistent(&self.launchers[dst].console(), EVERY);
    }
}

#[test]
#[cfg_attr(
    not(has_ip),
    ignore = "the `ip` tool (iproute2) is not installed (CI installs it)"
)]
fn vm_migrates_between_two_hosts_over_tls_and_back() {
    require_ip();
    let mut h = Hosts::new("xh");
    let ca = Ca::new("cross-host CA");
    let (tls_a, tls_b) = (h.dir.join("tls-a"), h.dir.join("tls-b"));
    ca.tls_dir(&tls_a, &[IP_A]);
    ca.tls_dir(&tls_b, &[IP_B]);

    let a1 = h.boot_pattern('a', "a1");
    let (b1, to_b) = h.incoming('b', "b1", &tls_b);
    let rx_b = h.veth_rx_bytes('b');
    h.migrate_and_check(a1, b1, &to_b, &tls_a, "A -> B");
    assert!(!h.launchers[a1].alive());
    // The guest's memory (at least its 4 MiB region) crossed the veth pair.
    let got = h.veth_rx_bytes('b') - rx_b;
    assert!(
        got >= 4 << 20,
        "host B received only {got} bytes on its veth"
    );

    // And back: a fresh launcher on A waits, B's launcher sends.
    let (a2, to_a) = h.incoming('a', "a2", &tls_a);
    let rx_a = h.veth_rx_bytes('a');
    h.migrate_and_check(b1, a2, &to_a, &tls_b, "B -> A");
    let got = h.veth_rx_bytes('a') - rx_a;
    assert!(
        got >= 4 << 20,
        "host A received only {got} bytes on its veth"
    );
    shutdown(&mut h.launchers[a2]);
}

#[test]
#[cfg_attr(
    not(has_ip),
    ignore = "the `ip` tool (iproute2) is not installed (CI installs it)"
)]
fn host_with_a_certificate_from_another_ca_is_refused() {
    require_ip();
    let mut h = Hosts::new("xr");
    let ca = Ca::new("cross-host CA");
    let rogue = Ca::new("rogue CA");
    let (tls_a, tls_b) = (h.dir.join("tls-a"), h.dir.join("tls-b"));
    ca.tls_dir(&tls_a, &[IP_A]);
    // Host B's certificate (for its right address) comes from another CA; B even trusts
    // the real CA, so only A's check of B's certificate can refuse it.
    rogue.tls_dir(&tls_b, &[IP_B]);
    std::fs::write(tls_b.join("ca.pem"), ca.pem()).expect("ca.pem");

    let a1 = h.boot_pattern('a', "a1");
    let (b1, to_b) = h.incoming('b', "b1", &tls_b);
    let out = migrate(
        h.api(a1),
        &to_b,
        &["--tls-dir", path_str(&tls_a)],
        h.dir.path(),
    );
    assert!(!out.status.success(), "{}", out.report);
    assert_ne!(out.str("status"), "completed");
    let text = format!("{}{}", out.report, out.stderr);
    assert!(
        text.contains("TLS handshake")
            && text.contains("the destination's certificate is not signed by the CA")
            && text.contains("unknown CA"),
        "the source must say the destination's certificate was refused: {text}"
    );
    // The source runs on, untouched; the refused host never started the guest.
    assert!(h.launchers[a1].alive(), "source stderr: {}", h.stderr("a1"));
    let src = &mut h.launchers[a1];
    wait_new_pass(src);
    wait_new_pass(src);
    assert_eq!(vm_state(h.api(a1)), "running");
    assert_pattern_consistent(&h.launchers[a1].console(), EVERY);
    assert_eq!(vm_state(h.api(b1)), "incoming");
    shutdown(&mut h.launchers[a1]);
}

//! TCP migration security, through the real binaries: TLS with mutual certificates
//! (`--tls-dir DIR` on both sides, holding `ca.pem`, `cert.pem`, `key.pem`), a sender
//! whose certificate comes from another CA refused in the handshake, and plain TCP only
//! with an explicit `--insecure`.
//!
//! The CA and certificates are generated here with `rcgen`.

use integration_tests::tls_ca::Ca;
use integration_tests::{api_of, boot_pattern_source};
use integration_tests::{
    assert_pattern_consistent, free_tcp_port, last_pass, launcher_cmd, migrate, path_str, vm_state,
    wait_new_pass, wait_pass_beyond, Launcher, TempDir,
};

/// `pass=` line period of the `pattern` guest.
const EVERY: u64 = 200;

fn boot_source(dir: &TempDir) -> Launcher {
    boot_pattern_source(&dir.join("console.log"), &dir.join("src.sock"), EVERY)
}

/// `launcher run --incoming URI <extra>` appending to the VM's console log.
fn destination(dir: &TempDir, uri: &str, extra: &[&str], n: usize) -> Launcher {
    let mut args = vec!["--incoming", uri];
    args.extend_from_slice(extra);
    let mut l = Launcher::run(
        &args,
        &dir.join("console.log"),
        Some(&dir.join(&format!("dst-{n}.sock"))),
    );
    l.wait_api();
    l
}

/// The source handed the VM over: it exited 64, the destination runs the guest on.
fn assert_handed_over(src: &mut Launcher, dst: &mut Launcher) {
    assert_eq!(src.wait().code(), Some(64), "stderr: {}", src.stderr());
    let before = last_pass(&dst.console());
    wait_pass_beyond(dst, before);
    assert_eq!(vm_state(api_of(dst)), "running");
    assert_pattern_consistent(&dst.console(), EVERY);
}

#[test]
fn tls_copy_migration_of_a_running_guest() {
    let dir = TempDir::new("tls-ok");
    let ca = Ca::new("migration CA");
    let (src_tls, dst_tls) = (dir.join("src-tls"), dir.join("dst-tls"));
    let _ = ca.tls_dir(&src_tls, &["source.test"]);
    let _ = ca.tls_dir(&dst_tls, &["localhost", "127.0.0.1"]);
    let mut src = boot_source(&dir);
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = destination(&dir, &uri, &["--tls-dir", path_str(&dst_tls)], 1);
    let out = migrate(
        api_of(&src),
        &uri,
        &["--tls-dir", path_str(&src_tls)],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "TLS migration failed: {}\n{}",
        out.report,
        out.stderr
    );
    assert_eq!(out.str("status"), "completed", "{}", out.report);
    assert!(out.u64("normalPages") >= 4 * 256, "{}", out.report);
    assert_handed_over(&mut src, &mut dst);
    integration_tests::shutdown(&mut dst);
}

/// `--tls-server-name`: the destination's certificate names only `dest.test`; verifying
/// the URI's HOST (127.0.0.1) fails with a name mismatch, naming that name verifies.
#[test]
fn tls_server_name_is_verified() {
    let dir = TempDir::new("tls-name");
    let ca = Ca::new("migration CA");
    let (src_tls, dst_tls) = (dir.join("src-tls"), dir.join("dst-tls"));
    let _ = ca.tls_dir(&src_tls, &["source.test"]);
    let _ = ca.tls_dir(&dst_tls, &["dest.test"]);
    let mut src = boot_source(&dir);
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = destination(&dir, &uri, &["--tls-dir", path_str(&dst_tls)], 1);
    let out = migrate(
        api_of(&src),
        &uri,
        &["--tls-dir", path_str(&src_tls)],
        dir.path(),
    );
    assert!(!out.status.success(), "{}", out.report);
    let text = format!("{}{}", out.report, out.stderr);
    assert!(
        text.contains("not valid for the name 127.0.0.1") && text.contains("dest.test"),
        "the error must name the mismatch: {text}"
    );
    assert_eq!(vm_state(api_of(&src)), "running");
    wait_new_pass(&mut src);
    // The refused handshake did not use up the destination: it still waits.
    assert!(dst.alive(), "stderr: {}", dst.stderr());
    let out = migrate(
        api_of(&src),
        &uri,
        &[
            "--tls-dir",
            path_str(&src_tls),
            "--tls-server-name",
            "dest.test",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}\n{}", out.report, out.stderr);
    assert_handed_over(&mut src, &mut dst);
    integration_tests::shutdown(&mut dst);
}

/// A sender whose certificate another CA signed is refused in the handshake, before
/// any migration frame: the source keeps running, the destination never starts the
/// guest and keeps waiting for a legitimate sender.
#[test]
fn sender_with_a_certificate_from_another_ca_is_refused() {
    let dir = TempDir::new("tls-rogue");
    let ca = Ca::new("migration CA");
    let rogue = Ca::new("rogue CA");
    let (rogue_tls, dst_tls, src_tls) = (dir.join("rogue"), dir.join("dst"), dir.join("src"));
    let _ = rogue.tls_dir(&rogue_tls, &["source.test"]);
    // The rogue sender even trusts the real CA (so it accepts the destination).
    std::fs::write(rogue_tls.join("ca.pem"), ca.pem()).expect("ca.pem");
    let _ = ca.tls_dir(&dst_tls, &["127.0.0.1"]);
    let _ = ca.tls_dir(&src_tls, &["source.test"]);
    let mut src = boot_source(&dir);
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = destination(&dir, &uri, &["--tls-dir", path_str(&dst_tls)], 1);
    let out = migrate(
        api_of(&src),
        &uri,
        &["--tls-dir", path_str(&rogue_tls)],
        dir.path(),
    );
    assert!(!out.status.success(), "{}", out.report);
    assert_ne!(out.str("status"), "completed");
    let text = format!("{}{}", out.report, out.stderr);
    assert!(
        text.contains("TLS handshake") && text.contains("unknown CA"),
        "the sender must say its certificate was refused: {text}"
    );
    // The destination refused it during the handshake and said why.
    let deadline = std::time::Instant::now() + integration_tests::SAFETY;
    while !dst.stderr().contains("unknown CA") {
        assert!(
            std::time::Instant::now() < deadline,
            "destination stderr: {}",
            dst.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        dst.stderr()
            .contains("the source's certificate is not signed by the CA"),
        "{}",
        dst.stderr()
    );
    assert!(!dst.stderr().contains("frame"), "{}", dst.stderr());
    // The source runs on, untouched.
    assert!(src.alive(), "{}", src.stderr());
    assert_eq!(vm_state(api_of(&src)), "running");
    wait_new_pass(&mut src);
    wait_new_pass(&mut src);
    assert_pattern_consistent(&src.console(), EVERY);
    // The destination did not start anything and still accepts the real source.
    assert_eq!(vm_state(api_of(&dst)), "incoming");
    let out = migrate(
        api_of(&src),
        &uri,
        &["--tls-dir", path_str(&src_tls)],
        dir.path(),
    );
    assert!(out.status.success(), "{}\n{}", out.report, out.stderr);
    assert_handed_over(&mut src, &mut dst);
    integration_tests::shutdown(&mut dst);
}

/// Plain TCP without `--insecure` is refused on both sides with a message that names
/// both ways out; with `--insecure` on both sides it works.
#[test]
fn plain_tcp_needs_insecure() {
    let dir = TempDir::new("tls-plain");
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    // Destination side: refused at start.
    let out = launcher_cmd(&["run", "--incoming", &uri, "--serial", "/dev/null"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure") && err.contains("--tls-dir"),
        "{err}"
    );
    // Source side: refused before connecting; the VM keeps running.
    let mut src = boot_source(&dir);
    let out = migrate(api_of(&src), &uri, &[], dir.path());
    assert!(!out.status.success(), "{}", out.report);
    let text = format!("{}{}", out.report, out.stderr);
    assert!(
        text.contains("neither authenticated nor encrypted")
            && text.contains("--insecure")
            && text.contains("--tls-dir"),
        "{text}"
    );
    assert_eq!(vm_state(api_of(&src)), "running");
    wait_new_pass(&mut src);
    // With --insecure on both sides, it migrates.
    let mut dst = destination(&dir, &uri, &["--insecure"], 1);
    let out = migrate(api_of(&src), &uri, &["--insecure"], dir.path());
    assert!(out.status.success(), "{}\n{}", out.report, out.stderr);
    assert_handed_over(&mut src, &mut dst);
    integration_tests::shutdown(&mut dst);
}

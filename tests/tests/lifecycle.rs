//! The launcher's lifecycle through its API: concurrent pauses, typed request bodies, and
//! a guest reset in the middle of a migration (issue 13, defects 1 and 2).

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::{
    api, api_of, boot_pattern_source, guests, incoming, migrate, path_str, shutdown, vm_state,
    wait_console_until, wait_new_pass, Launcher, TempDir, SAFETY,
};

#[test]
fn concurrent_pauses_pause_once_and_one_resume_runs_the_guest_again() {
    // Defect 1: two concurrent PUT /v1/pause both passed the "running?" check and reached
    // pause depth 2; one resume then reported "running" with the vCPUs still paused, and
    // every later resume got 409.
    let dir = TempDir::new("pause-race");
    let mut l = boot_pattern_source(&dir.join("console.log"), &dir.join("api.sock"), 20);
    let sock = api_of(&l).to_path_buf();
    for round in 0..3 {
        let answers: Vec<(u16, serde_json::Value)> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..6)
                .map(|_| s.spawn(|| api(&sock, "PUT", "/v1/pause", None)))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let ok = answers.iter().filter(|(st, _)| *st == 200).count();
        assert_eq!(
            ok, 1,
            "round {round}: exactly one pause succeeds: {answers:?}"
        );
        for (st, body) in answers.iter().filter(|(st, _)| *st != 200) {
            assert_eq!(*st, 409, "{body}");
            assert!(
                body["error"].as_str().unwrap_or("").contains("paused"),
                "{body}"
            );
        }
        assert_eq!(vm_state(&sock), "paused");
        let (st, body) = api(&sock, "PUT", "/v1/resume", None);
        assert_eq!(st, 200, "{body}");
        assert_eq!(vm_state(&sock), "running");
        // Running means running: the guest makes progress again.
        wait_new_pass(&mut l);
        let (st, body) = api(&sock, "PUT", "/v1/resume", None);
        assert_eq!(st, 409, "a second resume is refused: {body}");
    }
    shutdown(&mut l);
}

#[test]
fn request_bodies_are_typed_and_unknown_fields_are_refused() {
    let dir = TempDir::new("typed-api");
    let mut l = boot_pattern_source(&dir.join("console.log"), &dir.join("api.sock"), 20);
    let sock = api_of(&l).to_path_buf();
    let cases: [(&str, &str, &str); 5] = [
        (
            "/v1/migrate",
            r#"{"to": "unix:/nowhere", "downtime_ms": 5}"#,
            "downtime_ms",
        ),
        (
            "/v1/migrate",
            r#"{"to": "unix:/nowhere", "local": "yes"}"#,
            "invalid type",
        ),
        (
            "/v1/snapshot",
            r#"{"path": "/tmp/x", "force": true}"#,
            "force",
        ),
        ("/v1/pause", r#"{"now": true}"#, "now"),
        ("/v1/migrate/limits", r#"{"bandwidth": 1}"#, "bandwidth"),
    ];
    for (path, body, named) in cases {
        let (st, v) = api(&sock, "PUT", path, Some(body));
        assert_eq!(st, 400, "PUT {path} {body}: {v}");
        let e = v["error"].as_str().unwrap_or("");
        assert!(
            e.contains(named) && e.contains(path),
            "PUT {path} {body}: {e}"
        );
    }
    // Nothing happened: the VM still runs.
    assert_eq!(vm_state(&sock), "running");
    let (st, v) = api(&sock, "GET", "/v1/status", None);
    assert_eq!(st, 200);
    let s: contracts::launcher::Status = serde_json::from_value(v).expect("typed status");
    assert_eq!(s.memory_bytes, Some(64 << 20));
    shutdown(&mut l);
}

/// A `hello` guest that resets at every boot (so it reboots in a loop), with a data disk:
/// the disk's lock must be free again for each reboot.
fn resetting_source(dir: &TempDir) -> Launcher {
    let disk = dir.join("data.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let disk_arg = format!("path={}", path_str(&disk));
    let mut l = Launcher::run(
        &[
            "--kernel",
            path_str(guests::hello_path()),
            "--memory",
            "32Mi",
            "--cmdline",
            "reset=kbd",
            "--disk",
            &disk_arg,
        ],
        &dir.join("src.log"),
        Some(&dir.join("src.sock")),
    );
    l.wait_api();
    wait_console_until(&mut l, "two boots", |c| {
        c.matches("hello: booted").count() >= 2
    });
    l
}

fn boots(l: &Launcher) -> usize {
    l.console().matches("hello: booted").count()
}

#[test]
fn a_guest_reset_during_a_migration_fails_it_cleanly_and_the_source_reboots() {
    // Defect 2: a reset in the middle of a migration rebooted the VM under the sender:
    // with a disk the launcher exited 1 mid-migration; without, the destination resumed
    // the guest past its reset.
    let dir = TempDir::new("reset-migrate");
    let mut src = resetting_source(&dir);
    let sock = api_of(&src).to_path_buf();
    let deadline = Instant::now() + SAFETY;
    let mut attempt = 0;
    let report = loop {
        attempt += 1;
        let mig = dir.join(&format!("mig-{attempt}.sock"));
        let dst_log = dir.join(&format!("dst-{attempt}.log"));
        let mut dst = incoming(
            &format!("unix:{}", path_str(&mig)),
            &dst_log,
            &dir.join(&format!("dst-{attempt}.sock")),
        );
        // A slow link: the migration lasts long enough for the guest to reset in it.
        let out = migrate(
            &sock,
            &format!("unix:{}", path_str(&mig)),
            &["--max-bandwidth", "200000"],
            dir.path(),
        );
        let error = out.str("error").to_string();
        eprintln!("attempt {attempt}: {}", out.report);
        // Asked for while the source was rebooting: refused before connecting; again.
        if error.contains("rebooting") && Instant::now() < deadline {
            integration_tests::kill_hard(&mut dst);
            continue;
        }
        // The destination never runs the VM: it exits (the stream was cancelled) or still
        // waits (the migration was refused before it connected).
        let dst_sock = dir.join(&format!("dst-{attempt}.sock"));
        let waited = Instant::now() + Duration::from_secs(2);
        while dst.alive() && Instant::now() < waited {
            std::thread::sleep(Duration::from_millis(20));
        }
        if dst.alive() {
            assert_eq!(vm_state(&dst_sock), "incoming", "{}", out.report);
            integration_tests::kill_hard(&mut dst);
        } else {
            assert_ne!(dst.wait().code(), Some(0), "{}", dst.stderr());
        }
        assert!(
            !dst.console().contains("hello:"),
            "the guest ran on the destination: {}",
            dst.console()
        );
        assert_ne!(
            out.status.code(),
            Some(0),
            "migration completed: {}",
            out.report
        );
        break out;
    };
    let error = report.str("error");
    assert!(error.contains("reset"), "report: {}", report.report);
    assert_eq!(report.str("status"), "failed", "report: {}", report.report);
    assert_eq!(
        report.report["sourceRunning"], true,
        "report: {}",
        report.report
    );
    // The source is intact and reboots the guest (with its disk) after the migration.
    let before = boots(&src);
    wait_console_until(&mut src, "a reboot after the migration", |c| {
        c.matches("hello: booted").count() > before
    });
    assert!(src.alive(), "source exited: {}", src.stderr());
    assert!(!src.stderr().contains("launcher:"), "{}", src.stderr());
    shutdown(&mut src);
    assert!(Path::new(&dir.join("data.img")).exists());
}

#[test]
fn a_launcher_refuses_the_migration_protocols_it_does_not_advertise() {
    // Defect 3: `launcher capabilities` said 2..2, its receiver still took version 1.
    // A launcher that accepts only a protocol newer than any this build speaks.
    let beyond = migration::protocol::PROTOCOL_VERSION + 1;
    let b = beyond.to_string();
    let narrow = integration_tests::launcher_of_version_with(
        "9.4.0",
        &[
            ("LAUNCHER_MIGRATION_PROTOCOL_MIN", &b),
            ("LAUNCHER_MIGRATION_PROTOCOL_MAX", &b),
        ],
    );
    let caps = std::process::Command::new(&narrow)
        .arg("capabilities")
        .output()
        .expect("capabilities");
    let caps: contracts::launcher::Capabilities =
        serde_json::from_slice(&caps.stdout).expect("typed capabilities");
    assert_eq!(
        (caps.migration_protocol.min, caps.migration_protocol.max),
        (u64::from(beyond), u64::from(beyond))
    );
    let dir = TempDir::new("caps-enforced");
    let mut src = boot_pattern_source(&dir.join("src.log"), &dir.join("src.sock"), 20);
    let mig = dir.join("mig.sock");
    let uri = format!("unix:{}", path_str(&mig));
    let mut dst = std::process::Command::new(&narrow)
        .args(["run", "--incoming", &uri, "--serial"])
        .arg(dir.join("dst.log"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the narrow launcher");
    let deadline = Instant::now() + SAFETY;
    while !mig.exists() {
        assert!(
            Instant::now() < deadline,
            "the narrow launcher never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = migrate(api_of(&src), &uri, &[], dir.path());
    assert_ne!(out.status.code(), Some(0), "{}", out.report);
    assert_eq!(out.report["sourceRunning"], true, "{}", out.report);
    assert!(out.str("error").contains("version"), "{}", out.report);
    let st = dst.wait().expect("wait for the narrow launcher");
    assert_ne!(st.code(), Some(0));
    // The source runs on.
    wait_new_pass(&mut src);
    shutdown(&mut src);
}

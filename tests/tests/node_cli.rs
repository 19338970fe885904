//! noded and nodectl without guests: error messages a user sees, API hardening, and the
//! install path, using a fake launcher script (no KVM needed).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{bin, TempDir, SAFETY};

struct Daemon {
    dir: TempDir,
    child: Child,
}

impl Daemon {
    fn start(name: &str) -> Daemon {
        let dir = TempDir::new(&format!("nodecli-{name}"));
        let child = Command::new(bin("noded"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn noded");
        let d = Daemon { dir, child };
        let deadline = Instant::now() + SAFETY;
        while !d.socket().exists() || UnixStream::connect(d.socket()).is_err() {
            assert!(Instant::now() < deadline, "noded did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("state").join("noded.sock")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("nodectl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run nodectl")
    }

    fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(!out.status.success(), "nodectl {args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "one-line error expected: {err}");
        err
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }

    /// A script that answers `capabilities` like a launcher of `version`.
    fn fake_launcher(&self, version: &str) -> String {
        let p = self.file(
            &format!("fake-{version}"),
            &format!(
                "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'launcher {version}'; exit 0; fi\nif [ \"$1\" = capabilities ]; then echo '{{\"version\":\"{version}\",\"machineTypes\":[\"q35-1.0\"],\"migrationProtocol\":{{\"min\":1,\"max\":1}},\"snapshotFormat\":{{\"min\":1,\"max\":1}}}}'; exit 0; fi\nexit 1\n"
            ),
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn clear_errors_for_common_mistakes() {
    let d = Daemon::start("errors");
    // A daemon that is not running.
    let out = Command::new(bin("nodectl"))
        .args(["--socket", "/nonexistent/noded.sock", "status"])
        .output()
        .expect("nodectl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is it running? Start it with `noded --state-dir DIR`"),
        "{err}"
    );

    let spec = d.file("vm.yaml", "name: a\nkernel: /guest.elf\nmemory: 32Mi\n");
    let e = d.ctl_err(&["vm", "create", "-f", &spec]);
    assert!(e.contains("no launcher installed"), "{e}");

    let fake = d.fake_launcher("1.2.0");
    let out = d.ctl(&["-o", "json", "launcher", "install", "--path", &fake]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = d.ctl_err(&["launcher", "install", "--path", &fake]);
    assert!(e.contains("launcher 1.2.0 is already installed"), "{e}");
    let e = d.ctl_err(&["launcher", "install", "--path", "/bin/true"]);
    assert!(e.contains("capabilities"), "{e}");
    // Garbage answers are refused with what was printed, and nothing is installed.
    let garbage = d.file("garbage", "#!/bin/sh\necho 'hello world'\n");
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let e = d.ctl_err(&["launcher", "install", "--path", &garbage]);
    assert!(
        e.contains("`capabilities` printed something that is not a capabilities object")
            && e.contains("hello world"),
        "{e}"
    );
    let liar = d.file(
        "liar",
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'launcher 7.0.0'; exit 0; fi\necho '{\"version\":\"1.3.0\",\"machineTypes\":[\"q35-1.0\"],\"migrationProtocol\":{\"min\":1,\"max\":1},\"snapshotFormat\":{\"min\":1,\"max\":1}}'\n",
    );
    std::fs::set_permissions(&liar, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let e = d.ctl_err(&["launcher", "install", "--path", &liar]);
    assert!(
        e.contains("reported version 1.3.0 but `--version` printed \"launcher 7.0.0\""),
        "{e}"
    );
    let e = d.ctl_err(&[
        "launcher",
        "install",
        "--path",
        &fake,
        "--channel",
        "nightly",
    ]);
    assert!(
        e.contains("unknown channel \"nightly\" (use stable or candidate)"),
        "{e}"
    );
    let out = d.ctl(&["-o", "json", "launcher", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    let bad = d.file("bad.yaml", "name: a\nkernel: /guest.elf\nmemory: 32Q\n");
    let e = d.ctl_err(&["vm", "create", "-f", &bad]);
    assert!(
        e.contains("invalid spec: memory: \"32Q\" is not a quantity"),
        "{e}"
    );
    let bad = d.file(
        "bad2.yaml",
        "name: a\nkernel: /guest.elf\nmemory: 32Mi\nrunStrategy: Often\n",
    );
    let e = d.ctl_err(&["vm", "create", "-f", &bad]);
    assert!(e.contains("runStrategy"), "{e}");

    let e = d.ctl_err(&["vm", "get", "nope"]);
    assert_eq!(e, "nodectl: VM nope not found");
    let e = d.ctl_err(&["migrations", "nope"]);
    assert!(e.contains("VM nope not found"), "{e}");

    let s = d.file(
        "s.yaml",
        "liveMigrationConfig:\n  parallelMigrationsPerCluster: 5\n",
    );
    let e = d.ctl_err(&["config", "set", "-f", &s]);
    assert_eq!(
        e,
        "nodectl: unknown setting `liveMigrationConfig.parallelMigrationsPerCluster`"
    );
}

#[test]
fn config_merges_and_status_reports_conditions() {
    let d = Daemon::start("config");
    let s = d.file(
        "s.yaml",
        "workloadUpdateStrategy:\n  workloadUpdateMethods: [LiveMigrate, Evict]\n  batchEvictionInterval: 30s\n",
    );
    let out = d.ctl(&["-o", "json", "config", "set", "-f", &s]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        v["workloadUpdateStrategy"]["workloadUpdateMethods"],
        serde_json::json!(["LiveMigrate", "Evict"])
    );
    assert_eq!(v["workloadUpdateStrategy"]["batchEvictionInterval"], "30s");
    assert_eq!(
        v["workloadUpdateStrategy"]["batchEvictionSize"], 10,
        "unset keys keep their value"
    );

    let out = d.ctl(&["-o", "json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["targetLauncherVersion"], serde_json::Value::Null);
    assert_eq!(v["approvalPending"], false);
    assert_eq!(v["outdatedVirtualMachineInstanceWorkloads"], 0);
    let types: Vec<_> = v["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| c["type"].clone())
        .collect();
    assert_eq!(
        types,
        ["Available", "Progressing", "Degraded", "Upgradeable"]
    );

    // Human output: aligned table.
    let out = d.ctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text
        .lines()
        .find(|l| l.starts_with("CONDITION"))
        .expect("table");
    let avail = text
        .lines()
        .find(|l| l.starts_with("Available"))
        .expect("row");
    assert_eq!(header.find("STATUS"), avail.find("False"), "{text}");
}

#[test]
fn api_socket_is_private_and_hardened() {
    let d = Daemon::start("api");
    let mode = std::fs::metadata(d.socket())
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // A chunked body is read within the same 1 MiB limit, then judged as JSON.
    let r = raw(
        &d.socket(),
        b"POST /v1/vms HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("body is not valid JSON"), "{r}");
    let mut big = b"GET /v1/status HTTP/1.1\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 20_000));
    big.extend_from_slice(b"\r\n\r\n");
    assert!(raw(&d.socket(), &big).starts_with("HTTP/1.1 431"));
    let r = raw(
        &d.socket(),
        b"PUT /v1/config HTTP/1.1\r\nContent-Length: 5000000\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert!(raw(&d.socket(), b"GET /v2/nothing HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(raw(&d.socket(), b"DELETE /v1/status HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(raw(&d.socket(), b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    let r = raw(&d.socket(), b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(r.contains("noded_vmi_number_of_outdated 0"), "{r}");
    // The daemon survived all of that.
    assert!(raw(&d.socket(), b"GET /v1/status HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));

    // A second daemon on the same state directory refuses to start.
    let out = Command::new(bin("noded"))
        .arg("--state-dir")
        .arg(d.dir.join("state"))
        .output()
        .expect("noded");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another noded is already serving"));
}

#[test]
fn a_second_noded_on_the_same_state_directory_is_refused() {
    // Defect: with another --socket, a second noded opened the same state and supervised
    // the same launchers as the first.
    let d = Daemon::start("statelock");
    let other = d.dir.join("other.sock");
    let mut second = Command::new(bin("noded"))
        .arg("--state-dir")
        .arg(d.dir.join("state"))
        .arg("--socket")
        .arg(&other)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the second noded");
    let deadline = Instant::now() + Duration::from_secs(10);
    while second.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second noded runs on the same state directory");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = second.wait_with_output().expect("second noded's output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "second noded: {err}");
    assert!(
        err.contains("already uses the state directory") && err.contains("--state-dir"),
        "{err}"
    );
    assert!(!other.exists(), "the refused noded left its socket behind");
    // The first one still serves.
    assert!(d.ctl(&["status"]).status.success());
}

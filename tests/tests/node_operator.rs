//! What an operator meets (issue 16): nodectl as a Unix tool (closed pipes, completion),
//! a failing launcher's own error in the VM's message, watches streamed by noded,
//! `vm describe` with its events, `--dry-run`, `--wait`, the output formats, metrics
//! over TCP and JSON logs.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::node::Node;
use integration_tests::{bin, free_tcp_port, guests, TempDir, SAFETY};
use serde_json::Value;

/// Runs nodectl with stdout on a pipe whose read end is already closed.
fn run_into_closed_pipe(args: &[&str]) -> std::process::Output {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    Command::new(bin("nodectl"))
        .args(args)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .expect("run nodectl")
}

#[test]
fn nodectl_behaves_like_a_unix_tool() {
    let node = Node::start("unixtool", "");
    let sock = node.socket();
    let sock = sock.to_str().expect("utf-8");
    for args in [
        vec!["--socket", sock, "-o", "json", "status"],
        vec!["completion", "bash"],
    ] {
        let out = run_into_closed_pipe(&args);
        assert_ne!(
            out.status.code(),
            Some(101),
            "nodectl {args:?} panicked on a closed pipe: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{args:?}");
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("panicked"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Completion scripts and man pages come from the same command tree.
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(bin("nodectl"))
            .args(["completion", shell])
            .output()
            .expect("nodectl completion");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("describe"),
            "{shell}: {text:.200}"
        );
    }
    let man = node.dir.join("man");
    let out = Command::new(bin("nodectl"))
        .arg("man")
        .arg(&man)
        .output()
        .expect("nodectl man");
    assert!(out.status.success());
    let page = std::fs::read_to_string(man.join("nodectl-vm.1")).expect("nodectl-vm.1");
    assert!(page.contains(".TH nodectl-vm"), "{page:.300}");
}

#[test]
fn a_failing_launcher_says_why_in_the_vm() {
    let node = Node::start("launcherr", "");
    node.install(&node.launcher_a());
    // Files that do not exist are refused at creation, with the path.
    let f = node.file(
        "missing.yaml",
        "name: gone\nkernel: /nonexistent/kernel.elf\nmemory: 32Mi\n",
    );
    let e = node
        .try_ctl(&["vm", "create", "-f", &f])
        .expect_err("a missing kernel must be refused");
    assert!(
        e.contains("kernel /nonexistent/kernel.elf: No such file or directory"),
        "{e}"
    );
    // A kernel file the launcher cannot load: its own error line reaches the VM.
    let junk = node.file("junk.elf", "this is not a kernel\n");
    let f = node.file(
        "junk.yaml",
        &format!("name: junk\nkernel: {junk}\nmemory: 32Mi\nrunStrategy: Always\n"),
    );
    node.ctl(&["vm", "create", "-f", &f]);
    let v = node.wait_until("junk in CrashLoopBackOff", || {
        let v = node.vm("junk");
        (v["phase"] == "CrashLoopBackOff").then_some(v)
    });
    let msg = v["message"].as_str().unwrap_or("").to_string();
    assert!(msg.starts_with("launcher failed: exit status 1: "), "{msg}");
    assert!(
        msg.len() > "launcher failed: exit status 1: ".len() + 10,
        "{msg}"
    );
    assert!(!msg.contains('\u{1b}'), "{msg:?}");
    let table = Command::new(bin("nodectl"))
        .arg("--socket")
        .arg(node.socket())
        .args(["vm", "list"])
        .output()
        .expect("vm list");
    let table = String::from_utf8_lossy(&table.stdout);
    let line = &msg["launcher failed: exit status 1: ".len()..];
    assert!(table.contains(line), "vm list lacks {line:?}:\n{table}");
    let events = node.ctl(&["vm", "describe", "junk"]);
    let crashed = events["events"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["reason"] == "Crashed"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(crashed["type"], "Warning", "{events}");
    assert!(crashed["message"].as_str().unwrap_or("").contains(line));
}

/// Reads JSON lines from a child's stdout on a thread.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<Value> {
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next event for which `f` holds (safety deadline).
fn next_event(rx: &mpsc::Receiver<Value>, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + SAFETY;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if f(&v) => return v,
            Ok(_) => {}
            Err(e) => panic!("no watch event {what}: {e}"),
        }
    }
}

#[test]
fn watches_stream_changes_and_describe_tells_the_story() {
    let node = Node::start("watch", "");
    node.install(&node.launcher_a());
    let mut watch = Command::new(bin("nodectl"))
        .arg("--socket")
        .arg(node.socket())
        .args(["-o", "json", "vm", "list", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("nodectl vm list -w");
    let events = lines_of(&mut watch);
    let mut status_watch = Command::new(bin("nodectl"))
        .arg("--socket")
        .arg(node.socket())
        .args(["-o", "json", "status", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("nodectl status -w");
    let status_events = lines_of(&mut status_watch);
    let first = next_event(&status_events, "status ADDED", |e| e["type"] == "ADDED");
    assert_eq!(first["object"]["virtualMachines"], 0, "{first}");

    // --dry-run creates nothing, and says what would be created.
    let spec = node.file(
        "web.yaml",
        &format!(
            "name: web\nkernel: {}\ncmdline: mib=4 every=50\nmemory: 32Mi\nrunStrategy: Manual\n",
            guests::pattern_path().display()
        ),
    );
    let dry = node.ctl(&["vm", "create", "-f", &spec, "--dry-run"]);
    assert_eq!(dry["dryRun"], true, "{dry}");
    assert_eq!(dry["name"], "web");
    assert_eq!(node.ctl(&["vm", "list"]), Value::Array(vec![]));

    node.ctl(&["vm", "create", "-f", &spec]);
    let added = next_event(&events, "ADDED web", |e| e["type"] == "ADDED");
    let st = next_event(&status_events, "status with one VM", |e| {
        e["type"] == "MODIFIED" && e["object"]["virtualMachines"] == 1
    });
    assert!(st["object"]["conditions"].is_array(), "{st}");
    let _ = status_watch.kill();
    let _ = status_watch.wait();
    assert_eq!(added["object"]["name"], "web");
    assert_eq!(added["object"]["phase"], "Stopped");

    // start --wait returns once it runs; the watch saw it move, without polling.
    let v = node.ctl(&["vm", "start", "web", "--wait"]);
    assert_eq!(v["phase"], "Running", "{v}");
    let running = next_event(&events, "web Running", |e| {
        e["type"] == "MODIFIED" && e["object"]["phase"] == "Running"
    });
    assert!(running["object"]["pid"].is_u64(), "{running}");

    // Output formats.
    let ctl_text = |args: &[&str]| {
        let out = Command::new(bin("nodectl"))
            .arg("--socket")
            .arg(node.socket())
            .args(args)
            .output()
            .expect("nodectl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(ctl_text(&["-o", "name", "vm", "list"]), "vm/web\n");
    let wide = ctl_text(&["-o", "wide", "vm", "list"]);
    assert!(wide.lines().next().unwrap_or("").contains("PID"), "{wide}");
    let yaml = ctl_text(&["-o", "yaml", "vm", "get", "web"]);
    assert!(yaml.contains("phase: Running"), "{yaml}");

    // describe: conditions with their transition times, and the events so far.
    let text = ctl_text(&["vm", "describe", "web"]);
    for want in [
        "Conditions:",
        "Ready",
        "LAST-TRANSITION",
        "Events:",
        "Created",
        "Started",
    ] {
        assert!(text.contains(want), "describe lacks {want}:\n{text}");
    }
    let d = node.ctl(&["vm", "describe", "web"]);
    let ready = d["vm"]["conditions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == "Ready"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(ready["status"], "True", "{d}");
    assert!(ready["lastTransitionTime"]
        .as_str()
        .unwrap_or("")
        .ends_with('Z'));

    // stop --wait, then delete: the watch sees both.
    let v = node.ctl(&["vm", "stop", "web", "--wait", "--timeout", "60s"]);
    assert_eq!(v["phase"], "Stopped", "{v}");
    next_event(&events, "web Stopped", |e| {
        e["type"] == "MODIFIED" && e["object"]["phase"] == "Stopped"
    });
    node.ctl(&["vm", "delete", "web"]);
    next_event(&events, "web DELETED", |e| e["type"] == "DELETED");
    let _ = watch.kill();
    let _ = watch.wait();

    // config set --dry-run changes nothing.
    let before = node.ctl(&["config", "get"]);
    let patch = node.file(
        "p.yaml",
        "liveMigrationConfig:\n  bandwidthPerMigration: 16Mi\n",
    );
    let dry = node.ctl(&["config", "set", "-f", &patch, "--dry-run"]);
    assert_eq!(
        dry["liveMigrationConfig"]["bandwidthPerMigration"],
        16 << 20
    );
    assert_eq!(node.ctl(&["config", "get"]), before);
    let bad = node.file(
        "b.yaml",
        "liveMigrationConfig:\n  bandwidthPerMigration: 16MB\n",
    );
    let e = node
        .try_ctl(&["config", "set", "-f", &bad])
        .expect_err("16MB refused");
    assert!(
        e.contains("did you mean Mi (1048576) or M (1000000)?"),
        "{e}"
    );
}

#[test]
fn metrics_over_tcp_and_json_logs() {
    let dir = TempDir::new("noded-metrics");
    let port = free_tcp_port();
    let log = std::fs::File::create(dir.join("noded.log")).expect("log");
    let mut noded = Command::new(bin("noded"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--metrics-address", &format!("127.0.0.1:{port}")])
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("noded");
    let deadline = Instant::now() + SAFETY;
    let body = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            s.set_read_timeout(Some(Duration::from_secs(20))).ok();
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                break out;
            }
        }
        assert!(Instant::now() < deadline, "no metrics over TCP");
        assert!(noded.try_wait().ok().flatten().is_none(), "noded exited");
        std::thread::sleep(Duration::from_millis(50));
    };
    for want in [
        "noded_build_info{version=\"",
        "noded_vms{phase=\"CrashLoopBackOff\"} 0",
        "noded_migrations_total{outcome=\"Failed\"} 0",
        "noded_migration_downtime_seconds_bucket",
        "noded_vmi_number_of_outdated 0",
    ] {
        assert!(body.contains(want), "metrics lack {want}:\n{body}");
    }
    let _ = noded.kill();
    let _ = noded.wait();
    let logs = std::fs::read_to_string(dir.join("noded.log")).unwrap_or_default();
    let first = logs.lines().next().unwrap_or("");
    let v: Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert!(
        logs.contains("\"message\":\"serving /metrics over TCP\""),
        "{logs}"
    );
}

#[test]
fn update_watch_follows_an_update_to_its_end() {
    let node = Node::start("updwatch", "");
    node.install(&node.launcher_a());
    node.create(
        "web",
        "runStrategy: Always\nevictionStrategy: LiveMigrate\n",
    );
    node.wait_vm("web", "Running", None);
    // Started before the update: it waits for one, then follows it to its end.
    let mut watch = Command::new(bin("nodectl"))
        .arg("--socket")
        .arg(node.socket())
        .args(["update", "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("nodectl update watch");
    let out = watch.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut text = String::new();
    let mut read_until = |needle: &str| {
        let deadline = Instant::now() + SAFETY;
        while !text.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    text.push_str(&l);
                    text.push('\n');
                }
                Err(e) => panic!("update watch never printed {needle:?} ({e}):\n{text}"),
            }
        }
        text.clone()
    };
    read_until("waiting for one");
    let new = node.launcher_version("9.0.0", false);
    let installed = Command::new(bin("nodectl"))
        .arg("--socket")
        .arg(node.socket())
        .args([
            "launcher",
            "install",
            "--path",
            new.to_str().expect("utf-8"),
        ])
        .output()
        .expect("install");
    let said = String::from_utf8_lossy(&installed.stdout);
    assert!(
        said.contains("Update started: 1 VM(s) move to launcher 9.0.0"),
        "{said}"
    );
    let text = read_until("Update complete: every VM runs launcher 9.0.0");
    assert!(
        text.contains("Update to launcher 9.0.0: 1 outdated VM(s) of 1"),
        "{text}"
    );
    assert!(text.contains("Migrating"), "{text}");
    assert!(text.contains("Succeeded (pause "), "{text}");
    let deadline = Instant::now() + SAFETY;
    let status = loop {
        if let Some(s) = watch.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "update watch did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{text}");
}

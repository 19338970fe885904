//! One migration with our launcher or with QEMU 7.2, over a Unix socket or TCP with TLS.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::procs::{file_out, http, wait_file, wait_socket, Proc, Scratch};
use super::{fail, Case, Ctx, Mode, Sample, Transport, SAFETY, WARM};

/// Where the destination listens, for both VMMs.
fn uri_of(case: &Case, d: &Scratch) -> String {
    match case.transport {
        Transport::Unix => format!("unix:{}", d.join("mig.sock").display()),
        Transport::Tls => format!("tcp:127.0.0.1:{}", integration_tests::free_tcp_port()),
    }
}

pub fn ours_once(ctx: &Ctx, case: &Case) -> Sample {
    let d = Scratch::new("ours");
    let log = d.join("console.log");
    let (a, b) = (d.join("a.sock"), d.join("b.sock"));
    let mut src = Proc::spawn(
        Command::new(&ctx.launcher)
            .arg("run")
            .arg("--kernel")
            .arg(case.guest.kernel())
            .args(["--memory", &format!("{}Mi", case.mib)])
            .args(["--cmdline", &case.guest.cmdline(case.mib)])
            .args(["--dirty-ring", if ctx.bitmap { "off" } else { "on" }])
            .arg("--serial")
            .arg(&log)
            .arg("--api-socket")
            .arg(&a)
            .stdout(Stdio::null())
            .stderr(file_out(&d.join("src.err"))),
        "the source launcher",
    );
    wait_file(&log, case.guest.banner(), &mut src, "the source launcher");
    wait_socket(&a, &mut src, "the source launcher");
    let uri = uri_of(case, &d);
    let mut incoming = Command::new(&ctx.launcher);
    incoming.args(["run", "--incoming", &uri]);
    let mut migrate = Command::new(&ctx.launcher);
    migrate
        .arg("migrate")
        .arg("--api-socket")
        .arg(&a)
        .args(["--to", &uri]);
    if case.transport == Transport::Tls {
        incoming.arg("--tls-dir").arg(&ctx.tls.ours_dst);
        migrate.arg("--tls-dir").arg(&ctx.tls.ours_src);
    }
    if case.mode == Mode::Local {
        migrate.arg("--local");
    }
    let mut dst = Proc::spawn(
        incoming
            .arg("--serial")
            .arg(d.join("dst.log"))
            .arg("--api-socket")
            .arg(&b)
            .stdout(Stdio::null())
            .stderr(file_out(&d.join("dst.err"))),
        "the destination launcher",
    );
    wait_socket(&b, &mut dst, "the destination launcher");
    std::thread::sleep(WARM);
    let out = migrate
        .stderr(Stdio::null())
        .output()
        .unwrap_or_else(|e| fail(&format!("launcher migrate: {e}")));
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| fail(&format!("launcher migrate printed no report: {out:?}")));
    if report["status"] != "completed" {
        fail(&format!("our migration failed: {report}"));
    }
    if src.wait() != Some(64) {
        fail("the source launcher did not exit 64 after the migration");
    }
    match http(&b, "GET", "/v1/status") {
        Some(v) if v["state"] == "running" => {}
        other => fail(&format!(
            "the destination does not run the guest: {other:?}"
        )),
    }
    let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
    Sample {
        total_ms: f("totalMs"),
        downtime_ms: f("downtimeMs"),
        transferred: f("transferredBytes"),
        iterations: f("iterations"),
        note: format!(
            "{}, boost {}",
            report["dirtyTracking"].as_str().unwrap_or("-"),
            report["switchOverBoost"].as_str().unwrap_or("-")
        ),
    }
}

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, proc: &mut Proc) -> Self {
        wait_socket(path, proc, "QEMU");
        let s = UnixStream::connect(path).unwrap_or_else(|e| fail(&format!("QMP connect: {e}")));
        s.set_read_timeout(Some(SAFETY)).ok();
        let w = s.try_clone().expect("clone");
        let mut q = Qmp {
            r: BufReader::new(s),
            w,
        };
        q.line(); // greeting
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(n) if n > 0 => serde_json::from_str(&l).unwrap_or(Value::Null),
            _ => fail("QMP connection closed"),
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        writeln!(self.w, "{msg}").unwrap_or_else(|e| fail(&format!("QMP write: {e}")));
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                fail(&format!("QMP {name}: {e}"));
            }
            // An event: skip.
        }
    }
}

/// QEMU's command line; `tls` is `(credentials dir, endpoint)` for a TLS migration.
fn qemu_cmd(ctx: &Ctx, case: &Case, shm: &Path, qmp: &Path, tls: Option<(&Path, &str)>) -> Command {
    let mib = case.mib;
    let mut c = Command::new(&ctx.qemu);
    c.args([
        "-accel",
        "kvm",
        "-m",
        &format!("{mib}M"),
        "-nographic",
        "-no-reboot",
    ]);
    match case.mode {
        Mode::Copy => {
            c.args(["-M", "q35"]);
        }
        Mode::Local => {
            c.arg("-object")
                .arg(format!(
                    "memory-backend-file,id=ram0,size={mib}M,mem-path={},share=on",
                    shm.display()
                ))
                .args(["-M", "q35,memory-backend=ram0"]);
        }
    }
    if let Some((dir, endpoint)) = tls {
        c.arg("-object").arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on",
            dir.display()
        ));
    }
    c.arg("-kernel")
        .arg(case.guest.kernel())
        .args(["-append", &case.guest.cmdline(mib)])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c
}

pub fn qemu_once(ctx: &Ctx, case: &Case) -> Sample {
    let d = Scratch::new("qemu");
    let shm = PathBuf::from(format!("/dev/shm/lvm-bench-migrate-{}", std::process::id()));
    let _ = std::fs::remove_file(&shm);
    let (sq, dq) = (d.join("src.qmp"), d.join("dst.qmp"));
    let log = d.join("src.log");
    let tls = case.transport == Transport::Tls;
    let src_tls = tls.then_some((ctx.tls.qemu_client.as_path(), "client"));
    let dst_tls = tls.then_some((ctx.tls.qemu_server.as_path(), "server"));
    let mut src = Proc::spawn(
        qemu_cmd(ctx, case, &shm, &sq, src_tls)
            .stdout(file_out(&log))
            .stderr(file_out(&d.join("src.err"))),
        "QEMU (source)",
    );
    wait_file(&log, case.guest.banner(), &mut src, "QEMU (source)");
    let mut dst = Proc::spawn(
        qemu_cmd(ctx, case, &shm, &dq, dst_tls)
            .args(["-incoming", "defer"])
            .stdout(file_out(&d.join("dst.log")))
            .stderr(file_out(&d.join("dst.err"))),
        "QEMU (destination)",
    );
    let mut qs = Qmp::connect(&sq, &mut src);
    let mut qd = Qmp::connect(&dq, &mut dst);
    if case.mode == Mode::Local {
        let caps = json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        qs.cmd("migrate-set-capabilities", caps.clone());
        qd.cmd("migrate-set-capabilities", caps);
    }
    if tls {
        qd.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
        qs.cmd(
            "migrate-set-parameters",
            json!({"tls-creds": "tls0", "tls-hostname": "127.0.0.1"}),
        );
    }
    let uri = uri_of(case, &d);
    qd.cmd("migrate-incoming", json!({"uri": uri}));
    qs.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1_000_000_000_000u64, "downtime-limit": 300}),
    );
    std::thread::sleep(WARM);
    qs.cmd("migrate", json!({"uri": uri}));
    let end = Instant::now() + SAFETY;
    let info = loop {
        let v = qs.cmd("query-migrate", json!({}));
        match v["status"].as_str() {
            Some("completed") => break v,
            Some("failed") | Some("cancelled") => fail(&format!("QEMU migration failed: {v}")),
            _ => {}
        }
        if Instant::now() > end {
            fail("QEMU migration did not complete");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // The destination runs the guest.
    let end = Instant::now() + SAFETY;
    loop {
        let st = qd.cmd("query-status", json!({}));
        if st["status"] == "running" {
            break;
        }
        if Instant::now() > end {
            fail(&format!("the QEMU destination does not run: {st}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop((qs, qd));
    drop((src, dst));
    let _ = std::fs::remove_file(&shm);
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    Sample {
        total_ms: f(&info["total-time"]),
        downtime_ms: f(&info["downtime"]),
        transferred: f(&info["ram"]["transferred"]),
        iterations: f(&info["ram"]["dirty-sync-count"]),
        note: String::new(),
    }
}

//! The launcher's command line as an operator meets it (issue 16): one quantity grammar,
//! options that `--restore` would ignore refused, and the API subcommands
//! (`launcher status|pause|resume|shutdown|migrate-status|migrate-cancel`).

use integration_tests::{bin, guests, launcher_cmd, path_str, Launcher, TempDir};
use serde_json::Value;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn restore_refuses_options_that_do_not_apply() {
    let dir = TempDir::new("restore-opts");
    let snap = dir.join("vm.snap");
    std::fs::write(&snap, b"not read: the options are refused first").expect("write");
    for (args, named) in [
        (vec!["--memory", "128Mi"], "--memory"),
        (vec!["--vcpus", "2"], "--vcpus"),
        (vec!["--cmdline", "x"], "--cmdline"),
        (vec!["--initrd", "/i"], "--initrd"),
        (vec!["--machine-type", "q35"], "--machine-type"),
    ] {
        let mut all = vec!["run", "--restore", path_str(&snap)];
        all.extend(&args);
        let out = launcher_cmd(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let e = stderr(&out);
        assert!(
            e.contains(&format!("{named} cannot be used with --restore")),
            "{args:?}: {e}"
        );
        assert!(e.contains("drop it"), "{e}");
    }
    let out = launcher_cmd(&[
        "run",
        "--incoming",
        "unix:/nonexistent/x.sock",
        "--memory",
        "1Gi",
        "--vcpus",
        "2",
    ]);
    let e = stderr(&out);
    assert!(
        e.contains("--memory, --vcpus cannot be used with --incoming") && e.contains("drop them"),
        "{e}"
    );
}

#[test]
fn sizes_are_kubernetes_quantities_everywhere() {
    let hello = guests::hello_path();
    let out = launcher_cmd(&["run", "--kernel", path_str(hello), "--memory", "128MB"]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("--memory \"128MB\" is not a quantity: unknown suffix \"MB\" (did you mean Mi (1048576) or M (1000000)?)"),
        "{e}"
    );
    // 32M is 32 000 000 bytes (decimal), rounded up to pages: the guest boots.
    let dir = TempDir::new("quantity");
    let mut l = Launcher::run(
        &[
            "--kernel",
            path_str(hello),
            "--memory",
            "32M",
            "--cmdline",
            "exit=0",
        ],
        &dir.join("console.log"),
        None,
    );
    assert!(l.wait().success(), "{}", l.stderr());
    // --max-bandwidth takes the same grammar: 16Mi is accepted (the error is about the
    // socket, not the number), 16MB is refused by the parser.
    let out = launcher_cmd(&[
        "migrate",
        "--api-socket",
        "/nonexistent/api.sock",
        "--to",
        "unix:/nonexistent/in.sock",
        "--max-bandwidth",
        "16Mi",
    ]);
    let e = stderr(&out);
    assert!(e.contains("/nonexistent/api.sock"), "{e}");
    assert!(!e.contains("max-bandwidth"), "{e}");
    let out = launcher_cmd(&[
        "migrate",
        "--api-socket",
        "/nonexistent/api.sock",
        "--to",
        "unix:/x",
        "--max-bandwidth",
        "16MB",
    ]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains("invalid value '16MB' for '--max-bandwidth"),
        "{e}"
    );
    assert!(e.contains("did you mean Mi"), "{e}");
}

fn api_cmd(cmd: &str, sock: &std::path::Path) -> (bool, Value, String) {
    let out = std::process::Command::new(bin("launcher"))
        .args([cmd, "--api-socket", path_str(sock)])
        .output()
        .expect("launcher");
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v, stderr(&out))
}

#[test]
fn api_subcommands_drive_a_running_launcher() {
    let dir = TempDir::new("api-cli");
    let sock = dir.join("api.sock");
    let mut l = Launcher::run(
        &[
            "--kernel",
            path_str(guests::pattern_path()),
            "--memory",
            "32Mi",
            "--cmdline",
            "mib=2 every=50",
        ],
        &dir.join("console.log"),
        Some(&sock),
    );
    l.wait_api();
    let (ok, v, e) = api_cmd("status", &sock);
    assert!(ok, "{e}");
    assert_eq!(v["state"], "running", "{v}");
    let (ok, _, e) = api_cmd("pause", &sock);
    assert!(ok, "{e}");
    assert_eq!(api_cmd("status", &sock).1["state"], "paused");
    let (ok, _, e) = api_cmd("resume", &sock);
    assert!(ok, "{e}");
    assert_eq!(api_cmd("status", &sock).1["state"], "running");
    let (ok, v, e) = api_cmd("migrate-status", &sock);
    assert!(ok, "{e}: {v}");
    let (ok, _, e) = api_cmd("migrate-cancel", &sock);
    assert!(!ok, "no migration to cancel");
    assert!(e.contains("PUT /v1/migrate/cancel refused:"), "{e}");
    let (ok, _, e) = api_cmd("shutdown", &sock);
    assert!(ok, "{e}");
    assert!(l.wait().success(), "{}", l.stderr());
    let (ok, _, e) = api_cmd("status", &sock);
    assert!(!ok);
    assert!(e.contains("is a launcher running with --api-socket"), "{e}");
}

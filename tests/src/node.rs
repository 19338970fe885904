//! A noded on a temporary state directory driven through nodectl, shared by the
//! `node_*` end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bin, guests, TempDir, SAFETY};

/// A noded on a temporary state directory, killed (with its launchers) on drop.
pub struct Node {
    /// The temporary directory (state in `state/`, noded's log in `noded.log`).
    pub dir: TempDir,
    daemon: Option<Child>,
    /// Run noded inside this network namespace (`ip netns exec`), with these extra
    /// arguments (the cluster tests' hosts).
    netns: Option<String>,
    extra_args: Vec<String>,
}

impl Node {
    /// Starts noded on a fresh state directory with `config` as its `--config` file.
    pub fn start(name: &str, config: &str) -> Node {
        let dir = TempDir::new(&format!("node-{name}"));
        std::fs::write(dir.join("config.yaml"), config).expect("write config");
        let mut n = Node {
            dir,
            daemon: None,
            netns: None,
            extra_args: Vec::new(),
        };
        n.spawn_daemon();
        n
    }

    /// A noded that runs inside network namespace `netns` with `args` added to its
    /// command line; `args` may use `{dir}` for the test directory.
    pub fn start_in(name: &str, config: &str, netns: &str, args: &[String]) -> Node {
        let dir = TempDir::new(&format!("node-{name}"));
        std::fs::write(dir.join("config.yaml"), config).expect("write config");
        let d = dir.path().display().to_string();
        let mut n = Node {
            extra_args: args.iter().map(|a| a.replace("{dir}", &d)).collect(),
            dir,
            daemon: None,
            netns: Some(netns.to_string()),
        };
        n.spawn_daemon();
        n
    }

    /// noded's pid, while it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// This test's copy of `target/debug/launcher` (version A), so that a concurrent
    /// rebuild of the tree cannot change the binary under a running test.
    pub fn launcher_a(&self) -> PathBuf {
        let p = self.dir.join("launcher-a");
        if !p.exists() {
            let tmp = self.dir.join("launcher-a.tmp");
            std::fs::copy(bin("launcher"), &tmp).expect("copy launcher");
            std::fs::rename(&tmp, &p).expect("rename launcher");
        }
        p
    }

    /// The state directory.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// noded's API socket.
    pub fn socket(&self) -> PathBuf {
        self.state().join("noded.sock")
    }

    /// Starts (or restarts) noded and waits until it answers.
    pub fn spawn_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("noded.log"))
            .expect("log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("noded"));
                c
            }
            None => Command::new(bin("noded")),
        };
        let child = cmd
            .args(&self.extra_args)
            .arg("--state-dir")
            .arg(self.state())
            .arg("--config")
            .arg(self.dir.join("config.yaml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn noded");
        self.daemon = Some(child);
        let deadline = Instant::now() + SAFETY;
        while self.try_ctl(&["status"]).is_err() {
            let exited = self
                .daemon
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "noded exited ({exited:?}):\n{}",
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "noded does not answer:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL noded (its launchers keep running in their own sessions).
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// noded's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("noded.log")).unwrap_or_default()
    }

    /// `nodectl -o json ARGS`: the JSON printed, or the error line.
    pub fn try_ctl(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(bin("nodectl"))
            .arg("--socket")
            .arg(self.socket())
            .args(["-o", "json"])
            .args(args)
            .output()
            .expect("run nodectl");
        if out.status.success() {
            serde_json::from_slice(&out.stdout).map_err(|e| format!("nodectl printed no JSON: {e}"))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// [`Node::try_ctl`] that must succeed.
    pub fn ctl(&self, args: &[&str]) -> Value {
        self.try_ctl(args)
            .unwrap_or_else(|e| panic!("nodectl {args:?} failed: {e}\nnoded log:\n{}", self.log()))
    }

    /// Writes a file in the test directory and returns its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write file");
        p.display().to_string()
    }

    /// `nodectl config set` with this YAML.
    pub fn config(&self, yaml: &str) {
        let f = self.file("patch.yaml", yaml);
        self.ctl(&["config", "set", "-f", &f]);
    }

    /// `nodectl launcher install --path PATH` that must succeed.
    pub fn install(&self, path: &Path) -> Value {
        self.ctl(&[
            "launcher",
            "install",
            "--path",
            path.to_str().expect("utf-8"),
        ])
    }

    /// Creates a pattern-guest VM; `extra` is appended to its spec.
    pub fn create(&self, name: &str, extra: &str) -> Value {
        let spec = format!(
            "name: {name}\nkernel: {}\ncmdline: mib=4 every=50\nmemory: 32Mi\n{extra}",
            guests::pattern_path().display()
        );
        let f = self.file(&format!("{name}.yaml"), &spec);
        self.ctl(&["vm", "create", "-f", &f])
    }

    /// `nodectl vm get NAME`.
    pub fn vm(&self, name: &str) -> Value {
        self.ctl(&["vm", "get", name])
    }

    /// The VM's console log.
    pub fn console(&self, name: &str) -> String {
        vm_console(&self.state(), name)
    }

    /// Polls `f` until it returns a value (safety deadline).
    pub fn wait_until<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + SAFETY;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nnoded log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the VM has this phase (and version, when given).
    pub fn wait_vm(&self, name: &str, phase: &str, version: Option<&str>) -> Value {
        self.wait_until(&format!("{name} {phase} on {version:?}"), || {
            let v = self.vm(name);
            let ok = v["phase"] == phase && version.is_none_or(|ver| v["launcherVersion"] == ver);
            ok.then_some(v)
        })
    }

    /// Waits until the guest's console shows a pass counter above `above`.
    pub fn wait_pass_above(&self, name: &str, above: u64) -> u64 {
        self.wait_until(&format!("{name} pass > {above}"), || {
            last_pass(&self.console(name)).filter(|p| *p > above)
        })
    }

    /// Launcher `version`, built from this tree; when `broken`, a wrapper around it whose
    /// `run` fails (every migration to it fails), to exercise retries.
    pub fn launcher_version(&self, version: &str, broken: bool) -> PathBuf {
        let real = crate::launcher_of_version(version);
        if !broken {
            return real;
        }
        self.launcher_script(&real, "echo 'broken launcher' >&2\nexit 1")
    }

    /// A wrapper around launcher `real` whose every `run` fails (so every migration to
    /// it fails), named after `real`'s directory so that several can coexist.
    pub fn launcher_version_script(&self, real: &Path) -> PathBuf {
        let tag = real
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.launcher_script_named(
            &format!("launcher-broken-{tag}"),
            real,
            "echo 'broken launcher' >&2\nexit 1",
        )
    }

    /// A wrapper around `real` whose `run` executes `run` (other commands go to `real`).
    pub fn launcher_script(&self, real: &Path, run: &str) -> PathBuf {
        self.launcher_script_named("launcher-broken", real, run)
    }

    /// [`Node::launcher_script`] written to `name` in the test directory.
    pub fn launcher_script_named(&self, name: &str, real: &Path, run: &str) -> PathBuf {
        let script = format!(
            "#!/bin/sh\nif [ \"$1\" = run ]; then\n{run}\nfi\nexec '{}' \"$@\"\n",
            real.display()
        );
        let p = self.dir.join(name);
        std::fs::write(&p, script).expect("write wrapper");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_daemon();
        // Kill every process started for this state directory (launchers carry their
        // socket paths, inside it, on their command lines).
        kill_processes_mentioning(&self.state().display().to_string());
    }
}

/// Pids of live processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            if !zombie && String::from_utf8_lossy(&cmd).contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// SIGKILL every live process (other than this one) whose command line contains
/// `needle`: the launchers a test, demo or benchmark started under its own temp directory.
pub fn kill_processes_mentioning(needle: &str) {
    let me = std::process::id() as i32;
    for pid in processes_mentioning(needle)
        .into_iter()
        .filter(|&p| p != me)
    {
        // SAFETY: plain kill(2) on a pid whose command line names the caller's directory.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// The console log of VM `name` under noded's state directory `state` (empty if none yet).
pub fn vm_console(state: &Path, name: &str) -> String {
    std::fs::read_to_string(state.join("vms").join(name).join("console.log")).unwrap_or_default()
}

/// The last `pass=` number of a pattern guest's console.
pub fn last_pass(console: &str) -> Option<u64> {
    console
        .split("pass=")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .last()
}

/// How many times the pattern guest booted in this console.
pub fn boots(console: &str) -> usize {
    console.matches("pattern: booted").count()
}

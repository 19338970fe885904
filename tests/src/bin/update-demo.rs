//! The main job of the README: boot a few tiny guests under `noded`, install a newer
//! launcher, and show the update as it happens. Run through `scripts/demo`, which
//! builds the two launcher versions this program is given.
//!
//! `update-demo --bin-dir DIR --old-launcher PATH --new-launcher PATH`
//! (`DIR` holds `noded` and `nodectl`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Demo {
    bin_dir: PathBuf,
    state: PathBuf,
    dir: PathBuf,
    noded: Option<Child>,
}

/// Print the error and unwind, so that `Demo`'s drop still stops the daemon and the VMs.
fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("update-demo: {msg}");
    std::panic::resume_unwind(Box::new(()))
}

impl Demo {
    fn socket(&self) -> PathBuf {
        self.state.join("noded.sock")
    }

    /// Run nodectl, echoing the command line as an operator would type it.
    fn show(&self, args: &[&str]) {
        println!("\n$ nodectl {}", args.join(" "));
        let out = self.nodectl(args, false);
        print!("{out}");
    }

    fn nodectl(&self, args: &[&str], json: bool) -> String {
        let mut cmd = Command::new(self.bin_dir.join("nodectl"));
        cmd.arg("--socket").arg(self.socket());
        if json {
            cmd.args(["-o", "json"]);
        }
        let out = cmd
            .args(args)
            .output()
            .unwrap_or_else(|e| die(format!("nodectl: {e}")));
        if !out.status.success() {
            die(format!(
                "nodectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.nodectl(args, true)).unwrap_or(Value::Null)
    }

    fn vms(&self) -> BTreeMap<String, Value> {
        self.json(&["vm", "list"])
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| Some((v["name"].as_str()?.to_string(), v)))
            .collect()
    }

    fn console(&self, vm: &str) -> String {
        integration_tests::node::vm_console(&self.state, vm)
    }

    fn wait(&self, what: &str, limit: Duration, f: impl FnMut() -> bool) {
        if !integration_tests::poll(limit, Duration::from_millis(200), f) {
            die(format!(
                "gave up waiting for {what}; noded log: {}",
                self.dir.join("noded.log").display()
            ));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // Stop every VM (graceful), then the daemon; launchers run in their own sessions.
        if let Some(mut d) = self.noded.take() {
            for name in self.vms().keys() {
                let _ = Command::new(self.bin_dir.join("nodectl"))
                    .arg("--socket")
                    .arg(self.socket())
                    .args(["vm", "delete", name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        // Anything still running from our state directory (a launcher mid-exit).
        integration_tests::node::kill_processes_mentioning(&self.state.display().to_string());
        if std::env::var_os("DEMO_KEEP").is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            println!("\n(kept {} because DEMO_KEEP is set)", self.dir.display());
        }
    }
}

fn passes(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pass="))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn arg(args: &[String], name: &str) -> PathBuf {
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| PathBuf::from(&w[1]))
        .unwrap_or_else(|| die(format!("missing {name}; run scripts/demo")))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin_dir = arg(&args, "--bin-dir");
    let old = arg(&args, "--old-launcher");
    let new = arg(&args, "--new-launcher");
    let demo = start_noded(&bin_dir);
    let old_version = launcher_version(&old);
    let new_version = launcher_version(&new);
    println!("== Installing launcher {old_version}");
    demo.show(&["launcher", "install", "--path", &old.display().to_string()]);
    let specs = vm_specs();
    let before = create_vms(&demo, &specs);

    println!("\n== Installing launcher {new_version}: the update starts");
    demo.show(&["launcher", "install", "--path", &new.display().to_string()]);
    println!();
    watch_update(&demo, &new_version);
    report(&demo, &specs, &before);
    demo.show(&["status"]);
    println!("\n== Cleaning up (set DEMO_KEEP=1 to keep the state directory and logs)");
}

/// A VM of the demo: name, spec (YAML), what should happen to it.
type Spec = (&'static str, String, &'static str);

/// Start noded on a fresh state directory and wait until it answers.
fn start_noded(bin_dir: &Path) -> Demo {
    let dir = std::env::temp_dir().join(format!("update-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(format!("{}: {e}", dir.display())));
    let state = dir.join("state");
    let config = dir.join("config.yaml");
    // Evict is enabled so that VMs that cannot migrate are restarted; short batch window
    // so the demo does not wait the default minute.
    std::fs::write(
        &config,
        "workloadUpdateStrategy:\n  workloadUpdateMethods: [LiveMigrate, Evict]\n  batchEvictionSize: 10\n  batchEvictionInterval: 5s\n",
    )
    .unwrap_or_else(|e| die(e));
    let log = std::fs::File::create(dir.join("noded.log")).unwrap_or_else(|e| die(e));
    println!(
        "== Starting noded on a temporary state directory: {}",
        state.display()
    );
    let noded = Command::new(bin_dir.join("noded"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--config")
        .arg(&config)
        .stdout(log.try_clone().unwrap_or_else(|e| die(e)))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| die(format!("cannot start noded: {e}")));
    let demo = Demo {
        bin_dir: bin_dir.to_path_buf(),
        state,
        dir,
        noded: Some(noded),
    };
    demo.wait("noded to answer", Duration::from_secs(30), || {
        Command::new(demo.bin_dir.join("nodectl"))
            .arg("--socket")
            .arg(demo.socket())
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });

    demo
}

/// The five VMs, one per update outcome.
fn vm_specs() -> [Spec; 5] {
    let pattern = test_guests::pattern_path().display().to_string();
    [
        (
            "web",
            format!("name: web\nkernel: {pattern}\ncmdline: \"mib=16 every=200\"\nmemory: 128Mi\nrunStrategy: Always\nevictionStrategy: LiveMigrate\n"),
            "migratable: moves to the new launcher by live migration (local handover)",
        ),
        (
            "api",
            format!("name: api\nkernel: {pattern}\ncmdline: \"mib=8 every=200\"\nmemory: 64Mi\nvcpus: 2\nrunStrategy: RerunOnFailure\nevictionStrategy: LiveMigrateIfPossible\n"),
            "migratable, 2 vCPUs: live migration",
        ),
        (
            "gpu",
            format!("name: gpu\nkernel: {pattern}\ncmdline: \"mib=8 every=200\"\nmemory: 64Mi\nrunStrategy: Always\nevictionStrategy: None\nhostDevices: [{{name: gpu0, deviceName: example.com/gpu}}]\n"),
            "host device, not migratable, runStrategy Always: evicted and restarted on the new launcher",
        ),
        (
            "batch",
            format!("name: batch\nkernel: {pattern}\ncmdline: \"mib=8 every=200\"\nmemory: 64Mi\nrunStrategy: Manual\nevictionStrategy: None\nhostDevices: [{{name: fpga0, deviceName: example.com/fpga}}]\n"),
            "host device, runStrategy Manual: evicted and left stopped until someone starts it",
        ),
        (
            "pinned",
            format!("name: pinned\nkernel: {pattern}\ncmdline: \"mib=8 every=200\"\nmemory: 64Mi\nrunStrategy: Always\nevictionStrategy: LiveMigrate\nhostDevices: [{{name: nic0, deviceName: example.com/sriov}}]\n"),
            "host device with evictionStrategy LiveMigrate: cannot move, stays outdated with its reason",
        ),
    ]
}

/// Create and start every VM, wait for their first passes; returns each one's last pass.
fn create_vms(demo: &Demo, specs: &[Spec]) -> BTreeMap<&'static str, u64> {
    println!("\n== Creating {} VMs", specs.len());
    for (name, spec, what) in specs {
        let path = demo.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, spec).unwrap_or_else(|e| die(e));
        println!("   {name:7} {what}");
        demo.nodectl(&["vm", "create", "-f", &path.display().to_string()], false);
        if spec.contains("runStrategy: Manual") {
            // Manual: the VM starts only when someone starts it.
            demo.nodectl(&["vm", "start", name], false);
        }
    }
    demo.wait("every VM to run", Duration::from_secs(60), || {
        let vms = demo.vms();
        vms.len() == specs.len() && vms.values().all(|v| v["phase"] == "Running")
    });
    demo.wait(
        "the guests to print their first passes",
        Duration::from_secs(60),
        || {
            specs
                .iter()
                .all(|(n, _, _)| !passes(&demo.console(n)).is_empty())
        },
    );
    demo.show(&["vm", "list"]);
    specs
        .iter()
        .map(|(n, _, _)| (*n, passes(&demo.console(n)).last().copied().unwrap_or(0)))
        .collect()
}

/// Print each VM's changes until the update has settled (safety limit: 2 minutes).
fn watch_update(demo: &Demo, new_version: &str) {
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let started = Instant::now();
    let settled = |vms: &BTreeMap<String, Value>| {
        vms.values().all(|v| {
            let phase = v["phase"].as_str().unwrap_or("");
            let name = v["name"].as_str().unwrap_or("");
            match name {
                "batch" => phase == "Stopped",
                "pinned" => {
                    v["outdated"] == true && v["reason"].as_str().is_some_and(|r| !r.is_empty())
                }
                _ => phase == "Running" && v["launcherVersion"] == new_version,
            }
        })
    };
    loop {
        let vms = demo.vms();
        for (name, v) in &vms {
            let line = format!(
                "{:>6.1}s  {name:7} {:12} launcher {:8} {}",
                started.elapsed().as_secs_f64(),
                v["phase"].as_str().unwrap_or("?"),
                v["launcherVersion"].as_str().unwrap_or("-"),
                if v["outdated"] == true {
                    format!("outdated: {}", v["reason"].as_str().unwrap_or(""))
                } else {
                    "up to date".to_string()
                }
            );
            let key = format!("{}{}{}", v["phase"], v["launcherVersion"], v["reason"]);
            if last.get(name) != Some(&key) {
                println!("{line}");
                last.insert(name.clone(), key);
            }
        }
        if settled(&vms) {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            die("the update did not settle within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What happened to each VM: migrated (with pause and pass counters), evicted, left.
fn report(demo: &Demo, specs: &[Spec], before: &BTreeMap<&'static str, u64>) {
    println!("\n== What happened to each VM");
    for (name, _, _) in specs {
        let v = &demo.vms()[*name];
        let console = demo.console(name);
        let boots = console.matches("pattern: booted").count();
        let after = passes(&console).last().copied().unwrap_or(0);
        let records = demo.json(&["migrations", name]);
        let rec = records
            .as_array()
            .and_then(|r| r.first())
            .cloned()
            .unwrap_or(Value::Null);
        let what = if rec["outcome"] == "Succeeded" {
            format!(
                "live-migrated {} -> {} in {:.1} ms, guest paused {:.2} ms, {} guest boot(s), pass counter {} -> {} (no reboot)",
                rec["sourceVersion"].as_str().unwrap_or("?"),
                rec["targetVersion"].as_str().unwrap_or("?"),
                rec["report"]["totalMs"].as_f64().unwrap_or(0.0),
                rec["report"]["downtimeMs"].as_f64().unwrap_or(0.0),
                boots,
                before[name],
                after
            )
        } else if v["phase"] == "Stopped" {
            format!(
                "evicted and left stopped (runStrategy {})",
                v["runStrategy"].as_str().unwrap_or("?")
            )
        } else if v["outdated"] == true {
            format!(
                "left on launcher {}: {}",
                v["launcherVersion"].as_str().unwrap_or("?"),
                v["reason"].as_str().unwrap_or("")
            )
        } else {
            format!(
                "evicted and restarted on launcher {} ({} guest boots: the restart is a new boot)",
                v["launcherVersion"].as_str().unwrap_or("?"),
                boots
            )
        };
        println!("   {name:7} {what}");
    }
}

fn launcher_version(path: &Path) -> String {
    let out = Command::new(path)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| die(format!("{}: {e}", path.display())));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("launcher ")
        .unwrap_or_else(|| die(format!("{} does not look like a launcher", path.display())))
        .to_string()
}

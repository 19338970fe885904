//! Scale: one node, many tiny VMs, one launcher version bump (issue 6).
//!
//! `scripts/bench-scale [VMS]` builds two launcher versions and runs this; or directly:
//! `scale --bin-dir DIR --old-launcher PATH --new-launcher PATH [--vms 100] [--write-docs]`
//! (`DIR` holds `noded` and `nodectl`).
//!
//! Two scenarios, each on a fresh noded: (A) default settings, every VM migratable;
//! (B) `workloadUpdateMethods: [LiveMigrate, Evict]` with every fifth VM carrying a host
//! device (not migratable: evicted and restarted). Every VM runs `pattern` (64 MiB of RAM,
//! a 2 MiB region it rewrites and verifies on every pass). After the update it checks
//! that every VM runs the new version, that no guest printed `STALE`, and that migrated
//! guests booted once; it reports the total update time and the pause distribution
//! (median, p99, max) from noded's migration records, and where the slowest pauses spent
//! their time (the report's `switchOverTimes`). With `--write-docs` it writes
//! docs/scale.md, keeping the hand-written notes below [`NOTES_MARKER`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Everything from this line on in docs/scale.md is hand-written and kept on regeneration.
const NOTES_MARKER: &str = "<!-- hand-written notes below: kept when the table is regenerated -->";

/// How many of the slowest pauses of each scenario are broken down by phase.
const SLOWEST: usize = 5;

struct Node {
    bin_dir: PathBuf,
    dir: PathBuf,
    daemon: Child,
}

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("scale: {msg}");
    std::process::exit(1);
}

impl Node {
    fn start(bin_dir: &Path, name: &str, config: &str) -> Node {
        let dir = std::env::temp_dir().join(format!("scale-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(e));
        std::fs::write(dir.join("config.yaml"), config).unwrap_or_else(|e| die(e));
        let log = std::fs::File::create(dir.join("noded.log")).unwrap_or_else(|e| die(e));
        let daemon = Command::new(bin_dir.join("noded"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--config")
            .arg(dir.join("config.yaml"))
            // The launchers inherit it: their switch-over milestones reach their logs.
            .env("LAUNCHER_LOG", "warn,migration=info")
            .stdout(log.try_clone().unwrap_or_else(|e| die(e)))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| die(format!("noded: {e}")));
        let n = Node {
            bin_dir: bin_dir.to_path_buf(),
            dir,
            daemon,
        };
        n.wait("noded", Duration::from_secs(30), || {
            n.try_ctl(&["status"]).is_some()
        });
        n
    }

    fn try_ctl(&self, args: &[&str]) -> Option<Value> {
        let out = Command::new(self.bin_dir.join("nodectl"))
            .arg("--socket")
            .arg(self.dir.join("state/noded.sock"))
            .args(["-o", "json"])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    }

    fn ctl(&self, args: &[&str]) -> Value {
        self.try_ctl(args)
            .unwrap_or_else(|| die(format!("nodectl {} failed", args.join(" "))))
    }

    fn vms(&self) -> Vec<Value> {
        self.ctl(&["vm", "list"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn console(&self, vm: &str) -> String {
        integration_tests::node::vm_console(&self.dir.join("state"), vm)
    }

    fn wait(&self, what: &str, limit: Duration, f: impl FnMut() -> bool) {
        if !integration_tests::poll(limit, Duration::from_millis(250), f) {
            die(format!(
                "gave up waiting for {what} (logs in {})",
                self.dir.display()
            ));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        integration_tests::node::kill_processes_mentioning(&self.dir.display().to_string());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Outcome {
    name: &'static str,
    vms: usize,
    migrated: usize,
    evicted: usize,
    update_s: f64,
    pauses_ms: Vec<f64>,
    /// `(pause ms, VM, the report's switchOverTimes)` of every migration, slowest first.
    phases: Vec<(f64, String, Value)>,
    stale: usize,
    rebooted_migrated: usize,
}

/// The phases of one pause, in ms, from the report's cumulative milestones (a missing
/// milestone, from a launcher that does not report it, shows as `-`).
fn phase_row(scenario: &str, pause: f64, vm: &str, t: &Value) -> String {
    let m = |k: &str| t.get(k).and_then(Value::as_f64);
    let d = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", b - a),
        _ => "-".into(),
    };
    let stopped = m("vcpusStoppedMs");
    format!(
        "| {scenario} | {vm} | {pause:.2} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        m("destinationRaisedMs").map_or("-".into(), |v| format!("{v:.2}")),
        stopped.map_or("-".into(), |v| format!("{v:.2}")),
        d(stopped, m("finalPagesMs")),
        d(m("finalPagesMs"), m("stateSentMs")),
        d(m("stateSentMs"), m("readyMs")),
        d(m("readyMs"), m("goSentMs")),
        d(m("goSentMs"), m("startedMs")),
        m("destinationGoToResumeMs").map_or("-".into(), |v| format!("{v:.2}")),
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn scenario(
    name: &'static str,
    bin_dir: &Path,
    old: &Path,
    new: &Path,
    vms: usize,
    config: &str,
    host_device_every: usize,
) -> Outcome {
    eprintln!("scale: scenario {name}: {vms} VMs");
    let node = Node::start(bin_dir, name, config);
    node.ctl(&["launcher", "install", "--path", &old.display().to_string()]);
    let pattern = test_guests::pattern_path().display().to_string();
    for i in 0..vms {
        let hd = if host_device_every > 0 && i % host_device_every == 0 {
            "hostDevices: [{name: dev0, deviceName: example.com/dev}]\n"
        } else {
            ""
        };
        let spec = format!(
            "name: vm{i:03}\nkernel: {pattern}\ncmdline: \"mib=2 every=1000\"\nmemory: 64Mi\nrunStrategy: Always\nevictionStrategy: None\n{hd}"
        );
        let path = node.dir.join(format!("vm{i:03}.yaml"));
        std::fs::write(&path, spec).unwrap_or_else(|e| die(e));
        node.ctl(&["vm", "create", "-f", &path.display().to_string()]);
    }
    node.wait("every VM to run", Duration::from_secs(600), || {
        node.vms()
            .iter()
            .filter(|v| v["phase"] == "Running")
            .count()
            == vms
    });
    node.wait(
        "every guest to pass its first check",
        Duration::from_secs(600),
        || (0..vms).all(|i| node.console(&format!("vm{i:03}")).contains("pass=")),
    );
    let new_version = String::from_utf8_lossy(
        &Command::new(new)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| die(e))
            .stdout,
    )
    .trim()
    .trim_start_matches("launcher ")
    .to_string();
    let t0 = Instant::now();
    node.ctl(&["launcher", "install", "--path", &new.display().to_string()]);
    node.wait(
        "every VM on the new version",
        Duration::from_secs(1800),
        || {
            node.vms()
                .iter()
                .all(|v| v["phase"] == "Running" && v["launcherVersion"] == new_version.as_str())
        },
    );
    let update_s = t0.elapsed().as_secs_f64();
    let mut pauses = Vec::new();
    let mut phases = Vec::new();
    let mut migrated = 0;
    let mut stale = 0;
    let mut rebooted_migrated = 0;
    for i in 0..vms {
        let vm = format!("vm{i:03}");
        let console = node.console(&vm);
        if console.contains("STALE") {
            stale += 1;
        }
        let recs = node.ctl(&["migrations", &vm]);
        if let Some(r) = recs
            .as_array()
            .and_then(|a| a.iter().find(|r| r["outcome"] == "Succeeded"))
        {
            migrated += 1;
            let pause = r["report"]["downtimeMs"].as_f64().unwrap_or(0.0);
            pauses.push(pause);
            phases.push((pause, vm.clone(), r["report"]["switchOverTimes"].clone()));
            if console.matches("pattern: booted").count() != 1 {
                rebooted_migrated += 1;
            }
        }
    }
    pauses.sort_by(|a, b| a.total_cmp(b));
    phases.sort_by(|a, b| b.0.total_cmp(&a.0));
    // The launchers' own lines about the slowest switch-overs (the destination logs its
    // milestones with "state loaded"), to stderr: the log files go with the node.
    for (pause, vm, _) in phases.iter().take(SLOWEST) {
        let dir = node.dir.join("state/vms").join(vm);
        let mut lines = Vec::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("launcher-") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                lines.extend(
                    text.lines()
                        .filter(|l| l.contains("switch-over") || l.contains("state loaded"))
                        .map(|l| format!("  {name}: {l}")),
                );
            }
        }
        eprintln!(
            "scale: {name} {vm} paused {pause:.2} ms:\n{}",
            lines.join("\n")
        );
    }
    Outcome {
        name,
        vms,
        migrated,
        evicted: vms - migrated,
        update_s,
        pauses_ms: pauses,
        phases,
        stale,
        rebooted_migrated,
    }
}

/// Runs one node through a launcher update with many VMs; see the module comment.
#[derive(clap::Parser)]
#[command(name = "scale")]
struct Opts {
    #[command(flatten)]
    docs: benches::DocsArg,
    /// Directory holding `noded` and `nodectl`.
    #[arg(long, value_name = "DIR")]
    bin_dir: PathBuf,
    /// The launcher the VMs start on.
    #[arg(long, value_name = "PATH")]
    old_launcher: PathBuf,
    /// The launcher they are updated to.
    #[arg(long, value_name = "PATH")]
    new_launcher: PathBuf,
    /// VMs per scenario.
    #[arg(long, default_value_t = 100, value_parser = benches::positive)]
    vms: usize,
}

fn main() {
    let opts = <Opts as clap::Parser>::parse();
    let (bin_dir, old, new, vms) = (
        &opts.bin_dir,
        &opts.old_launcher,
        &opts.new_launcher,
        opts.vms,
    );
    let outcomes = [
        scenario("default", bin_dir, old, new, vms, "{}\n", 0),
        scenario(
            "migrate-and-evict",
            bin_dir,
            old,
            new,
            vms,
            "workloadUpdateStrategy:\n  workloadUpdateMethods: [LiveMigrate, Evict]\n  batchEvictionSize: 10\n  batchEvictionInterval: 5s\n",
            5,
        ),
    ];
    let mut table = String::from(
        "| scenario | VMs | migrated | evicted+restarted | update time s | pause median ms | pause p99 ms | pause max ms | STALE guests | migrated guests rebooted |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut ok = true;
    for o in &outcomes {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
            o.name,
            o.vms,
            o.migrated,
            o.evicted,
            o.update_s,
            percentile(&o.pauses_ms, 0.5),
            percentile(&o.pauses_ms, 0.99),
            o.pauses_ms.last().copied().unwrap_or(0.0),
            o.stale,
            o.rebooted_migrated
        ));
        ok &= o.stale == 0 && o.rebooted_migrated == 0;
    }
    let mut slow = String::from(
        "| scenario | VM | pause ms | before the pause: SwitchOverReady | stop vCPUs | final pages | state sent | until Ready (destination loads) | release disks, Go | until Started | destination Go to resume |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for o in &outcomes {
        for (pause, vm, t) in o.phases.iter().take(SLOWEST) {
            slow.push_str(&phase_row(o.name, *pause, vm, t));
        }
    }
    println!("{table}");
    println!("The {SLOWEST} slowest pauses of each scenario, by phase (ms):\n\n{slow}");
    {
        let notes = std::fs::read_to_string(benches::workspace_root().join("docs/scale.md"))
            .ok()
            .and_then(|old| old.find(NOTES_MARKER).map(|i| old[i..].to_string()))
            .unwrap_or_else(|| format!("{NOTES_MARKER}\n"));
        let doc = format!(
            "# Scale: {vms} VMs on one node, one launcher version bump\n\nWritten by `benches/src/bin/scale.rs`; regenerate with\n\n```\nscripts/bench-scale {vms} --write-docs\n```\n\nEach VM: `pattern` guest, 64 MiB RAM, a 2 MiB region rewritten and verified on every pass, 1 vCPU; {vms} such vCPUs share this machine's 2 cores, so every guest runs at a small fraction of a core. Scenario *default*: noded's default settings (`[LiveMigrate]`, 2 parallel migrations), every VM migratable. Scenario *migrate-and-evict*: `[LiveMigrate, Evict]`, batches of 10 evictions per 5 s, every fifth VM has a host device (not migratable: evicted and restarted on the new launcher, a new boot by design). Pauses come from noded's migration records (`report.downtimeMs`, the source's pause until the destination runs the guest).\n\n{table}\nThe {SLOWEST} slowest pauses of each scenario, by phase (ms, from the report's `switchOverTimes`, measured by the source: before the pause and not part of it, the destination's answer to `SwitchOver`; then stopping the vCPUs, writing the last dirty pages, the state and `Complete`, waiting for the destination's `Ready`, releasing the disks and sending `Go`, waiting for `Started`; the last column is the destination's own `Go` to resume):\n\n{slow}\n{notes}"
        );
        opts.docs.write("scale", "docs/scale.md", &doc);
    }
    if !ok {
        die("a guest saw a stale page or a migrated guest rebooted");
    }
}

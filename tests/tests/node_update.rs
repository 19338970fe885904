//! End to end: noded keeps tiny guests running in real launchers and moves them to a newly
//! installed launcher version, following the settings (issue 4).
//!
//! Version A is `target/debug/launcher` (0.1.0 unless built with LAUNCHER_VERSION).
//! Version B is a real second build of the tree with `LAUNCHER_VERSION=9.0.0`
//! (`integration_tests::launcher_of_version`, built once into target/versions/). A
//! *broken* version B, for the retry tests, is a wrapper whose `capabilities` is the real
//! 9.0.0 binary's and whose `run` fails.

use std::time::{Duration, Instant};

use integration_tests::node::{boots, processes_mentioning, Node};
use integration_tests::SAFETY;

const HOSTDEV: &str = "hostDevices: [{name: gpu0, deviceName: example.com/gpu}]\n";

#[test]
fn migratable_vm_moves_to_the_new_launcher_without_a_reboot() {
    let node = Node::start("migrate", "{}\n");
    let a = node.install(&node.launcher_a());
    let va = a["version"].as_str().expect("version").to_string();
    let created = node.create("web", "runStrategy: Always\n");
    assert_eq!(
        created["machineType"], "q35-1.0",
        "alias resolved at creation"
    );
    node.wait_vm("web", "Running", Some(&va));
    let before = node.wait_pass_above("web", 100);

    node.install(&node.launcher_version("9.0.0", false));
    let v = node.wait_vm("web", "Running", Some("9.0.0"));
    assert_eq!(v["outdated"], false);
    assert_eq!(
        v["machineType"], "q35-1.0",
        "machine type unchanged by the update"
    );
    // The guest keeps counting in the new launcher: same boot, higher passes, no STALE.
    let after = node.wait_pass_above("web", before + 100);
    let console = node.console("web");
    assert_eq!(
        boots(&console),
        1,
        "the console shows a second boot:\n{console:.2000}"
    );
    assert!(!console.contains("STALE"), "guest saw stale memory");
    assert!(after > before);
    let recs = node.ctl(&["migrations", "web"]);
    let recs = recs.as_array().expect("records");
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["outcome"], "Succeeded");
    assert_eq!(recs[0]["sourceVersion"], va.as_str());
    assert_eq!(recs[0]["targetVersion"], "9.0.0");
    assert_eq!(recs[0]["report"]["status"], "completed");
    assert!(recs[0]["report"]["downtimeMs"].as_f64().is_some());
    assert!(recs[0]["finishedAt"].is_string());
    let status = node.ctl(&["status"]);
    assert_eq!(status["targetLauncherVersion"], "9.0.0");
    assert_eq!(status["outdatedVirtualMachineInstanceWorkloads"], 0);
    // Exactly one launcher runs the VM.
    assert_eq!(
        processes_mentioning(&node.state().join("vms/web/").display().to_string()).len(),
        1
    );
}

#[test]
fn non_migratable_vms_follow_methods_and_run_strategy() {
    let node = Node::start("evict", "{}\n");
    node.install(&node.launcher_a());
    node.create(
        "always",
        &format!("{HOSTDEV}runStrategy: Always\nterminationGracePeriodSeconds: 5\n"),
    );
    node.create(
        "manual",
        &format!("{HOSTDEV}runStrategy: Manual\nterminationGracePeriodSeconds: 5\n"),
    );
    assert_eq!(
        node.vm("manual")["phase"],
        "Stopped",
        "Manual VMs are not started at creation"
    );
    node.ctl(&["vm", "start", "manual"]);
    let va = node.wait_vm("always", "Running", None)["launcherVersion"].clone();
    node.wait_vm("manual", "Running", None);
    node.wait_pass_above("always", 0);
    assert_eq!(node.vm("always")["migratable"], false);

    node.install(&node.launcher_version("9.0.0", false));
    for name in ["always", "manual"] {
        let v = node.wait_until("outdated reason", || {
            let v = node.vm(name);
            (v["outdated"] == true).then_some(v)
        });
        assert_eq!(
            v["reason"], "not migratable: HostDevicesNotLiveMigratable and Evict is not enabled",
            "{v}"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        node.vm("always")["launcherVersion"],
        va,
        "left alone under [LiveMigrate]"
    );
    let status = node.ctl(&["status"]);
    assert_eq!(status["outdatedVirtualMachineInstanceWorkloads"], 2);
    let upgradeable = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Upgradeable").cloned())
        .expect("Upgradeable condition");
    assert_eq!(upgradeable["status"], "False");

    node.config("workloadUpdateStrategy:\n  workloadUpdateMethods: [LiveMigrate, Evict]\n");
    let v = node.wait_vm("always", "Running", Some("9.0.0"));
    assert_eq!(v["machineType"], "q35-1.0");
    // Running means the launcher started; the guest's banner follows shortly.
    node.wait_until("always booted again on the new launcher", || {
        (boots(&node.console("always")) == 2).then_some(())
    });
    let m = node.wait_vm("manual", "Stopped", None);
    assert!(
        m["message"].as_str().unwrap_or("").contains("evicted"),
        "{m}"
    );
    assert_eq!(
        node.ctl(&["status"])["outdatedVirtualMachineInstanceWorkloads"],
        0
    );
}

#[test]
fn empty_methods_and_manual_approval_hold_the_update() {
    let node = Node::start("hold", "approvalStrategy: Manual\n");
    node.install(&node.launcher_a());
    node.create("db", "");
    let va = node.wait_vm("db", "Running", None)["launcherVersion"].clone();
    node.install(&node.launcher_version("9.0.0", false));
    let status = node.ctl(&["status"]);
    assert_eq!(status["approvalPending"], true);
    assert_eq!(status["targetLauncherVersion"], "9.0.0");
    let v = node.vm("db");
    assert_eq!(v["outdated"], true);
    assert_eq!(
        v["reason"],
        "waiting for approval of launcher 9.0.0 (nodectl update approve)"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(node.vm("db")["launcherVersion"], va);

    // Approved, but workload updates paused: still nothing moves.
    node.config("workloadUpdateStrategy: {workloadUpdateMethods: []}\n");
    let s = node.ctl(&["update", "approve"]);
    assert_eq!(s["approvalPending"], false);
    let v = node.vm("db");
    assert_eq!(
        v["reason"],
        "workload updates disabled (workloadUpdateMethods is empty)"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(node.vm("db")["launcherVersion"], va);
    assert_eq!(
        node.ctl(&["migrations", "db"]).as_array().map(Vec::len),
        Some(0)
    );

    node.config("workloadUpdateStrategy: {workloadUpdateMethods: [LiveMigrate]}\n");
    node.wait_vm("db", "Running", Some("9.0.0"));
    assert_eq!(boots(&node.console("db")), 1);
}

#[test]
fn evictions_respect_batch_size_and_interval() {
    let node = Node::start(
        "batch",
        "workloadUpdateStrategy:\n  workloadUpdateMethods: [Evict]\n  batchEvictionSize: 1\n  batchEvictionInterval: 3s\n",
    );
    node.install(&node.launcher_a());
    let names = ["b1", "b2", "b3"];
    for n in names {
        node.create(n, &format!("{HOSTDEV}terminationGracePeriodSeconds: 5\n"));
    }
    for n in names {
        node.wait_vm(n, "Running", None);
    }
    node.install(&node.launcher_version("9.0.0", false));
    // Record when each VM left its old launcher.
    let mut moved: Vec<(String, Instant)> = Vec::new();
    let mut saw_batch_reason = false;
    let deadline = Instant::now() + SAFETY;
    while moved.len() < names.len() {
        assert!(
            Instant::now() < deadline,
            "evictions did not finish\n{}",
            node.log()
        );
        for v in node
            .ctl(&["vm", "list"])
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let name = v["name"].as_str().unwrap_or("").to_string();
            if v["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("waiting for batch window"))
            {
                saw_batch_reason = true;
            }
            let left = v["phase"] != "Running" || v["launcherVersion"] == "9.0.0";
            if left && !moved.iter().any(|(n, _)| *n == name) {
                moved.push((name, Instant::now()));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(saw_batch_reason, "no VM showed the batch-window reason");
    for w in moved.windows(2) {
        let gap = w[1].1 - w[0].1;
        // 3 s windows; allow for polling jitter.
        assert!(
            gap >= Duration::from_millis(2500),
            "{} evicted {gap:?} after {}",
            w[1].0,
            w[0].0
        );
    }
    for n in names {
        node.wait_vm(n, "Running", Some("9.0.0"));
    }
}

#[test]
fn failed_migrations_are_retried_with_backoff_and_records_capped() {
    let node = Node::start(
        "retry",
        "liveMigrationConfig:\n  retryBackoffBaseSeconds: 1\n  retryBackoffMaxSeconds: 1\n  targetReadyTimeoutSeconds: 5\n",
    );
    let a = node.install(&node.launcher_a());
    node.create("web", "");
    node.wait_vm("web", "Running", None);
    node.install(&node.launcher_version("9.0.0", true));
    node.wait_until("at least 6 failed attempts", || {
        node.log()
            .matches("migration failed")
            .count()
            .ge(&6)
            .then_some(())
    });
    let recs = node.ctl(&["migrations", "web"]);
    let recs = recs.as_array().cloned().unwrap_or_default();
    let finished: Vec<_> = recs.iter().filter(|r| r["outcome"] != "Running").collect();
    assert_eq!(finished.len(), 5, "records capped at 5: {recs:?}");
    assert!(finished.iter().all(|r| r["outcome"] == "Failed"));
    assert!(finished[0]["report"]["error"]
        .as_str()
        .unwrap_or("")
        .contains("target launcher"));
    // The VM keeps running on its old launcher, with the reason.
    let v = node.vm("web");
    assert_eq!(v["launcherVersion"], a["version"]);
    assert_eq!(v["outdated"], true);
    assert_eq!(boots(&node.console("web")), 1);
    let v = node.wait_until("a backoff reason", || {
        let v = node.vm("web");
        v["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("retrying in"))
            .then_some(v)
    });
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("after: target launcher"),
        "{v}"
    );
    // Pause retries; then nothing but the VM's own launcher remains.
    node.config("workloadUpdateStrategy: {workloadUpdateMethods: []}\n");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        processes_mentioning(&node.state().join("vms/web/").display().to_string()).len(),
        1
    );
}

#[test]
fn daemon_killed_mid_update_finishes_after_restart() {
    let mut node = Node::start(
        "restart",
        "workloadUpdateStrategy:\n  workloadUpdateMethods: [LiveMigrate, Evict]\n",
    );
    node.install(&node.launcher_a());
    node.create("mig", "");
    node.create(
        "evi",
        &format!("{HOSTDEV}terminationGracePeriodSeconds: 5\n"),
    );
    node.create("off", "runStrategy: Manual\n");
    node.wait_vm("mig", "Running", None);
    node.wait_vm("evi", "Running", None);
    node.wait_pass_above("mig", 0);
    node.install(&node.launcher_version("9.0.0", false));
    // Kill noded while the update is under way, then start it again.
    std::thread::sleep(Duration::from_millis(30));
    node.kill_daemon();
    node.spawn_daemon();
    let m = node.wait_vm("mig", "Running", Some("9.0.0"));
    let e = node.wait_vm("evi", "Running", Some("9.0.0"));
    assert_eq!(m["machineType"], "q35-1.0");
    assert_eq!(e["machineType"], "q35-1.0");
    assert_eq!(node.vm("off")["phase"], "Stopped");
    assert_eq!(boots(&node.console("mig")), 1, "{}", node.console("mig"));
    let list = node.ctl(&["vm", "list"]);
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(3),
        "every VM accounted for"
    );
    for n in ["mig", "evi"] {
        let procs =
            processes_mentioning(&node.state().join(format!("vms/{n}/")).display().to_string());
        assert_eq!(
            procs.len(),
            1,
            "{n} runs in exactly one launcher: {procs:?}"
        );
    }
    // And the restarted daemon adopted the launcher: stopping works through it.
    node.ctl(&["vm", "stop", "mig"]);
    node.wait_vm("mig", "Stopped", None);
}

#[test]
fn daemon_killed_while_the_target_starts_retries_the_migration() {
    let mut node = Node::start(
        "resume",
        "liveMigrationConfig:\n  retryBackoffBaseSeconds: 1\n",
    );
    let a = node.install(&node.launcher_a());
    node.create("web", "");
    node.wait_vm("web", "Running", None);
    node.wait_pass_above("web", 0);
    // Version B's launcher takes 2 s before it listens: kill noded in that window.
    let real_b = integration_tests::launcher_of_version("9.0.0");
    let slow = node.launcher_script(
        &real_b,
        &format!("sleep 2\nexec '{}' \"$@\"", real_b.display()),
    );
    node.install(&slow);
    node.wait_vm("web", "Migrating", None);
    node.kill_daemon();
    node.spawn_daemon();
    let v = node.wait_vm("web", "Running", Some("9.0.0"));
    assert_eq!(v["machineType"], "q35-1.0");
    let recs = node.ctl(&["migrations", "web"]);
    let recs = recs.as_array().cloned().unwrap_or_default();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0]["outcome"], "Succeeded");
    assert_eq!(recs[1]["outcome"], "Failed");
    assert_eq!(recs[1]["sourceVersion"], a["version"]);
    assert!(
        recs[1]["report"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("noded restart"),
        "{recs:?}"
    );
    assert_eq!(boots(&node.console("web")), 1);
    node.wait_until("the interrupted target is gone", || {
        (processes_mentioning(&node.state().join("vms/web/").display().to_string()).len() == 1)
            .then_some(())
    });
}

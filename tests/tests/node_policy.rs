//! End to end: noded's update policy (issue 8) with real launcher builds: channels,
//! direct updates across versions, the control-plane-only procedure, machine types that
//! are never stranded, and migration-protocol windows.
//!
//! Version A is `target/debug/launcher`; the others are real builds of this tree
//! (`integration_tests::launcher_of_version[_with]`), some with the launcher's build-time
//! knobs (another machine-type list, another protocol window; see launcher/build.rs).

use std::path::PathBuf;
use std::time::Duration;

use integration_tests::node::{boots, Node};
use integration_tests::{launcher_of_version, launcher_of_version_with};
use serde_json::Value;

/// Version 9.3.0 dropped `q35-1.0` and offers `q35-2.0` (an alias of the same platform).
fn launcher_without_q35_1_0() -> PathBuf {
    launcher_of_version_with(
        "9.3.0",
        &[
            ("LAUNCHER_WITHOUT_MACHINE_TYPES", "q35-1.0"),
            ("LAUNCHER_EXTRA_MACHINE_TYPES", "q35-2.0"),
        ],
    )
}

fn condition(status: &Value, kind: &str) -> Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind).cloned())
        .unwrap_or(Value::Null)
}

fn migrations(node: &Node, vm: &str) -> Vec<Value> {
    node.ctl(&["migrations", vm])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn channels_candidate_ignored_by_stable_node_and_taken_by_candidate_node() {
    let node = Node::start("channels", "{}\n");
    let va = node.install(&node.launcher_a())["version"]
        .as_str()
        .expect("version")
        .to_string();
    node.create("web", "");
    node.wait_vm("web", "Running", Some(&va));
    node.wait_pass_above("web", 0);
    let rc = launcher_of_version("9.1.0");
    let rc_path = rc.to_str().expect("utf-8");

    let e = node
        .try_ctl(&[
            "launcher",
            "install",
            "--path",
            rc_path,
            "--channel",
            "beta",
        ])
        .expect_err("unknown channel refused");
    assert!(e.contains("unknown channel \"beta\""), "{e}");
    let f = node.file("bad.yaml", "channel: beta\n");
    let e = node
        .try_ctl(&["config", "set", "-f", &f])
        .expect_err("unknown channel setting refused");
    assert!(e.contains("invalid setting `channel`"), "{e}");

    let l = node.ctl(&[
        "launcher",
        "install",
        "--path",
        rc_path,
        "--channel",
        "candidate",
    ]);
    assert_eq!(l["channel"], "candidate");
    assert_eq!(l["target"], false, "a stable node does not target it: {l}");
    std::thread::sleep(Duration::from_secs(1));
    let v = node.vm("web");
    assert_eq!(v["launcherVersion"], va.as_str());
    assert_eq!(v["outdated"], false);
    let status = node.ctl(&["status"]);
    assert_eq!(status["targetLauncherVersion"], va.as_str());
    assert_eq!(status["channel"], "stable");

    node.config("channel: candidate\n");
    node.wait_vm("web", "Running", Some("9.1.0"));
    assert_eq!(boots(&node.console("web")), 1);

    // Back to stable: allowed, nothing is stopped or downgraded, and the status says the
    // path is untested.
    let f = node.file("stable.yaml", "channel: stable\n");
    let reply = node.ctl(&["config", "set", "-f", &f]);
    assert!(
        reply["warning"]
            .as_str()
            .unwrap_or("")
            .contains("untested update path"),
        "{reply}"
    );
    let status = node.ctl(&["status"]);
    assert!(
        status["untestedUpdatePath"]
            .as_str()
            .unwrap_or("")
            .contains("web (candidate 9.1.0)"),
        "{status}"
    );
    assert_eq!(condition(&status, "UntestedUpdatePath")["status"], "True");
    let v = node.vm("web");
    assert_eq!(v["phase"], "Running");
    assert_eq!(v["launcherVersion"], "9.1.0");
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("untested update path"),
        "{v}"
    );
}

#[test]
fn control_plane_only_update_moves_each_vm_once_directly_to_the_newest() {
    let node = Node::start("cponly", "{}\n");
    let va = node.install(&node.launcher_a())["version"]
        .as_str()
        .expect("version")
        .to_string();
    for n in ["web", "db"] {
        node.create(n, "");
    }
    for n in ["web", "db"] {
        node.wait_vm(n, "Running", Some(&va));
        node.wait_pass_above(n, 0);
    }
    // 1. Record the methods; 2. pause workload updates.
    let recorded =
        node.ctl(&["config", "get"])["workloadUpdateStrategy"]["workloadUpdateMethods"].clone();
    node.config("workloadUpdateStrategy: {workloadUpdateMethods: []}\n");
    // 3. Install one or more versions: nothing moves.
    node.install(&launcher_of_version("9.0.0"));
    node.install(&launcher_of_version("9.1.0"));
    std::thread::sleep(Duration::from_secs(1));
    for n in ["web", "db"] {
        let v = node.vm(n);
        assert_eq!(v["launcherVersion"], va.as_str());
        assert_eq!(
            v["reason"],
            "workload updates disabled (workloadUpdateMethods is empty)"
        );
        assert!(migrations(&node, n).is_empty());
    }
    let status = node.ctl(&["status"]);
    assert_eq!(status["targetLauncherVersion"], "9.1.0");
    assert_eq!(status["outdatedVirtualMachineInstanceWorkloads"], 2);
    assert_eq!(
        condition(&status, "Progressing")["reason"],
        "WorkloadUpdatesDisabled"
    );
    // 4. Restore the methods: each VM moves once, straight to the newest.
    node.config(&format!(
        "workloadUpdateStrategy: {{workloadUpdateMethods: {recorded}}}\n"
    ));
    for n in ["web", "db"] {
        let v = node.wait_vm(n, "Running", Some("9.1.0"));
        assert_eq!(v["machineType"], "q35-1.0");
        let recs = migrations(&node, n);
        assert_eq!(
            recs.len(),
            1,
            "one migration, no hop through 9.0.0: {recs:?}"
        );
        assert_eq!(recs[0]["sourceVersion"], va.as_str());
        assert_eq!(recs[0]["targetVersion"], "9.1.0");
        assert_eq!(recs[0]["outcome"], "Succeeded");
        assert_eq!(boots(&node.console(n)), 1, "{n} was not rebooted");
    }
    assert_eq!(
        node.ctl(&["status"])["outdatedVirtualMachineInstanceWorkloads"],
        0
    );
}

#[test]
fn a_launcher_dropping_a_machine_type_in_use_is_refused_and_forced_ones_strand_nothing() {
    let node = Node::start("mtypes", "{}\n");
    let va = node.install(&node.launcher_a())["version"]
        .as_str()
        .expect("version")
        .to_string();
    node.create(
        "web",
        "runStrategy: Always\nterminationGracePeriodSeconds: 5\n",
    );
    let before = node.wait_vm("web", "Running", Some(&va));
    node.wait_pass_above("web", 0);
    let c = launcher_without_q35_1_0();
    let c_path = c.to_str().expect("utf-8");

    let e = node
        .try_ctl(&["launcher", "install", "--path", c_path])
        .expect_err("a launcher dropping q35-1.0 is refused");
    assert!(
        e.contains("does not support machine type q35-1.0 (VMs web)") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(
        node.ctl(&["launcher", "list"]).as_array().map(Vec::len),
        Some(1)
    );
    // A machine type no launcher supports: a clear error.
    let f = node.file(
        "pc.yaml",
        &format!(
            "name: pc\nkernel: {}\nmemory: 32Mi\nmachineType: pc-i440fx-9.0\n",
            integration_tests::guests::pattern_path().display()
        ),
    );
    let e = node
        .try_ctl(&["vm", "create", "-f", &f])
        .expect_err("unknown machine type refused");
    assert!(
        e.contains("machineType: \"pc-i440fx-9.0\" is not offered by any installed launcher"),
        "{e}"
    );

    // Forced: the VM stays on its launcher, with the reason.
    let l = node.ctl(&["launcher", "install", "--path", c_path, "--force"]);
    assert_eq!(l["version"], "9.3.0");
    let v = node.wait_until("the machine-type reason", || {
        let v = node.vm("web");
        (v["outdated"] == true).then_some(v)
    });
    assert_eq!(
        v["reason"], "target launcher 9.3.0 does not offer machine type q35-1.0",
        "{v}"
    );
    assert_eq!(
        condition(&node.ctl(&["status"]), "Upgradeable")["status"],
        "False"
    );

    // A machine-type change of a running VM is pending until its next restart.
    let spec = |mt: &str| {
        node.file(
            "web-update.yaml",
            &format!(
                "name: web\nkernel: {}\ncmdline: mib=4 every=50\nmemory: 32Mi\nrunStrategy: Always\nterminationGracePeriodSeconds: 5\nmachineType: {mt}\n",
                integration_tests::guests::pattern_path().display()
            ),
        )
    };
    let e = node
        .try_ctl(&["vm", "update", "-f", &spec("pc-9")])
        .expect_err("a machine type nobody offers is refused");
    assert!(e.contains("not offered by any installed launcher"), "{e}");
    let v = node.ctl(&["vm", "update", "-f", &spec("q35-2.0")]);
    assert_eq!(v["restartRequired"], true, "{v}");
    assert_eq!(v["pendingMachineType"], "q35-2.0");
    assert_eq!(v["pendingChanges"], serde_json::json!(["machineType"]));
    assert_eq!(v["machineType"], "q35-1.0", "not applied to the running VM");
    std::thread::sleep(Duration::from_secs(1));
    let v = node.vm("web");
    assert_eq!(v["phase"], "Running");
    assert_eq!(
        v["pid"], before["pid"],
        "the VM was not restarted by the edit"
    );
    assert_eq!(v["launcherVersion"], va.as_str());
    assert_eq!(boots(&node.console("web")), 1);

    // The next restart applies it, on the launcher that offers it.
    node.ctl(&["vm", "stop", "web"]);
    node.wait_vm("web", "Stopped", None);
    node.ctl(&["vm", "start", "web"]);
    let v = node.wait_vm("web", "Running", Some("9.3.0"));
    assert_eq!(v["machineType"], "q35-2.0");
    assert_eq!(v["restartRequired"], false);
    assert_eq!(v["outdated"], false);
    node.wait_until("the second boot", || {
        (boots(&node.console("web")) == 2).then_some(())
    });
}

#[test]
fn a_vm_outside_the_targets_protocol_window_is_evicted_not_migrated() {
    let node = Node::start("window", "{}\n");
    let va = node.install(&node.launcher_a())["version"]
        .as_str()
        .expect("version")
        .to_string();
    node.create(
        "web",
        "runStrategy: Always\nterminationGracePeriodSeconds: 5\n",
    );
    node.create(
        "keep",
        "evictionStrategy: LiveMigrate\nterminationGracePeriodSeconds: 5\n",
    );
    node.wait_vm("web", "Running", Some(&va));
    node.wait_vm("keep", "Running", Some(&va));
    // A target that accepts only a protocol newer than any this build speaks.
    let (min, max) = (
        migration::protocol::MIN_ACCEPTED_VERSION,
        migration::protocol::PROTOCOL_VERSION,
    );
    let beyond = (max + 1).to_string();
    let d = launcher_of_version_with(
        "9.4.0",
        &[
            ("LAUNCHER_MIGRATION_PROTOCOL_MIN", &beyond),
            ("LAUNCHER_MIGRATION_PROTOCOL_MAX", &beyond),
        ],
    );
    node.install(&d);
    let v = node.wait_until("the protocol reason", || {
        let v = node.vm("web");
        (v["outdated"] == true).then_some(v)
    });
    let reason = v["reason"].as_str().unwrap_or("").to_string();
    assert!(
        reason.contains(&format!(
            "launcher {va} speaks migration protocol {min}..{max}, outside the {beyond}..{beyond} window target launcher 9.4.0 accepts"
        )) && reason.ends_with("and Evict is not enabled"),
        "{reason}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(migrations(&node, "web").is_empty(), "no doomed migration");

    node.config("workloadUpdateStrategy: {workloadUpdateMethods: [LiveMigrate, Evict]}\n");
    node.wait_vm("web", "Running", Some("9.4.0"));
    node.wait_until("web booted again (evicted and restarted)", || {
        (boots(&node.console("web")) == 2).then_some(())
    });
    let k = node.vm("keep");
    assert_eq!(k["launcherVersion"], va.as_str());
    assert!(
        k["reason"]
            .as_str()
            .unwrap_or("")
            .contains("evictionStrategy LiveMigrate refuses eviction"),
        "{k}"
    );
    assert!(migrations(&node, "web").is_empty());
    assert!(migrations(&node, "keep").is_empty());
}

//! End to end: a VM with a data disk, run and live-updated by noded. The `blkjournal`
//! guest appends one flushed record per interval to its disk and prints `J<seq>`; after
//! the update the numbers continue with no gap or repeat, the guest did not boot again,
//! and the disk image verifies up to the last record printed.

use std::path::Path;

use integration_tests::guests;
use integration_tests::node::{processes_mentioning, Node};
use integration_tests::{journal_seqs, last_journal_seq};

fn assert_journal(console: &str, disk: &Path) {
    assert!(
        !console.contains("corrupt") && !console.contains("io error"),
        "console:\n{console}"
    );
    assert_eq!(
        console.matches("blkjournal: booted").count(),
        1,
        "the guest booted again:\n{console}"
    );
    let s = journal_seqs(console);
    for (i, n) in s.iter().enumerate() {
        assert_eq!(
            *n,
            1 + i as u32,
            "J markers have a gap or a repeat at index {i}; console:\n{console}"
        );
    }
    let image = std::fs::read(disk).expect("read disk image");
    let on_disk = guests::blkjournal_verify(&image)
        .unwrap_or_else(|k| panic!("the disk image is corrupt at sector {k}"));
    let last = s.last().copied().unwrap_or(0);
    assert!(
        on_disk == last || on_disk == last + 1,
        "disk holds {on_disk} records, the guest printed up to J{last}"
    );
}

#[test]
fn a_vm_with_a_local_disk_is_live_updated_and_its_journal_has_no_gap() {
    let node = Node::start("disk", "{}\n");
    let va = node.install(&node.launcher_a())["version"]
        .as_str()
        .expect("version")
        .to_string();
    // 16 MiB: 32768 records, far more than the test writes (a full journal makes the
    // guest exit, and runStrategy Always would boot it again).
    let disk = node.dir.join("journal.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create disk image");
    let spec = format!(
        "name: jrnl\nkernel: {}\ncmdline: interval_ms=20\nmemory: 32Mi\ndisks:\n- name: journal\n  path: {}\n  shared: false\n",
        guests::blkjournal_path().display(),
        disk.display()
    );
    let f = node.file("jrnl.yaml", &spec);
    let created = node.ctl(&["vm", "create", "-f", &f]);
    assert_eq!(
        created["spec"]["disks"][0]["path"],
        disk.display().to_string()
    );
    let v = node.wait_vm("jrnl", "Running", Some(&va));
    // A host-local disk does not block the update on this node; it is recorded as the
    // reason a cross-host move would be refused.
    assert_eq!(v["migratable"], true);
    assert_eq!(v["crossHostMigratable"], false);
    assert_eq!(v["crossHostReason"], "DisksNotLiveMigratable");
    let before = node.wait_until("journal records", || {
        let n = last_journal_seq(&node.console("jrnl"));
        (n >= 10).then_some(n)
    });

    node.install(&integration_tests::launcher_of_version("9.0.0"));
    node.wait_vm("jrnl", "Running", Some("9.0.0"));
    let recs = node.ctl(&["migrations", "jrnl"]);
    assert_eq!(recs[0]["outcome"], "Succeeded", "{recs}");
    node.wait_until("records written by the new launcher", || {
        (last_journal_seq(&node.console("jrnl")) > before + 20).then_some(())
    });
    // One launcher owns the disk.
    assert_eq!(
        processes_mentioning(&node.state().join("vms/jrnl/").display().to_string()).len(),
        1
    );
    node.ctl(&["vm", "stop", "jrnl"]);
    node.wait_vm("jrnl", "Stopped", None);
    let console = node.console("jrnl");
    if console.matches("blkjournal: booted").count() != 1 {
        panic!(
            "the guest booted again; migrations: {}\nnoded log:\n{}",
            node.ctl(&["migrations", "jrnl"]),
            node.log()
        );
    }
    assert_journal(&console, &disk);
}

#[test]
fn disk_specs_are_checked() {
    let node = Node::start("diskspec", "{}\n");
    node.install(&node.launcher_a());
    for (disks, want) in [
        ("[{name: d}]", "disks[0]: missing field `path`"),
        (
            "[{name: d, path: rel.img}]",
            "disks[0].path: \"rel.img\" must be an absolute path",
        ),
        (
            "[{name: d, path: /x, size: 1}]",
            "disks[0]: unknown field `size`",
        ),
    ] {
        let f = node.file(
            "bad.yaml",
            &format!(
                "name: bad\nkernel: {}\nmemory: 32Mi\ndisks: {disks}\n",
                guests::blkjournal_path().display()
            ),
        );
        let e = node
            .try_ctl(&["vm", "create", "-f", &f])
            .expect_err("bad disk refused");
        assert!(e.contains(want), "{disks}: {e}");
    }
}

/// The console text of each boot: split at every `blkjournal: booted` banner.
fn boots_of(console: &str) -> Vec<&str> {
    let mut starts: Vec<usize> = console
        .match_indices("blkjournal: booted")
        .map(|(i, _)| i)
        .collect();
    starts.push(console.len());
    starts.windows(2).map(|w| &console[w[0]..w[1]]).collect()
}

/// `(records, last seq)` of the guest's `found N records, last seq=S` line.
fn found(boot: &str) -> Option<(u32, u32)> {
    let line = boot
        .lines()
        .find_map(|l| l.strip_prefix("blkjournal: found "))?;
    let (n, s) = line.split_once(" records, last seq=")?;
    Some((n.trim().parse().ok()?, s.trim().parse().ok()?))
}

/// Checks that the `J<seq>` markers of one boot run from `first` with no gap or repeat;
/// returns the last one (or `first - 1` when there are none).
fn consecutive_from(boot: &str, first: u32) -> u32 {
    let s = journal_seqs(boot);
    for (i, n) in s.iter().enumerate() {
        assert_eq!(
            *n,
            first + i as u32,
            "J markers have a gap or a repeat at index {i} (expected from J{first}):\n{boot}"
        );
    }
    s.last().copied().unwrap_or(first - 1)
}

#[test]
fn a_non_migratable_journal_vm_is_evicted_restarted_and_its_journal_has_no_gap() {
    let node = Node::start(
        "diskevict",
        "workloadUpdateStrategy:\n  workloadUpdateMethods: [LiveMigrate, Evict]\n",
    );
    let va = node.install(&node.launcher_a())["version"]
        .as_str()
        .expect("version")
        .to_string();
    let disk = node.dir.join("journal.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create disk image");
    // The host device makes the VM non-migratable, so the update evicts it and
    // runStrategy Always starts it again on the new launcher.
    let spec = format!(
        "name: jrnl\nkernel: {}\ncmdline: interval_ms=20\nmemory: 32Mi\nrunStrategy: Always\n\
         terminationGracePeriodSeconds: 2\n\
         hostDevices: [{{name: gpu0, deviceName: example.com/gpu}}]\n\
         disks:\n- name: journal\n  path: {}\n  shared: false\n",
        guests::blkjournal_path().display(),
        disk.display()
    );
    let f = node.file("jrnl.yaml", &spec);
    node.ctl(&["vm", "create", "-f", &f]);
    let v = node.wait_vm("jrnl", "Running", Some(&va));
    assert_eq!(v["migratable"], false, "{v}");
    node.wait_until("journal records", || {
        (last_journal_seq(&node.console("jrnl")) >= 10).then_some(())
    });

    node.install(&integration_tests::launcher_of_version("9.0.0"));
    node.wait_vm("jrnl", "Running", Some("9.0.0"));
    // The restarted guest reads the journal back and appends after it.
    let resumed = node.wait_until("the restarted guest appending records", || {
        let console = node.console("jrnl");
        let boots = boots_of(&console);
        let (_, s) = found(boots.get(1)?)?;
        (last_journal_seq(boots[1]) > s + 20).then_some(s)
    });
    node.ctl(&["vm", "stop", "jrnl"]);
    node.wait_vm("jrnl", "Stopped", None);

    let console = node.console("jrnl");
    assert!(
        !console.contains("corrupt") && !console.contains("io error"),
        "console:\n{console}"
    );
    let boots = boots_of(&console);
    assert_eq!(
        boots.len(),
        2,
        "expected one boot per launcher; noded log:\n{}\nconsole:\n{console}",
        node.log()
    );
    assert_eq!(found(boots[0]), Some((0, 0)), "{console}");
    let before = consecutive_from(boots[0], 1);
    assert!(before >= 10, "{console}");
    // Every record flushed (printed) before the eviction is on the disk; at most one more
    // (written and flushed, killed before its marker was printed) may follow.
    let (n, s) = found(boots[1]).expect("found line of the second boot");
    assert_eq!(n, s, "{console}");
    assert!(
        s == before || s == before + 1,
        "the restarted guest found last seq={s}, the first boot printed up to J{before}"
    );
    assert_eq!(s, resumed);
    let last = consecutive_from(boots[1], s + 1);
    let image = std::fs::read(&disk).expect("read disk image");
    let on_disk = guests::blkjournal_verify(&image)
        .unwrap_or_else(|k| panic!("the disk image is corrupt at sector {k}"));
    assert!(
        on_disk == last || on_disk == last + 1,
        "disk holds {on_disk} records, the guest printed up to J{last}"
    );
    let recs = node.ctl(&["migrations", "jrnl"]);
    assert!(
        recs.as_array()
            .is_none_or(|r| r.iter().all(|m| m["outcome"] != "Succeeded")),
        "a non-migratable VM was migrated: {recs}"
    );
}

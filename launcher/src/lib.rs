//! The launcher crate: the `launcher` process, one VM per process. It links neither
//! tokio nor SQLite; the node daemon (`noded`, `nodectl`) lives in the `node` crate, and
//! the two share only the typed contracts of the `contracts` crate.

pub mod api_cli;
pub mod cli;
pub mod launch;
pub mod migrate_cli;
pub mod migrate_glue;
pub mod watchdog;

fn knob_list(v: &'static str) -> impl Iterator<Item = &'static str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// The machine types this build advertises and runs: the VMM's own, minus those removed
/// with `LAUNCHER_WITHOUT_MACHINE_TYPES`, plus the aliases of `LAUNCHER_EXTRA_MACHINE_TYPES`
/// (build-time test/packaging knobs, see build.rs).
pub fn machine_types() -> Vec<String> {
    let without: Vec<&str> = knob_list(env!("LAUNCHER_WITHOUT_MACHINE_TYPES")).collect();
    let mut out: Vec<String> = vmm::config::MACHINE_TYPES
        .iter()
        .filter(|m| !without.contains(m))
        .map(|m| m.to_string())
        .collect();
    for extra in knob_list(env!("LAUNCHER_EXTRA_MACHINE_TYPES")) {
        if !out.iter().any(|m| m == extra) {
            out.push(extra.to_string());
        }
    }
    out
}

/// Resolves `--machine-type` for this build: a name removed by the build is refused, an
/// extra name runs the first built-in platform (it is an alias of it).
pub fn resolve_machine_type(name: &str) -> Result<&'static str, String> {
    let offered = machine_types();
    let base = vmm::config::MACHINE_TYPES
        .first()
        .copied()
        .unwrap_or("q35-1.0");
    if knob_list(env!("LAUNCHER_EXTRA_MACHINE_TYPES")).any(|m| m == name) {
        return Ok(base);
    }
    let resolved = vmm::config::resolve_machine_type(name).map_err(|e| e.to_string())?;
    if offered.iter().any(|m| m == resolved) {
        Ok(resolved)
    } else {
        Err(format!(
            "unknown machine type {name:?}; this launcher supports {}",
            offered.join(", ")
        ))
    }
}

/// The migration-protocol window this build declares (`LAUNCHER_MIGRATION_PROTOCOL_MIN`
/// and `_MAX` override it for tests and packaging).
pub fn migration_protocol_window() -> (u32, u32) {
    let knob = |v: &str, default: u32| v.parse().unwrap_or(default);
    (
        knob(
            env!("LAUNCHER_MIGRATION_PROTOCOL_MIN"),
            migration::protocol::MIN_ACCEPTED_VERSION,
        ),
        knob(
            env!("LAUNCHER_MIGRATION_PROTOCOL_MAX"),
            migration::protocol::PROTOCOL_VERSION,
        ),
    )
}

/// The machine types this build runs, by the names the VMM stores in a VM's
/// configuration: the advertised ones, with an alias replaced by the platform it runs.
/// The incoming receiver and the snapshot loader accept exactly these.
pub fn runnable_machine_types() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in machine_types() {
        if let Ok(r) = resolve_machine_type(&m) {
            if !out.iter().any(|o| o == r) {
                out.push(r.to_string());
            }
        }
    }
    out
}

/// Refuses a VM (from a snapshot) whose machine type this build does not run.
pub fn check_machine_type(name: &str) -> Result<(), String> {
    if runnable_machine_types().iter().any(|m| m == name) {
        Ok(())
    } else {
        Err(format!(
            "the VM's machine type {name:?} is not one this launcher runs ({})",
            machine_types().join(", ")
        ))
    }
}

/// What this launcher supports, for `launcher capabilities` and for noded's
/// install-time checks: built from the same values that [`receive_options`] and the
/// snapshot loader (`vmm::snapshot`, [`check_machine_type`]) enforce.
pub fn capabilities() -> contracts::launcher::Capabilities {
    let (min, max) = migration_protocol_window();
    contracts::launcher::Capabilities {
        version: launch::VERSION.to_string(),
        machine_types: machine_types(),
        migration_protocol: contracts::launcher::Range {
            min: min.into(),
            max: max.into(),
        },
        snapshot_format: contracts::launcher::Range {
            min: vmm::snapshot::MIN_FORMAT_VERSION.into(),
            max: vmm::snapshot::FORMAT_VERSION.into(),
        },
    }
}

/// The receiver's options for an incoming migration: this side's `--net` TAPs, and the
/// protocol window and machine types this build advertises.
pub fn receive_options(
    nets: Vec<(vmm::config::NetConfig, bool)>,
) -> migration::receiver::ReceiveOptions {
    let (min, max) = migration_protocol_window();
    migration::receiver::ReceiveOptions {
        nets,
        versions: Some(migration::protocol::VersionRange { min, max }),
        machine_types: Some(runnable_machine_types()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_advertised_is_what_is_enforced() {
        let caps = capabilities();
        let opts = receive_options(Vec::new());
        let enforced = migration::receiver::capabilities_with(true, &opts);
        let v = enforced.accepted_versions;
        assert_eq!(
            (u64::from(v.min), u64::from(v.max)),
            (caps.migration_protocol.min, caps.migration_protocol.max)
        );
        for m in &enforced.machine_types {
            assert!(
                caps.machine_types.contains(m),
                "{m} enforced, not advertised"
            );
        }
        for m in &caps.machine_types {
            let runs = resolve_machine_type(m).unwrap();
            assert!(
                enforced.machine_types.iter().any(|e| e == runs),
                "{m} advertised, refused"
            );
            assert!(check_machine_type(runs).is_ok());
        }
        assert!(check_machine_type("pc-i440fx-9.0").is_err());
        assert_eq!(
            caps.snapshot_format.max,
            u64::from(vmm::snapshot::FORMAT_VERSION)
        );
        // The receiver refuses a version outside the declared window.
        let narrow = migration::receiver::ReceiveOptions {
            versions: Some(migration::protocol::VersionRange {
                min: v.max + 1,
                max: v.max + 1,
            }),
            ..receive_options(Vec::new())
        };
        let n = migration::receiver::capabilities_with(true, &narrow).accepted_versions;
        assert!(migration::protocol::negotiate_version(
            migration::protocol::VersionRange::ours(),
            n
        )
        .is_err());
    }
}

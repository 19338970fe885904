//! The launcher crate: the `launcher` process, one VM per process. It links neither
//! tokio nor SQLite; the node daemon (`noded`, `nodectl`) lives in the `node` crate, and
//! the two share only the typed contracts of the `contracts` crate.

pub mod launch;
pub mod migrate_cli;
pub mod migrate_glue;

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

/// What this launcher supports, for `launcher capabilities` and for noded's
/// install-time checks.
pub fn capabilities() -> serde_json::Value {
    let (min, max) = migration_protocol_window();
    serde_json::json!({
        "version": launch::VERSION,
        "machineTypes": machine_types(),
        "migrationProtocol": {
            "min": min,
            "max": max,
        },
        "snapshotFormat": {
            "min": vmm::snapshot::MIN_FORMAT_VERSION,
            "max": vmm::snapshot::FORMAT_VERSION,
        },
    })
}

//! The launcher crate: the `launcher` process (one VM), `noded` (node daemon and
//! update coordinator) and `nodectl` (its CLI).

pub mod http;
pub mod launch;
pub mod migrate_cli;
pub mod migrate_glue;
pub mod node;

/// What this launcher supports, for `launcher capabilities` and for noded's
/// install-time checks.
pub fn capabilities() -> serde_json::Value {
    serde_json::json!({
        "version": launch::VERSION,
        "machineTypes": vmm::config::MACHINE_TYPES,
        "migrationProtocol": {
            "min": migration::protocol::MIN_ACCEPTED_VERSION,
            "max": migration::protocol::PROTOCOL_VERSION,
        },
        "snapshotFormat": {
            "min": vmm::snapshot::MIN_FORMAT_VERSION,
            "max": vmm::snapshot::FORMAT_VERSION,
        },
    })
}

//! The JSON documents noded's API returns and nodectl prints, with the field names that
//! issue 4 fixes (`name`, `phase`, `launcherVersion`, ... for a VM; `targetLauncherVersion`,
//! `approvalPending`, `outdatedVirtualMachineInstanceWorkloads`, `conditions` for the
//! node; `startedAt`, `finishedAt`, `outcome`, ... for a migration record).

use serde::{Deserialize, Serialize};

use super::coordinator::Millis;
use super::spec::VmSpec;
use super::store::MigrationRecord;

/// One VM as shown by `vm list` / `vm get`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmView {
    /// Name.
    pub name: String,
    /// Stopped, Starting, CrashLoopBackOff, Running, Migrating, Evicting, Stopping.
    pub phase: String,
    /// Version of the launcher running it.
    pub launcher_version: Option<String>,
    /// Runs a launcher older than the newest installed.
    pub outdated: bool,
    /// Live-migratable.
    pub migratable: bool,
    /// Why it is not updated yet, or what happens to it (when outdated or restarting).
    pub reason: Option<String>,
    /// Versioned machine type, fixed at creation.
    pub machine_type: String,
    /// runStrategy.
    pub run_strategy: String,
    /// The console log (continues across launchers).
    pub serial_log: String,
    /// Why it is (not) migratable, as a reason code or note.
    pub migratable_reason: Option<String>,
    /// Why it stopped, or the last error.
    pub message: Option<String>,
    /// The launcher's pid.
    pub pid: Option<u32>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// A spec change waits for the VM's next restart (KubeVirt's `RestartRequired`).
    pub restart_required: bool,
    /// The fields of that change (`machineType`, `memory`, ...).
    #[serde(default)]
    pub pending_changes: Vec<String>,
    /// The machine type the VM gets at its next restart, when it changes.
    pub pending_machine_type: Option<String>,
    /// Whether a move to another host would be possible (informational: noded updates
    /// in place, where local disks are reachable).
    pub cross_host_migratable: bool,
    /// Why not, as KubeVirt names it (`DisksNotLiveMigratable`, ...).
    pub cross_host_reason: Option<String>,
    /// KubeVirt-style conditions with their last transition time (in `vm get` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<VmCondition>,
    /// The stored spec (in `vm get` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<VmSpec>,
    /// The spec waiting for the next restart (in `vm get` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_spec: Option<VmSpec>,
}

/// A status condition, as on KubeVirt's operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// Available, Progressing, Degraded, Upgradeable.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True" or "False".
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// Human message.
    pub message: String,
}

impl Condition {
    /// Builds a condition.
    pub fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Condition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// A VM condition (`Ready`, `LiveMigratable`, `UpToDate`, `RestartRequired`), as
/// `nodectl vm describe` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmCondition {
    /// The condition.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True" or "False".
    pub status: String,
    /// RFC 3339: when the status last changed (as far as the VM's events tell).
    pub last_transition_time: String,
    /// CamelCase reason.
    pub reason: String,
    /// Human message.
    pub message: String,
}

/// The node as shown by `nodectl status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Newest installed launcher version.
    pub target_launcher_version: Option<String>,
    /// The target waits for `nodectl update approve`.
    pub approval_pending: bool,
    /// The version VMs are currently moved to (differs from the target while approval is pending).
    pub approved_launcher_version: Option<String>,
    /// Number of outdated VMs.
    pub outdated_virtual_machine_instance_workloads: usize,
    /// Available, Progressing, Degraded, Upgradeable.
    pub conditions: Vec<Condition>,
    /// Number of VMs.
    pub virtual_machines: usize,
    /// The approval strategy in force.
    pub approval_strategy: String,
    /// The workload update methods in force.
    pub workload_update_methods: Vec<String>,
    /// The release channel the node follows.
    pub channel: String,
    /// Set when VMs run launchers of a channel the node no longer follows (a switch from
    /// candidate back to stable): an update path nobody tested.
    pub untested_update_path: Option<String>,
}

/// A migration record as shown by `nodectl migrations NAME`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationView {
    /// RFC 3339 start.
    pub started_at: String,
    /// RFC 3339 end.
    pub finished_at: Option<String>,
    /// Running, Succeeded, Failed, Cancelled.
    pub outcome: String,
    /// From.
    pub source_version: String,
    /// To.
    pub target_version: String,
    /// The launcher's migration report (or `{"error": ...}`).
    pub report: serde_json::Value,
}

impl From<&MigrationRecord> for MigrationView {
    fn from(r: &MigrationRecord) -> Self {
        MigrationView {
            started_at: rfc3339(r.started_at),
            finished_at: r.finished_at.map(rfc3339),
            outcome: r.outcome.clone(),
            source_version: r.source_version.clone(),
            target_version: r.target_version.clone(),
            report: r.report.clone(),
        }
    }
}

/// An installed launcher as shown by `nodectl launcher list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LauncherView {
    /// Version.
    pub version: String,
    /// Path of the installed copy.
    pub path: String,
    /// RFC 3339.
    pub installed_at: String,
    /// Machine types offered.
    pub machine_types: Vec<String>,
    /// `stable` or `candidate`.
    pub channel: String,
    /// Whether this is the newest installed version on the node's channel.
    pub target: bool,
    /// Whether VMs are moved to it (approved).
    pub approved: bool,
    /// Full capabilities.
    pub capabilities: serde_json::Value,
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Formats Unix milliseconds as RFC 3339 UTC (`2026-01-02T03:04:05.678Z`).
pub fn rfc3339(ms: Millis) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => format!("{t:.3}"),
        Err(_) => format!("(out-of-range time {ms} ms)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_000_000_000), "2026-11-18T11:06:40.000Z");
    }

    #[test]
    fn field_names_are_the_documented_ones() {
        let c = serde_json::to_value(Condition::new("Available", true, "R", "m")).unwrap();
        assert_eq!(c["type"], "Available");
        assert_eq!(c["status"], "True");
        let n = NodeStatus {
            target_launcher_version: None,
            approval_pending: false,
            approved_launcher_version: None,
            outdated_virtual_machine_instance_workloads: 0,
            conditions: vec![],
            virtual_machines: 0,
            approval_strategy: "Automatic".into(),
            workload_update_methods: vec![],
            channel: "stable".into(),
            untested_update_path: None,
        };
        let j = serde_json::to_value(n).unwrap();
        for k in [
            "targetLauncherVersion",
            "approvalPending",
            "outdatedVirtualMachineInstanceWorkloads",
            "conditions",
        ] {
            assert!(j.get(k).is_some(), "{k}");
        }
    }
}

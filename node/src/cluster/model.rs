//! The cluster objects kept in etcd, and their keys.
//!
//! Every key lives under [`PREFIX`], whose `v1` is the schema version: a noded that
//! finds objects it cannot decode refuses to act on them (it logs the key) rather than
//! guessing. Field names follow KubeVirt's where one exists (`nodeName`, `runStrategy`,
//! `evictionStrategy`, `liveMigrationConfig`, `workloadUpdateStrategy`,
//! `parallelMigrationsPerCluster` ...).
//!
//! | key | object | written by | lease |
//! |---|---|---|---|
//! | `nodes/NAME` | [`NodeObject`] | that node | the node's |
//! | `nodeconfig/NAME` | [`NodeConfig`] (cordon, drain) | nodectl via any noded | none |
//! | `vms/NAME` | [`ClusterVm`] (spec, `nodeName`) | nodectl (spec), leader (placement, orders), nodes (facts) | none |
//! | `vmstatus/NAME` | [`VmStatusReport`] | the node running it | the node's |
//! | `migrations/VM/ID` | [`MigrationRecord`] | leader (creates), source and target nodes (phases) | none |
//! | `updates/VM` | [`UpdateGrant`] | leader | none |
//! | `config` | [`ClusterConfig`] | nodectl via any noded | none |
//! | `nodefailures/NAME` | [`NodeFailureRecord`] (a node seen gone) | leader | none |
//! | `controller` | [`ControllerStatus`] | leader | none |
//! | `election/…` | etcd election keys | etcd's election API | each candidate's |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::settings::WorkloadUpdateMethod;
use crate::spec::VmSpec;

/// Root of every key; `v1` is the schema version of the objects below it.
pub const PREFIX: &str = "/lvm/v1/";

/// Now, in ms since the epoch (the clock of every timestamp in etcd).
pub fn now() -> u64 {
    crate::views::now_ms().max(0) as u64
}

/// The key of an object kind and name.
pub fn key(kind: &str, name: &str) -> String {
    format!("{PREFIX}{kind}/{name}")
}

/// The prefix of every object of a kind.
pub fn kind_prefix(kind: &str) -> String {
    format!("{PREFIX}{kind}/")
}

/// The election's name (etcd's election API keeps its candidates under it).
pub fn election_name() -> String {
    format!("{PREFIX}election")
}

/// The one cluster configuration.
pub fn config_key() -> String {
    format!("{PREFIX}config")
}

/// The leader's published status.
pub fn controller_key() -> String {
    format!("{PREFIX}controller")
}

/// A migration record's key.
pub fn migration_key(vm: &str, id: &str) -> String {
    format!("{PREFIX}migrations/{vm}/{id}")
}

/// One installed launcher, as a node publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeLauncher {
    /// Version.
    pub version: String,
    /// `stable` or `candidate`.
    pub channel: String,
    /// Machine types it runs.
    pub machine_types: Vec<String>,
    /// Migration protocol window `[min, max]`.
    pub migration_protocol: [u64; 2],
}

/// A node, kept alive under its lease: gone from etcd when the node stops renewing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeObject {
    /// Node name.
    pub name: String,
    /// The node daemon runs and reaches etcd (the object exists only while it does).
    pub ready: bool,
    /// `host:port` base where incoming migrations listen.
    pub migration_address: String,
    /// Memory for VMs, bytes.
    pub memory_total: u64,
    /// vCPUs for VMs.
    pub vcpus_total: u32,
    /// Memory of the VMs this node runs, bytes.
    pub memory_allocated: u64,
    /// vCPUs of the VMs this node runs.
    pub vcpus_allocated: u32,
    /// Installed launchers.
    pub launchers: Vec<NodeLauncher>,
    /// The channel this node follows.
    pub channel: String,
    /// noded's version.
    pub noded_version: String,
}

/// What an operator set on a node: persistent, not under a lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    /// Cordoned: no new VM is placed here.
    #[serde(default)]
    pub unschedulable: bool,
    /// A drain is asked for (implies `unschedulable`), with the time it was asked (ms).
    #[serde(default)]
    pub drain_requested_at: Option<u64>,
}

/// Why a VM was stopped by the cluster, kept on the VM until it runs again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvictOrder {
    /// The node it is stopped on.
    pub node: String,
    /// Why (shown to the user).
    pub reason: String,
}

/// A VM's desired state in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterVm {
    /// The validated spec.
    pub spec: VmSpec,
    /// The node the VM is assigned to (it runs there, or will); `None` while unplaced.
    #[serde(default)]
    pub node_name: Option<String>,
    /// A VM with host-local disks can only run on the node that holds them.
    #[serde(default)]
    pub host_affinity: Option<String>,
    /// Set by the leader: stop the VM on `node` (eviction). The node clears `nodeName`
    /// once the VM is stopped; placement then restarts it as runStrategy says.
    #[serde(default)]
    pub evict: Option<EvictOrder>,
    /// Why the VM is not running, when the cluster stopped it (evicted and left stopped).
    #[serde(default)]
    pub message: Option<String>,
    /// `nodectl vm delete`: the owning node stops and removes it, then the key goes.
    #[serde(default)]
    pub deletion_requested: bool,
    /// Creation time (ms since the epoch).
    pub created_at: u64,
}

/// The spec as `nodectl vm create` takes it (the input grammar: no derived fields), so
/// that a node creating or receiving the VM validates it again.
pub fn spec_input(spec: &VmSpec) -> serde_json::Value {
    let mut v = serde_json::to_value(spec).unwrap_or(serde_json::Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("memoryBytes");
    }
    v
}

/// A node's report of one VM it runs, kept alive under the node's lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmStatusReport {
    /// The reporting node.
    pub node: String,
    /// Phase as noded shows it (`Running`, `Migrating`, `Stopped`, ...).
    pub phase: String,
    /// The launcher version running it.
    #[serde(default)]
    pub launcher_version: Option<String>,
    /// The node's message for it.
    #[serde(default)]
    pub message: Option<String>,
    /// Whether the node's coordinator finds it outdated.
    #[serde(default)]
    pub outdated: bool,
}

/// Why a migration exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationReason {
    /// A node drain: to another node.
    Drain,
    /// A workload update on the same node (local handover).
    Update,
}

/// Where a migration stands. Cross-node: `Scheduled` (leader) → `TargetReady` (target
/// node listens) → `Running` (source migrates) → `Succeeded` | `Failed`. Same-node
/// updates are recorded by their node when they end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationPhase {
    /// Ordered by the leader.
    Scheduled,
    /// The target node's incoming launcher listens on `listen`.
    TargetReady,
    /// The source launcher migrates.
    Running,
    /// The VM runs on the target.
    Succeeded,
    /// The VM still runs on the source (or was never moved).
    Failed,
}

impl MigrationPhase {
    /// Still in progress (counts against the parallel limits).
    pub fn active(self) -> bool {
        matches!(self, Self::Scheduled | Self::TargetReady | Self::Running)
    }
}

/// One migration attempt; the 5 most recent per VM are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationRecord {
    /// Unique, sortable by creation (`<ms>-<seq>`).
    pub id: String,
    /// VM name.
    pub vm: String,
    /// Why.
    pub reason: MigrationReason,
    /// Source node.
    pub source: String,
    /// Target node (the same node for updates).
    pub target: String,
    /// Phase.
    pub phase: MigrationPhase,
    /// `tcp:IP:PORT` the target listens on (from `TargetReady`).
    #[serde(default)]
    pub listen: Option<String>,
    /// Launcher versions, when known.
    #[serde(default)]
    pub from_version: Option<String>,
    /// Target launcher version, when known.
    #[serde(default)]
    pub to_version: Option<String>,
    /// Creation (ms since the epoch).
    pub created_at: u64,
    /// End (ms since the epoch).
    #[serde(default)]
    pub finished_at: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// The `launcher migrate` report, as the source's noded recorded it.
    #[serde(default)]
    pub report: Option<serde_json::Value>,
    /// Set when the source lost the handover's answer after `Go`: which launcher runs
    /// the VM is then for the target to say (docs/cluster.md, "Handover outcome
    /// unknown"). Absent in every other record, so older readers see no new field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
}

#[cfg(test)]
impl MigrationRecord {
    /// A drain migration of `vm` from `source` to `target` in `phase`, id `1-0`, created
    /// at 1 ms, with every optional field empty: the unit tests' starting point.
    pub(crate) fn for_test(vm: &str, source: &str, target: &str, phase: MigrationPhase) -> Self {
        MigrationRecord {
            id: "1-0".into(),
            vm: vm.into(),
            reason: MigrationReason::Drain,
            source: source.into(),
            target: target.into(),
            phase,
            listen: None,
            from_version: None,
            to_version: None,
            created_at: 1,
            finished_at: None,
            error: None,
            report: None,
            handover: None,
        }
    }
}

/// The resolution of a handover whose outcome the source does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handover {
    /// The source's launcher is paused and does not know whether the target runs the
    /// VM; the target decides.
    Unknown,
    /// The target runs the VM (the record is `Succeeded` and the VM assigned to it).
    TargetRuns,
    /// The target's launcher ended without running the VM: the source resumes it.
    TargetDoesNotRun,
}

/// The leader's permission for one same-node workload update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateGrant {
    /// The VM's node.
    pub node: String,
    /// The launcher version to move to.
    pub version: String,
    /// Wave number (0 = the canary).
    pub wave: u32,
    /// When granted (ms since the epoch).
    pub granted_at: u64,
}

/// `workloadUpdateStrategy` at cluster level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterUpdateStrategy {
    /// `LiveMigrate`, `Evict`; empty disables workload updates.
    pub workload_update_methods: Vec<WorkloadUpdateMethod>,
    /// Failed update migrations after which the wave pauses itself.
    pub max_failures: u32,
    /// VMs per wave after the canary.
    pub batch_size: u32,
}

impl Default for ClusterUpdateStrategy {
    fn default() -> Self {
        ClusterUpdateStrategy {
            workload_update_methods: vec![WorkloadUpdateMethod::LiveMigrate],
            max_failures: 3,
            batch_size: 5,
        }
    }
}

/// `liveMigrationConfig` at cluster level (KubeVirt's names and defaults). Nodes copy
/// the bandwidth and timeouts into their own settings, so that one value governs every
/// migration in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterLiveMigrationConfig {
    /// Migrations in flight in the whole cluster (drains and updates together).
    pub parallel_migrations_per_cluster: u32,
    /// Migrations in flight out of one node.
    pub parallel_outbound_migrations_per_node: u32,
    /// Bytes per second; 0 = unlimited.
    pub bandwidth_per_migration: u64,
    /// Seconds per GiB of guest memory before a migration is aborted.
    #[serde(rename = "completionTimeoutPerGiB")]
    pub completion_timeout_per_gib: u64,
    /// Seconds without progress before a migration is aborted.
    pub progress_timeout: u64,
}

impl Default for ClusterLiveMigrationConfig {
    fn default() -> Self {
        ClusterLiveMigrationConfig {
            parallel_migrations_per_cluster: 5,
            parallel_outbound_migrations_per_node: 2,
            bandwidth_per_migration: 0,
            completion_timeout_per_gib: 150,
            progress_timeout: 150,
        }
    }
}

/// How long a dead node's VMs wait before they run elsewhere (issue 12; recorded here
/// so the configuration has one home).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeFailure {
    /// Seconds after a node's lease expired.
    pub grace_period: u64,
}

impl Default for NodeFailure {
    fn default() -> Self {
        NodeFailure { grace_period: 10 }
    }
}

/// A node the leader found gone (its lease expired) while VMs were assigned to it. Its
/// VMs run elsewhere once `since + nodeFailure.gracePeriod` has passed: by then the
/// node has fenced itself (docs/cluster.md, "Node failure").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeFailureRecord {
    /// When the leader first saw the node gone (ms since the epoch).
    pub since: u64,
}

/// The one cluster configuration (`nodectl cluster config set`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterConfig {
    /// Workload updates.
    #[serde(default)]
    pub workload_update_strategy: ClusterUpdateStrategy,
    /// Migration limits; `parallelMigrationsPerCluster` and
    /// `parallelOutboundMigrationsPerNode` are the cluster-wide ones.
    #[serde(default)]
    pub live_migration_config: ClusterLiveMigrationConfig,
    /// Node failure handling.
    #[serde(default)]
    pub node_failure: NodeFailure,
}

impl ClusterConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        let g = self.node_failure.grace_period;
        let min = MIN_GRACE_PERIOD_S;
        if !(min..=3600).contains(&g) {
            return Err(format!(
                "nodeFailure.gracePeriod {g}: use {min} to 3600 seconds (a frozen node's launchers need up to their {}s watchdog to fence themselves, docs/cluster.md)",
                crate::fencing::WATCHDOG_TIMEOUT_MS / 1000
            ));
        }
        Ok(())
    }
}

/// The shortest `nodeFailure.gracePeriod`: the timing argument of docs/cluster.md needs
/// the launcher watchdog (5 s) to fire before `lease expiry + grace`, and a node feeds
/// it until at most `TTL − 3 s` after its last renewal: 5 − 3 = 2 s, rounded up with
/// room for a slow host.
pub const MIN_GRACE_PERIOD_S: u64 = 5;

/// A blocked VM and why, as the leader reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Blocked {
    /// VM name.
    pub vm: String,
    /// Why it cannot leave its node.
    pub reason: String,
}

/// What the leader publishes after each round (`nodectl status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerStatus {
    /// Leader node.
    pub leader: String,
    /// The cluster's target launcher version.
    #[serde(default)]
    pub target_version: Option<String>,
    /// VMs on an older launcher than the target (KubeVirt's
    /// `outdatedVirtualMachineInstanceWorkloads`).
    pub outdated: u32,
    /// Update wave in progress (0 = canary).
    #[serde(default)]
    pub wave: Option<u32>,
    /// The update paused itself, and why.
    #[serde(default)]
    pub update_paused: Option<String>,
    /// Per draining node, the VMs that block it.
    #[serde(default)]
    pub drain_blocked: BTreeMap<String, Vec<Blocked>>,
    /// VMs that cannot be placed, and why.
    #[serde(default)]
    pub unschedulable: Vec<Blocked>,
}

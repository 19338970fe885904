//! The leader's decisions, as one pure function: [`plan`] takes what etcd holds and
//! returns what to write. Nothing here does I/O, so the unit tests drive every rule
//! (placement, drains, eviction strategies, parallel limits, update waves).
//!
//! Rules, in the order they apply each round:
//! 1. **Placement.** A VM without a node goes to a ready, schedulable node that has a
//!    launcher (on the node's channel) offering its machine type and the free memory
//!    and vCPUs it needs; among those, the one with the most free memory. A VM with
//!    host-local disks only ever goes back to the node holding them. A VM the cluster
//!    stopped (eviction) is placed again only when its runStrategy restarts it
//!    (`Always`, `RerunOnFailure`; see docs/update-flow.md for why RerunOnFailure).
//! 2. **Drains.** Each VM of a draining node leaves as its evictionStrategy says:
//!    `LiveMigrate` migrates or blocks the drain with the reason; `LiveMigrateIfPossible`
//!    migrates, else is evicted; `None` is evicted. Host-local disks cannot leave:
//!    they block (`LiveMigrate*`) or stop and wait for the node's uncordon (`None`).
//! 3. **Workload updates.** VMs on an older launcher than their node's newest are
//!    updated in place (local handover) under a grant: first one canary, then waves of
//!    `batchSize`, each wave only after the previous one ended; the rollout pauses
//!    itself once `maxFailures` update migrations to the target version failed.
//!
//! 4. **Node failure.** A node that is gone (its lease expired) while VMs are assigned
//!    to it is recorded as failed; once `nodeFailure.gracePeriod` has passed since, it
//!    has fenced itself (docs/cluster.md), and its VMs are unassigned: `Always` and
//!    `RerunOnFailure` ones are placed elsewhere, `Manual` and `Halted` ones stay
//!    stopped with the reason. A VM in a migration whose other node is alive waits for
//!    that node to say where it runs; host-local disks keep a VM waiting for its node.
//!
//! Drain migrations and update grants both count against
//! `parallelMigrationsPerCluster` and `parallelOutboundMigrationsPerNode`.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::model::{
    Blocked, ClusterConfig, ClusterVm, ControllerStatus, Handover, MigrationPhase, MigrationReason,
    MigrationRecord, NodeConfig, NodeFailureRecord, NodeObject, UpdateGrant, VmStatusReport,
};
use crate::launchers::compare_versions;
use crate::spec::{EvictionStrategy, RunStrategy};

/// Base of the retry backoff after a failed drain migration (KubeVirt: 20 s, doubling).
pub const RETRY_BASE_MS: u64 = 20_000;
/// Cap of that backoff.
pub const RETRY_MAX_MS: u64 = 300_000;

/// Everything the leader reads before deciding.
#[derive(Debug, Default, Clone)]
pub struct View {
    /// Now, ms since the epoch.
    pub now: u64,
    /// Live nodes (their lease holds).
    pub nodes: BTreeMap<String, NodeObject>,
    /// Operator settings per node.
    pub node_configs: BTreeMap<String, NodeConfig>,
    /// Desired state of every VM.
    pub vms: BTreeMap<String, ClusterVm>,
    /// What the nodes report about the VMs they run.
    pub statuses: BTreeMap<String, VmStatusReport>,
    /// Kept migration records, every VM.
    pub migrations: Vec<MigrationRecord>,
    /// Update grants in force.
    pub grants: BTreeMap<String, UpdateGrant>,
    /// The cluster configuration.
    pub config: ClusterConfig,
    /// What the leader published last round (wave number).
    pub previous: ControllerStatus,
    /// Nodes recorded as failed, and since when.
    pub failures: BTreeMap<String, NodeFailureRecord>,
}

/// One write the leader makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Assign an unplaced VM to a node.
    Place {
        /// VM.
        vm: String,
        /// Node.
        node: String,
    },
    /// Move a VM of a draining node to another node by live migration.
    Migrate {
        /// VM.
        vm: String,
        /// Source node.
        source: String,
        /// Target node.
        target: String,
    },
    /// Stop a VM on its node; placement restarts it as its runStrategy says.
    Evict {
        /// VM.
        vm: String,
        /// Its node.
        node: String,
        /// Why (shown to the user).
        reason: String,
        /// Keep it to this node (host-local disks).
        affinity: Option<String>,
    },
    /// Allow a same-node workload update.
    Grant {
        /// VM.
        vm: String,
        /// The grant.
        grant: UpdateGrant,
    },
    /// Withdraw a grant (done, failed, or no longer needed).
    Revoke {
        /// VM.
        vm: String,
    },
    /// Record that a node holding VMs is gone (its lease expired).
    NodeLost {
        /// Node.
        node: String,
    },
    /// A failed node is back (a new lease): forget the failure.
    NodeBack {
        /// Node.
        node: String,
    },
    /// Unassign a VM of a failed, fenced node; placement restarts it elsewhere as its
    /// runStrategy says. Written only while the node is still absent.
    Reschedule {
        /// VM.
        vm: String,
        /// The failed node.
        node: String,
        /// Why (shown to the user).
        reason: String,
    },
    /// Fail a migration that never started moving data because its source or target
    /// node is gone (`Scheduled`), whose both nodes failed (any phase: both are
    /// fenced), or whose handover outcome is unknown with the target fenced. Otherwise,
    /// from `TargetReady` on, the live node decides.
    Abandon {
        /// VM.
        vm: String,
        /// Record id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// The leader's decisions for one round, and the status it publishes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Writes, in order.
    pub decisions: Vec<Decision>,
    /// For `nodectl status` (the leader fills in its name).
    pub status: ControllerStatus,
}

/// Memory and vCPUs in use or reserved on each node, by the cluster's own accounting
/// (VMs assigned, incoming migrations), which is ahead of what nodes report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Usage {
    memory: u64,
    vcpus: u32,
}

struct Planner<'a> {
    v: &'a View,
    usage: BTreeMap<String, Usage>,
    /// Migrations and grants in flight: cluster-wide and per source node.
    in_flight: u32,
    outbound: BTreeMap<String, u32>,
    out: Plan,
}

/// The whole round. Pure.
pub fn plan(v: &View) -> Plan {
    let mut p = Planner::new(v);
    p.abandon();
    p.node_failures();
    p.place();
    p.drain();
    p.update();
    p.out
}

impl<'a> Planner<'a> {
    fn new(v: &'a View) -> Planner<'a> {
        let mut usage: BTreeMap<String, Usage> = BTreeMap::new();
        for vm in v.vms.values() {
            if let Some(n) = &vm.node_name {
                add(&mut usage, n, vm);
            }
        }
        let mut in_flight = 0;
        let mut outbound: BTreeMap<String, u32> = BTreeMap::new();
        for m in v.migrations.iter().filter(|m| m.phase.active()) {
            in_flight += 1;
            *outbound.entry(m.source.clone()).or_default() += 1;
            if let Some(vm) = v.vms.get(&m.vm) {
                if m.target != m.source {
                    add(&mut usage, &m.target, vm);
                }
            }
        }
        for g in v.grants.values() {
            in_flight += 1;
            *outbound.entry(g.node.clone()).or_default() += 1;
        }
        Planner {
            v,
            usage,
            in_flight,
            outbound,
            out: Plan::default(),
        }
    }

    fn limits(&self) -> (u32, u32) {
        let c = &self.v.config.live_migration_config;
        (
            c.parallel_migrations_per_cluster.max(1),
            c.parallel_outbound_migrations_per_node.max(1),
        )
    }

    fn may_start(&self, source: &str) -> bool {
        let (cluster, node) = self.limits();
        self.in_flight < cluster && self.outbound.get(source).copied().unwrap_or(0) < node
    }

    fn started(&mut self, source: &str) {
        self.in_flight += 1;
        *self.outbound.entry(source.to_string()).or_default() += 1;
    }

    fn schedulable(&self, node: &str) -> bool {
        self.v.nodes.get(node).is_some_and(|n| n.ready)
            && !self
                .v
                .node_configs
                .get(node)
                .is_some_and(|c| c.unschedulable || c.drain_requested_at.is_some())
    }

    /// Why `vm` cannot go to `node`, or `None` if it fits.
    fn misfit(&self, node: &str, vm: &ClusterVm) -> Option<String> {
        let Some(n) = self.v.nodes.get(node) else {
            return Some(format!("node {node} is not ready"));
        };
        if !self.schedulable(node) {
            return Some(format!("node {node} is cordoned"));
        }
        let mt = &vm.spec.machine_type;
        let offers = n
            .launchers
            .iter()
            .filter(|l| channel_follows(&n.channel, &l.channel))
            .any(|l| l.machine_types.iter().any(|m| m == mt));
        if !offers {
            return Some(format!("no launcher on {node} offers machine type {mt}"));
        }
        let u = self.usage.get(node).copied().unwrap_or_default();
        if u.memory + vm.spec.memory_bytes > n.memory_total {
            return Some(format!("not enough memory on {node}"));
        }
        if u.vcpus + vm.spec.vcpus > n.vcpus_total {
            return Some(format!("not enough vCPUs on {node}"));
        }
        None
    }

    /// The best node for `vm` other than `except`, or why there is none.
    fn choose(&self, vm: &ClusterVm, except: Option<&str>) -> Result<String, String> {
        if let Some(a) = &vm.host_affinity {
            if except == Some(a.as_str()) {
                return Err("its host-local disks are on this node".into());
            }
            return match self.misfit(a, vm) {
                None => Ok(a.clone()),
                Some(why) => Err(format!("waits for node {a}, which holds its disks: {why}")),
            };
        }
        let mut best: Option<(u64, &str)> = None;
        let mut why = Vec::new();
        for (name, n) in &self.v.nodes {
            if Some(name.as_str()) == except {
                continue;
            }
            if let Some(w) = self.misfit(name, vm) {
                why.push(w);
                continue;
            }
            let free = n.memory_total - self.usage.get(name).map_or(0, |u| u.memory);
            if best.is_none_or(|(f, _)| free > f) {
                best = Some((free, name));
            }
        }
        match best {
            Some((_, n)) => Ok(n.to_string()),
            None if why.is_empty() => Err("no ready node".into()),
            None => Err(format!("no node fits: {}", why.join("; "))),
        }
    }

    /// A node gone for longer than the grace period after the leader saw it gone: it
    /// has fenced itself by now (docs/cluster.md, the timing argument).
    fn fenced(&self, node: &str) -> bool {
        let grace = self.v.config.node_failure.grace_period.saturating_mul(1000);
        !self.v.nodes.contains_key(node)
            && self
                .v
                .failures
                .get(node)
                .is_some_and(|f| self.v.now >= f.since.saturating_add(grace))
    }

    fn abandon(&mut self) {
        for m in &self.v.migrations {
            let why = if m.phase == MigrationPhase::Scheduled {
                [&m.source, &m.target]
                    .into_iter()
                    .find(|n| !self.v.nodes.contains_key(n.as_str()))
                    .map(|n| format!("node {n} is not ready before it started"))
            } else if m.phase.active() && self.fenced(&m.source) && self.fenced(&m.target) {
                Some(format!(
                    "nodes {} and {} both failed and are fenced",
                    m.source, m.target
                ))
            } else if m.phase.active()
                && m.handover == Some(Handover::Unknown)
                && self.fenced(&m.target)
            {
                // Only the target could say whether it ran the VM, and it is gone: the
                // source drops its paused copy and restarts the VM as runStrategy says.
                Some(format!(
                    "the handover's outcome is unknown and node {} failed (fenced)",
                    m.target
                ))
            } else {
                None
            };
            if let Some(reason) = why {
                self.out.decisions.push(Decision::Abandon {
                    vm: m.vm.clone(),
                    id: m.id.clone(),
                    reason,
                });
                self.in_flight = self.in_flight.saturating_sub(1);
                if let Some(o) = self.outbound.get_mut(&m.source) {
                    *o = o.saturating_sub(1);
                }
                if let Some(vm) = self.v.vms.get(&m.vm) {
                    if let Some(u) = self.usage.get_mut(&m.target) {
                        u.memory = u.memory.saturating_sub(vm.spec.memory_bytes);
                        u.vcpus = u.vcpus.saturating_sub(vm.spec.vcpus);
                    }
                }
            }
        }
    }

    /// Records nodes that are gone with VMs assigned, forgets those back, and unassigns
    /// the VMs of nodes fenced by now.
    fn node_failures(&mut self) {
        let mut referenced: BTreeMap<&str, ()> = BTreeMap::new();
        for vm in self.v.vms.values() {
            if let Some(n) = &vm.node_name {
                referenced.insert(n, ());
            }
        }
        for m in self.v.migrations.iter().filter(|m| m.phase.active()) {
            referenced.insert(&m.source, ());
            referenced.insert(&m.target, ());
        }
        for node in referenced.keys() {
            if !self.v.nodes.contains_key(*node) && !self.v.failures.contains_key(*node) {
                self.out.decisions.push(Decision::NodeLost {
                    node: node.to_string(),
                });
            }
        }
        for node in self.v.failures.keys() {
            if self.v.nodes.contains_key(node) {
                self.out
                    .decisions
                    .push(Decision::NodeBack { node: node.clone() });
            }
        }
        let grace = self.v.config.node_failure.grace_period;
        for (name, vm) in &self.v.vms {
            let Some(node) = vm.node_name.as_deref() else {
                continue;
            };
            if !self.fenced(node) || self.migrating(name) {
                continue;
            }
            if vm.host_affinity.as_deref() == Some(node) {
                self.out.status.unschedulable.push(Blocked {
                    vm: name.clone(),
                    reason: format!("waits for node {node}, which failed and holds its disks"),
                });
                continue;
            }
            let reason = match vm.spec.run_strategy {
                RunStrategy::Always | RunStrategy::RerunOnFailure => format!(
                    "node {node} failed (lease expired, fenced after {grace}s): restarted elsewhere"
                ),
                s => format!(
                    "node {node} failed (lease expired, fenced after {grace}s): stopped, not restarted (runStrategy {s:?})"
                ),
            };
            if let Some(u) = self.usage.get_mut(node) {
                u.memory = u.memory.saturating_sub(vm.spec.memory_bytes);
                u.vcpus = u.vcpus.saturating_sub(vm.spec.vcpus);
            }
            self.out.decisions.push(Decision::Reschedule {
                vm: name.clone(),
                node: node.to_string(),
                reason,
            });
        }
    }

    fn place(&mut self) {
        let vms: Vec<(&String, &ClusterVm)> = self
            .v
            .vms
            .iter()
            .filter(|(_, vm)| vm.node_name.is_none() && wants_to_run(vm))
            .collect();
        for (name, vm) in vms {
            match self.choose(vm, None) {
                Ok(node) => {
                    add(&mut self.usage, &node, vm);
                    self.out.decisions.push(Decision::Place {
                        vm: name.clone(),
                        node,
                    });
                }
                Err(reason) => self.out.status.unschedulable.push(Blocked {
                    vm: name.clone(),
                    reason,
                }),
            }
        }
    }

    /// Consecutive failed drain migrations of `vm` and when the last one ended.
    fn failures(&self, vm: &str) -> (u32, u64) {
        let mut recs: Vec<&MigrationRecord> = self
            .v
            .migrations
            .iter()
            .filter(|m| m.vm == vm && m.reason == MigrationReason::Drain)
            .collect();
        recs.sort_by(|a, b| a.id.cmp(&b.id));
        let mut n = 0;
        let mut last = 0;
        for m in recs.iter().rev() {
            if m.phase != MigrationPhase::Failed {
                break;
            }
            n += 1;
            last = last.max(m.finished_at.unwrap_or(m.created_at));
        }
        (n, last)
    }

    fn migrating(&self, vm: &str) -> bool {
        let abandoned = |id: &str| {
            self.out
                .decisions
                .iter()
                .any(|d| matches!(d, Decision::Abandon { id: x, .. } if x == id))
        };
        self.v
            .migrations
            .iter()
            .any(|m| m.vm == vm && m.phase.active() && !abandoned(&m.id))
    }

    fn drain(&mut self) {
        let draining: Vec<String> = self
            .v
            .node_configs
            .iter()
            .filter(|(_, c)| c.drain_requested_at.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for node in draining {
            if !self.v.nodes.contains_key(&node) {
                continue; // gone: its VMs wait for the node-failure rules
            }
            let vms: Vec<(String, ClusterVm)> = self
                .v
                .vms
                .iter()
                .filter(|(_, vm)| vm.node_name.as_deref() == Some(node.as_str()))
                .filter(|(_, vm)| vm.evict.is_none())
                .map(|(n, vm)| (n.clone(), vm.clone()))
                .collect();
            let mut blocked = Vec::new();
            for (name, vm) in vms {
                if self.migrating(&name) {
                    continue;
                }
                if let Some(reason) = self.drain_one(&node, &name, &vm) {
                    blocked.push(Blocked { vm: name, reason });
                }
            }
            if !blocked.is_empty() {
                self.out.status.drain_blocked.insert(node, blocked);
            }
        }
    }

    /// Decides for one VM of a draining node; `Some(reason)` when it blocks the drain.
    fn drain_one(&mut self, node: &str, name: &str, vm: &ClusterVm) -> Option<String> {
        let running = self
            .v
            .statuses
            .get(name)
            .is_some_and(|s| s.node == node && s.phase == "Running");
        let cross = vm.spec.migratability().cross_host_reason;
        let local_disks = cross.as_deref() == Some("DisksNotLiveMigratable");
        let strategy = vm.spec.eviction_strategy;
        let evict = |reason: String, affinity: Option<String>| Decision::Evict {
            vm: name.to_string(),
            node: node.to_string(),
            reason,
            affinity,
        };
        if !running {
            // Not running (stopped, or still starting): nothing to migrate; it leaves the
            // node and is placed again as its runStrategy says.
            let affinity = local_disks.then(|| node.to_string());
            self.out.decisions.push(evict(
                format!("node {node} is drained and the VM was not running"),
                affinity,
            ));
            return None;
        }
        let target = match &cross {
            Some(why) => Err(why.clone()),
            None => self.choose(vm, Some(node)),
        };
        match (strategy, target) {
            (EvictionStrategy::None, _) => {
                let affinity = local_disks.then(|| node.to_string());
                self.out.decisions.push(evict(
                    format!("evicted by the drain of node {node} (evictionStrategy None)"),
                    affinity,
                ));
                None
            }
            (_, Ok(target)) => {
                let (fails, last) = self.failures(name);
                if fails > 0 {
                    let wait = (RETRY_BASE_MS << (fails - 1).min(8)).min(RETRY_MAX_MS);
                    if self.v.now < last + wait {
                        return Some(format!(
                            "migration failed {fails} time(s); retrying in {}s",
                            (last + wait - self.v.now).div_ceil(1000)
                        ));
                    }
                }
                if !self.may_start(node) {
                    return None; // waits for a slot; not blocked
                }
                self.started(node);
                add(&mut self.usage, &target, vm);
                self.out.decisions.push(Decision::Migrate {
                    vm: name.to_string(),
                    source: node.to_string(),
                    target,
                });
                None
            }
            (EvictionStrategy::LiveMigrateIfPossible, Err(why)) if !local_disks => {
                self.out.decisions.push(evict(
                    format!("evicted by the drain of node {node}: cannot migrate ({why})"),
                    None,
                ));
                None
            }
            (_, Err(why)) => Some(format!(
                "evictionStrategy {strategy:?}: cannot migrate: {why}"
            )),
        }
    }

    fn update(&mut self) {
        let outdated = self.outdated_vms();
        self.out.status.outdated = outdated.len() as u32;
        let live = self.settle_grants(&outdated);
        let strategy = &self.v.config.workload_update_strategy;
        let wave = self.v.previous.wave;
        if strategy.workload_update_methods.is_empty() || outdated.is_empty() {
            self.out.status.wave = if outdated.is_empty() { None } else { wave };
            return;
        }
        let target = self.out.status.target_version.clone().unwrap_or_default();
        let failures = self
            .v
            .migrations
            .iter()
            .filter(|m| {
                m.reason == MigrationReason::Update
                    && m.phase == MigrationPhase::Failed
                    && m.to_version.as_deref() == Some(target.as_str())
            })
            .count() as u32;
        if failures >= strategy.max_failures.max(1) {
            self.out.status.wave = wave;
            self.out.status.update_paused = Some(format!(
                "{failures} update migration(s) to {target} failed (workloadUpdateStrategy.maxFailures is {}): the rollout is paused; fix the cause and raise maxFailures to resume",
                strategy.max_failures
            ));
            return;
        }
        if live > 0 {
            // The current wave is still running: the next waits for it.
            self.out.status.wave = wave;
            return;
        }
        self.out.status.wave = self.grant_wave(outdated, &target);
    }

    /// The VMs running an older launcher than their node's target (the node's newest
    /// launcher on its channel), as `(vm, node, target)`; also sets the rollout's
    /// target version in the status.
    fn outdated_vms(&mut self) -> Vec<(String, String, String)> {
        let targets: BTreeMap<&str, &str> = self
            .v
            .nodes
            .iter()
            .filter_map(|(name, n)| {
                n.launchers
                    .iter()
                    .filter(|l| channel_follows(&n.channel, &l.channel))
                    .map(|l| l.version.as_str())
                    .max_by(|a, b| compare_versions(a, b))
                    .map(|t| (name.as_str(), t))
            })
            .collect();
        self.out.status.target_version = targets
            .values()
            .max_by(|a, b| compare_versions(a, b))
            .map(|s| s.to_string());
        let mut outdated = Vec::new();
        for (name, s) in &self.v.statuses {
            let (Some(t), Some(have)) = (targets.get(s.node.as_str()), &s.launcher_version) else {
                continue;
            };
            let on_node = self
                .v
                .vms
                .get(name)
                .is_some_and(|vm| vm.node_name.as_deref() == Some(s.node.as_str()));
            if on_node && compare_versions(have, t) == Ordering::Less {
                outdated.push((name.clone(), s.node.clone(), t.to_string()));
            }
        }
        outdated
    }

    /// Revokes the grants that are done, moot or failed (a failed VM waits for a later
    /// wave) and returns how many are still running.
    fn settle_grants(&mut self, outdated: &[(String, String, String)]) -> usize {
        let mut live = 0;
        for (vm, g) in &self.v.grants {
            let still = outdated
                .iter()
                .any(|(n, node, t)| n == vm && *node == g.node && *t == g.version);
            let failed = self.v.migrations.iter().any(|m| {
                m.vm == *vm
                    && m.reason == MigrationReason::Update
                    && m.phase == MigrationPhase::Failed
                    && m.created_at >= g.granted_at
            });
            if !still || failed {
                self.out.decisions.push(Decision::Revoke { vm: vm.clone() });
                self.in_flight = self.in_flight.saturating_sub(1);
                if let Some(o) = self.outbound.get_mut(&g.node) {
                    *o = o.saturating_sub(1);
                }
            } else {
                live += 1;
            }
        }
        live
    }

    /// Grants the next wave within the parallel limits: a canary first (until one VM
    /// runs the rollout's version, nodes that have not installed it yet aside, only one
    /// at a time), then batches of `batchSize`. Returns the wave number now running.
    fn grant_wave(&mut self, outdated: Vec<(String, String, String)>, target: &str) -> Option<u32> {
        let mut wave = self.v.previous.wave;
        let any_updated = self
            .v
            .statuses
            .values()
            .any(|s| s.launcher_version.as_deref() == Some(target));
        let size = if any_updated {
            self.v.config.workload_update_strategy.batch_size.max(1)
        } else {
            1
        };
        let next = match wave {
            None => 0,
            Some(w) if any_updated => w + 1,
            Some(w) => w,
        };
        let mut granted = 0;
        for (vm, node, version) in outdated {
            if granted >= size {
                break;
            }
            let draining = self
                .v
                .node_configs
                .get(&node)
                .is_some_and(|c| c.drain_requested_at.is_some());
            if draining || self.migrating(&vm) || self.v.grants.contains_key(&vm) {
                continue;
            }
            if !self.may_start(&node) {
                continue;
            }
            self.started(&node);
            granted += 1;
            wave = Some(next);
            self.out.decisions.push(Decision::Grant {
                vm,
                grant: UpdateGrant {
                    node,
                    version,
                    wave: next,
                    granted_at: self.v.now,
                },
            });
        }
        wave
    }
}

fn add(usage: &mut BTreeMap<String, Usage>, node: &str, vm: &ClusterVm) {
    let u = usage.entry(node.to_string()).or_default();
    u.memory += vm.spec.memory_bytes;
    u.vcpus += vm.spec.vcpus;
}

/// Whether a VM without a node should be placed.
fn wants_to_run(vm: &ClusterVm) -> bool {
    match &vm.message {
        // Never placed yet: every VM is created on a node (Manual and Halted ones then
        // wait there, stopped, for `vm start`).
        None => true,
        // Stopped by the cluster (eviction): restarted as its runStrategy says.
        Some(_) => matches!(
            vm.spec.run_strategy,
            RunStrategy::Always | RunStrategy::RerunOnFailure
        ),
    }
}

/// Whether a node on `node_channel` follows launchers of `launcher_channel` (candidate
/// nodes take stable releases too).
fn channel_follows(node_channel: &str, launcher_channel: &str) -> bool {
    node_channel == launcher_channel
        || (node_channel == "candidate" && launcher_channel == "stable")
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "controller_failure_tests.rs"]
mod failure_tests;

//! This node's side of the cluster: the lease, the node object, the VM reports, and the
//! execution of what the leader assigned to this node.
//!
//! Each round reads this node's local state (from the reconciliation loop) and the
//! cluster's (from etcd), then converges the two one step. Facts this node learns are
//! written by it (its VMs' phases, a migration's outcome, an eviction done), each write
//! compared against the revision it read; decisions are the leader's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use serde_json::json;

use super::etcd::{EtcdError, Versioned, Write};
use super::local::{LocalCall, LocalSnapshot, LocalVm};
use super::model::{
    self, spec_input, ClusterConfig, ClusterVm, Handover, MigrationPhase, MigrationReason,
    MigrationRecord, NodeObject, UpdateGrant, VmStatusReport,
};
use super::{fence, Cluster};
use crate::handover::Resolution;
use crate::requests::Req;

/// How often a round runs without a wake-up.
const ROUND: Duration = Duration::from_millis(500);

/// Incoming migrations take ports from the migration address's port up to this many.
const PORT_RANGE: u16 = 64;

/// The agent's memory between rounds (what it already wrote, to write only changes).
#[derive(Default)]
struct Memory {
    node_object: Option<Vec<u8>>,
    statuses: BTreeMap<String, Vec<u8>>,
    config_revision: i64,
    published_updates: BTreeSet<String>,
    grants: Option<BTreeSet<String>>,
    /// Local update records that ended before this agent started are not published
    /// (they were, by the agent before, or are older than the cluster's memory).
    started: u64,
}

/// What the agent read from etcd this round.
struct Cluster2 {
    vms: BTreeMap<String, Versioned<ClusterVm>>,
    migrations: Vec<Versioned<MigrationRecord>>,
    grants: BTreeMap<String, UpdateGrant>,
    /// The whole read, for the revisions of keys this node writes back.
    snap: super::etcd::Snapshot,
    config: Option<Versioned<ClusterConfig>>,
    /// Live nodes (their lease holds).
    nodes: BTreeMap<String, NodeObject>,
    /// Nodes the leader recorded as failed.
    failures: BTreeMap<String, model::NodeFailureRecord>,
}

/// Runs forever: the lease keeper and the rounds.
pub async fn run(c: Cluster) {
    tokio::spawn(keep_lease(c.clone()));
    let mut mem = Memory {
        started: model::now(),
        ..Memory::default()
    };
    loop {
        if let Err(e) = round(&c, &mut mem).await {
            tracing::warn!(error = %e, "cluster round failed; running VMs are left as they are");
            c.update(|s| {
                s.connected = false;
                s.error = Some(e.to_string());
            });
            mem.node_object = None;
            mem.statuses.clear();
        }
        push_state(&c).await;
        tokio::select! {
            _ = c.wake.notified() => {}
            _ = tokio::time::sleep(ROUND) => {}
        }
    }
}

/// Tells the loop what the cluster looks like (for `nodectl status` and the metrics).
async fn push_state(c: &Cluster) {
    let st = serde_json::to_value(c.state()).unwrap_or_default();
    let _ = c.calls.send(LocalCall::ClusterStatus(st)).await;
}

/// Grants a lease and keeps it alive; grants a new one when it was lost (after an
/// outage longer than the TTL), after which the node object is written again.
async fn keep_lease(c: Cluster) {
    let ttl = c.opts.lease_ttl;
    let every = Duration::from_millis(ttl * 1000 / 3);
    let mut previous = c.state().lease;
    loop {
        // The lease of the previous run first: alive, it is resumed (the node never
        // left); expired, the cluster may have restarted this node's VMs elsewhere, so
        // whatever still runs here is fenced before a new lease is taken.
        if let Some(old) = previous {
            match resume(&c, old).await {
                Ok(true) => {
                    previous = None;
                    if let Err(()) = keep_alive(&c, old, every).await {
                        fence::fence(&c, "the node's lease expired in etcd").await;
                    }
                    continue;
                }
                Ok(false) => {
                    previous = None;
                    fence::fence(&c, "the node's lease expired in etcd while noded was away").await;
                }
                Err(()) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let id = match c.etcd.grant(ttl as i64).await {
            Ok(id) => id,
            Err(e) => {
                tracing::debug!(error = %e, "lease grant failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        c.update(|s| {
            s.lease = Some(id);
            s.renewed = Some(Instant::now());
        });
        save(&c);
        tracing::info!(lease = id, ttl, "node lease granted");
        if let Err(()) = keep_alive(&c, id, every).await {
            fence::fence(&c, "the node's lease expired in etcd").await;
        }
    }
}

/// Whether the lease of the previous run is still alive (then it is this node's again,
/// renewed as of what etcd says is left); `Err` when etcd does not answer.
async fn resume(c: &Cluster, id: i64) -> Result<bool, ()> {
    let r = tokio::time::timeout(
        super::etcd::CALL_TIMEOUT,
        c.etcd.client().lease_time_to_live(id, None),
    )
    .await;
    match r {
        Ok(Ok(r)) if r.ttl() > 0 => {
            let ttl = c.opts.lease_ttl as i64;
            let used = Duration::from_secs((ttl - r.ttl()).max(0) as u64 + 1);
            c.update(|s| {
                s.lease = Some(id);
                s.renewed = Instant::now().checked_sub(used);
            });
            tracing::info!(
                lease = id,
                left = r.ttl(),
                "node lease of the previous run resumed"
            );
            Ok(true)
        }
        Ok(Ok(_)) => Ok(false),
        Ok(Err(e)) if e.to_string().contains("not found") => Ok(false),
        _ => Err(()),
    }
}

/// Saves the lease id and the peers for the next run.
fn save(c: &Cluster) {
    if let Some(dir) = &c.opts.state_dir {
        let st = c.state();
        super::persisted::save(
            dir,
            &super::persisted::Saved {
                lease: st.lease,
                peers: st.peers,
            },
        );
    }
}

/// Renews lease `id` until etcd says it expired (`Err`).
async fn keep_alive(c: &Cluster, id: i64, every: Duration) -> Result<(), ()> {
    let ttl = c.opts.lease_ttl;
    // One renewal may take at most a renewal interval: a stalled stream (or member) is
    // replaced by the next member long before the peers would see the lease run low and
    // the node fence itself (fence.rs).
    let limit = every.min(super::etcd::CALL_TIMEOUT);
    {
        let mut client = c.etcd.client();
        let (mut keeper, mut stream) = loop {
            match tokio::time::timeout(limit, client.lease_keep_alive(id)).await {
                Ok(Ok(ks)) => break ks,
                _ => {
                    c.etcd.stream_failed();
                    client = c.etcd.client();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        };
        loop {
            let sent = Instant::now();
            let ok = tokio::time::timeout(limit, async {
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
            match ok {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                    c.update(|s| s.renewed = Some(sent));
                }
                Ok(Ok(Some(_))) => {
                    tracing::warn!(lease = id, "node lease expired; granting a new one");
                    return Err(());
                }
                other => {
                    tracing::debug!(lease = id, ok = other.is_ok(), "lease renewal failed");
                    c.etcd.stream_failed();
                    let valid = c.state().lease_valid(Duration::from_secs(ttl));
                    if !valid {
                        // It may have expired in etcd meanwhile: probe with a fresh stream.
                        if let Ok(Ok(r)) = tokio::time::timeout(
                            limit,
                            c.etcd.client().lease_time_to_live(id, None),
                        )
                        .await
                        {
                            if r.ttl() <= 0 {
                                return Err(());
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    match tokio::time::timeout(limit, c.etcd.client().lease_keep_alive(id)).await {
                        Ok(Ok((k, s))) => {
                            keeper = k;
                            stream = s;
                        }
                        _ => continue,
                    }
                    continue;
                }
            }
            tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
        }
    }
}

async fn read_cluster(c: &Cluster) -> Result<Cluster2, EtcdError> {
    let snap = c.etcd.snapshot().await?;
    let vms = snap.list::<ClusterVm>("vms")?;
    let migrations = snap.list::<MigrationRecord>("migrations")?;
    let grants = snap.list::<UpdateGrant>("updates")?;
    let config = snap.get::<ClusterConfig>(&model::config_key())?;
    let controller = snap
        .get::<model::ControllerStatus>(&model::controller_key())?
        .map(|v| v.value);
    let nodes: BTreeMap<String, NodeObject> = snap
        .list::<NodeObject>("nodes")?
        .into_iter()
        .map(|n| (n.name, n.value))
        .collect();
    let failures = snap
        .list::<model::NodeFailureRecord>("nodefailures")?
        .into_iter()
        .map(|f| (f.name, f.value))
        .collect();
    c.update(|s| {
        s.leader = controller.as_ref().map(|x| x.leader.clone());
        s.controller = controller;
    });
    Ok(Cluster2 {
        vms: vms.into_iter().map(|v| (v.name.clone(), v)).collect(),
        migrations,
        grants: grants.into_iter().map(|g| (g.name, g.value)).collect(),
        config,
        snap,
        nodes,
        failures,
    })
}

/// Keeps the peers' addresses (for the peer check of fence.rs) from the node list;
/// saved for the next run when they change.
fn update_peers(c: &Cluster, cl: &Cluster2) {
    let me = &c.opts.node_name;
    let mut peers: Vec<(String, SocketAddr)> = cl
        .nodes
        .iter()
        .filter(|(n, _)| *n != me)
        .filter_map(|(n, o)| Some((n.clone(), o.migration_address.parse().ok()?)))
        .collect();
    // A peer that is gone right now is still asked (it may answer later); one the
    // cluster forgot for good (no VM, no record) is dropped with it.
    for (n, a) in c.state().peers {
        if !peers.iter().any(|(x, _)| *x == n) && cl.failures.contains_key(&n) {
            peers.push((n, a));
        }
    }
    peers.sort();
    if peers != c.state().peers {
        tracing::info!(peers = ?peers, "peers for the fence check");
        c.update(|s| s.peers = peers);
        save(c);
    }
}

async fn round(c: &Cluster, mem: &mut Memory) -> Result<(), EtcdError> {
    let Some(local) = c.ask(LocalCall::Snapshot).await else {
        return Ok(());
    };
    let cl = read_cluster(c).await?;
    let lease = c.state().lease;
    c.update(|s| {
        s.connected = true;
        s.error = None;
    });
    let Some(lease) = lease else {
        return Ok(());
    };
    update_peers(c, &cl);
    if !c.state().lease_valid(Duration::from_secs(c.opts.lease_ttl)) {
        return Ok(()); // a round acts only under a lease surely alive
    }
    publish_node(c, mem, &local, &cl, lease).await?;
    publish_statuses(c, mem, &local, &cl, lease).await?;
    if local.fenced.is_some() || c.state().fenced.is_some() {
        return rejoin(c, &local, &cl).await;
    }
    follow_config(c, mem, &cl).await;
    follow_grants(c, mem, &cl).await;
    adopt_local(c, &local, &cl).await?;
    // Under a lease not yet reconciled (just joined or rejoined), the first round only
    // reports and stops what runs elsewhere; launchers start from the next round, once
    // the fence monitor fed the watchdog for this lease (fence.rs).
    remove_strays(c, &local, &cl).await;
    if c.state().reconciled_lease == Some(lease) {
        converge_vms(c, &local, &cl).await?;
        migrations(c, &local, &cl).await?;
        settle_unknown_handovers(c, &local, &cl).await;
    }
    publish_updates(c, mem, &local).await?;
    c.update(|s| s.reconciled_lease = Some(lease));
    Ok(())
}

/// After a fence, under a new lease: every fenced VM still assigned to this node is
/// handed back to the cluster (which restarts it as its runStrategy says, here or
/// elsewhere), every local copy is removed, and only then is the fence lifted. Nothing
/// this node ran is started again by it.
async fn rejoin(c: &Cluster, local: &LocalSnapshot, cl: &Cluster2) -> Result<(), EtcdError> {
    let me = &c.opts.node_name;
    let why = local
        .fenced
        .clone()
        .or_else(|| c.state().fenced)
        .unwrap_or_default();
    for l in &local.vms {
        let name = &l.spec.name;
        if l.phase != "Fenced" && !l.active {
            continue;
        }
        if l.active {
            // The fence killed it; its exit is on the way.
            tracing::warn!(vm = %name, "a launcher still runs after the fence; killing it again");
            c.ask(|tx| LocalCall::Fence(why.clone(), tx)).await;
            return Ok(());
        }
        if let Some(v) = cl.vms.get(name) {
            if v.value.node_name.as_deref() == Some(me.as_str()) && !migration_active_for(cl, name)
            {
                let mut next = v.value.clone();
                next.node_name = None;
                next.evict = None;
                next.message = Some(format!("stopped by the fence of node {me}: {why}"));
                let w = Write::put(model::key("vms", name), &next, v.revision)?;
                if !c.etcd.commit(vec![w], None).await? {
                    return Ok(()); // changed meanwhile: next round
                }
                tracing::info!(vm = %name, "fenced VM handed back to the cluster");
            }
        }
        c.request(Req::DeleteVm(name.clone())).await;
    }
    c.ask(LocalCall::Unfence).await;
    c.update(|s| s.fenced = None);
    tracing::info!("rejoined the cluster after a fence");
    Ok(())
}

async fn publish_node(
    c: &Cluster,
    mem: &mut Memory,
    local: &LocalSnapshot,
    cl: &Cluster2,
    lease: i64,
) -> Result<(), EtcdError> {
    let me = &c.opts.node_name;
    let (mut memory, mut vcpus) = (0, 0);
    for vm in local.vms.iter().filter(|v| v.active) {
        memory += vm.spec.memory_bytes;
        vcpus += vm.spec.vcpus;
    }
    let obj = NodeObject {
        name: me.clone(),
        ready: true,
        migration_address: c.opts.migration_address.to_string(),
        memory_total: c.opts.memory_total,
        vcpus_total: c.opts.vcpus_total,
        memory_allocated: memory,
        vcpus_allocated: vcpus,
        launchers: local.launchers.clone(),
        channel: local.channel.clone(),
        noded_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let bytes = serde_json::to_vec(&obj).unwrap_or_default();
    if mem.node_object.as_ref() == Some(&bytes) {
        return Ok(());
    }
    let key = model::key("nodes", me);
    let cur = cl.snap.get::<serde_json::Value>(&key)?;
    let w = Write::put(key, &obj, cur.map_or(0, |v| v.revision))?.with_lease(lease);
    if c.etcd.commit(vec![w], None).await? {
        mem.node_object = Some(bytes);
    }
    Ok(())
}

async fn publish_statuses(
    c: &Cluster,
    mem: &mut Memory,
    local: &LocalSnapshot,
    cl: &Cluster2,
    lease: i64,
) -> Result<(), EtcdError> {
    let me = &c.opts.node_name;
    let mut seen = BTreeSet::new();
    for vm in &local.vms {
        let name = &vm.spec.name;
        let mine = cl
            .vms
            .get(name)
            .is_some_and(|v| v.value.node_name.as_deref() == Some(me.as_str()));
        if !vm.active && !mine {
            continue;
        }
        seen.insert(name.clone());
        let report = VmStatusReport {
            node: me.clone(),
            phase: vm.phase.clone(),
            launcher_version: vm.launcher_version.clone(),
            message: vm.message.clone(),
            outdated: vm.outdated,
        };
        let bytes = serde_json::to_vec(&report).unwrap_or_default();
        if mem.statuses.get(name) == Some(&bytes) {
            continue;
        }
        let key = model::key("vmstatus", name);
        let cur = cl.snap.get::<VmStatusReport>(&key)?;
        if let Some(cur) = &cur {
            // Another node reports it too (it is arriving or leaving): the node it is
            // assigned to wins the key.
            if cur.value.node != *me && !mine {
                continue;
            }
        }
        let w = Write::put(key, &report, cur.map_or(0, |v| v.revision))?.with_lease(lease);
        if c.etcd.commit(vec![w], None).await? {
            mem.statuses.insert(name.clone(), bytes);
        }
    }
    let gone: Vec<String> = mem
        .statuses
        .keys()
        .filter(|n| !seen.contains(*n))
        .cloned()
        .collect();
    for name in gone {
        mem.statuses.remove(&name);
        let key = model::key("vmstatus", &name);
        if let Some(cur) = cl.snap.get::<VmStatusReport>(&key)? {
            if cur.value.node == *me {
                c.etcd
                    .commit(
                        vec![Write::Delete {
                            key,
                            expect: cur.revision,
                        }],
                        None,
                    )
                    .await?;
            }
        }
    }
    Ok(())
}

/// Copies the cluster's migration limits and update methods into this node's settings,
/// so that one configuration governs every node.
async fn follow_config(c: &Cluster, mem: &mut Memory, cl: &Cluster2) {
    let (cfg, rev) = match &cl.config {
        Some(v) => (v.value.clone(), v.revision),
        None => (ClusterConfig::default(), -1),
    };
    if rev == mem.config_revision {
        return;
    }
    let l = &cfg.live_migration_config;
    let patch = json!({
        "liveMigrationConfig": {
            "bandwidthPerMigration": l.bandwidth_per_migration,
            "completionTimeoutPerGiB": l.completion_timeout_per_gib,
            "progressTimeout": l.progress_timeout,
            "parallelMigrationsPerNode": l.parallel_outbound_migrations_per_node,
        },
        "workloadUpdateStrategy": {
            "workloadUpdateMethods": cfg.workload_update_strategy.workload_update_methods,
        },
    });
    let r = c.request(Req::SetConfig(patch, false)).await;
    if (200..300).contains(&r.status) {
        mem.config_revision = rev;
    } else {
        tracing::warn!(status = r.status, body = ?r.body, "cannot apply the cluster configuration to this node");
    }
}

async fn follow_grants(c: &Cluster, mem: &mut Memory, cl: &Cluster2) {
    let me = &c.opts.node_name;
    let set: BTreeSet<String> = cl
        .grants
        .iter()
        .filter(|(_, g)| g.node == *me)
        .map(|(n, _)| n.clone())
        .collect();
    if mem.grants.as_ref() != Some(&set) {
        mem.grants = Some(set.clone());
        let _ = c.calls.send(LocalCall::SetGrants(Some(set))).await;
    }
}

/// VMs this node ran before it joined the cluster (or created while etcd was away)
/// become cluster VMs assigned to this node, so that nothing local is ever orphaned.
async fn adopt_local(c: &Cluster, local: &LocalSnapshot, cl: &Cluster2) -> Result<(), EtcdError> {
    let me = &c.opts.node_name;
    for vm in local
        .vms
        .iter()
        .filter(|v| v.active && v.moved_to.is_none())
    {
        let name = &vm.spec.name;
        if cl.vms.contains_key(name) || migration_active_for(cl, name) {
            continue;
        }
        if vm.phase == "Receiving" {
            continue;
        }
        let cvm = ClusterVm {
            spec: vm.spec.clone(),
            node_name: Some(me.clone()),
            host_affinity: None,
            evict: None,
            message: None,
            deletion_requested: false,
            created_at: model::now(),
        };
        if c.etcd
            .commit(vec![Write::put(model::key("vms", name), &cvm, 0)?], None)
            .await?
        {
            tracing::info!(vm = %name, "local VM adopted into the cluster");
        }
    }
    Ok(())
}

fn migration_active_for(cl: &Cluster2, vm: &str) -> bool {
    cl.migrations
        .iter()
        .any(|m| m.value.vm == vm && m.value.phase.active())
}

/// Creates, evicts and deletes the VMs the cluster assigned to this node.
async fn converge_vms(c: &Cluster, local: &LocalSnapshot, cl: &Cluster2) -> Result<(), EtcdError> {
    let me = &c.opts.node_name;
    let by_name: BTreeMap<&str, &LocalVm> = local
        .vms
        .iter()
        .map(|v| (v.spec.name.as_str(), v))
        .collect();
    for (name, v) in &cl.vms {
        let cvm = &v.value;
        if cvm.node_name.as_deref() != Some(me.as_str()) {
            continue;
        }
        let l = by_name.get(name.as_str()).copied();
        if cvm.deletion_requested {
            match l {
                Some(_) => {
                    c.request(Req::DeleteVm(name.clone())).await;
                }
                None => {
                    let key = model::key("vms", name);
                    c.etcd
                        .commit(
                            vec![Write::Delete {
                                key,
                                expect: v.revision,
                            }],
                            None,
                        )
                        .await?;
                }
            }
            continue;
        }
        if let Some(order) = cvm.evict.as_ref().filter(|o| o.node == *me) {
            match l {
                Some(l) if l.active => {
                    if l.phase != "Stopping" && l.phase != "Evicting" {
                        tracing::info!(vm = %name, reason = %order.reason, "evicting for the cluster");
                        c.request(Req::StopVm(name.clone())).await;
                    }
                }
                _ => {
                    // Stopped here: hand it back to the cluster, which places it again as
                    // its runStrategy says.
                    let mut next = cvm.clone();
                    next.node_name = None;
                    next.evict = None;
                    next.message = Some(order.reason.clone());
                    let w = Write::put(model::key("vms", name), &next, v.revision)?;
                    if c.etcd.commit(vec![w], None).await? && l.is_some() {
                        c.request(Req::DeleteVm(name.clone())).await;
                    }
                }
            }
            continue;
        }
        if l.is_none() && !migration_active_for(cl, name) {
            let r = c.request(Req::CreateVm(spec_input(&cvm.spec), false)).await;
            if (200..300).contains(&r.status) {
                tracing::info!(vm = %name, "VM placed on this node; created");
                if cvm.message.is_some() {
                    let mut next = cvm.clone();
                    next.message = None;
                    let w = Write::put(model::key("vms", name), &next, v.revision)?;
                    c.etcd.commit(vec![w], None).await?;
                }
            } else {
                tracing::warn!(vm = %name, status = r.status, body = ?r.body, "cannot create the VM placed here");
            }
        }
    }
    Ok(())
}

/// Removes local VMs the cluster put elsewhere (or deleted): stops the running ones, so
/// that nothing runs twice, and deletes the stopped ones. Starts nothing.
async fn remove_strays(c: &Cluster, local: &LocalSnapshot, cl: &Cluster2) {
    let me = &c.opts.node_name;
    for l in &local.vms {
        let name = &l.spec.name;
        let assigned = cl.vms.get(name).and_then(|v| v.value.node_name.clone());
        if assigned.as_deref() == Some(me.as_str())
            || migration_active_for(cl, name)
            || l.handover_unknown
        {
            continue; // (a paused source after an unknown handover: see settle_unknown_handovers)
        }
        if !cl.vms.contains_key(name) && l.active {
            continue; // adopt_local records it
        }
        if !l.active || l.phase == "Receiving" {
            c.request(Req::DeleteVm(name.clone())).await;
        } else {
            // Runs here but the cluster says it runs elsewhere (or nowhere): stop it, so
            // that it never runs twice.
            tracing::warn!(vm = %name, assigned = ?assigned, "VM runs here but is assigned elsewhere; stopping it");
            c.request(Req::StopVm(name.clone())).await;
        }
    }
}

/// A free port for an incoming migration (the first port of the migration address
/// answers peer checks, fence.rs).
fn free_port(base: SocketAddr, taken: &BTreeSet<u16>) -> Option<u16> {
    (1..PORT_RANGE)
        .map(|i| base.port().saturating_add(i))
        .filter(|p| !taken.contains(p))
        .find(|p| TcpListener::bind(SocketAddr::new(base.ip(), *p)).is_ok())
}

async fn set_phase(
    c: &Cluster,
    rec: &Versioned<MigrationRecord>,
    f: impl FnOnce(&mut MigrationRecord),
    also: Vec<Write>,
) -> Result<bool, EtcdError> {
    let mut next = rec.value.clone();
    f(&mut next);
    let key = model::migration_key(&next.vm, &next.id);
    let mut writes = vec![Write::put(key, &next, rec.revision)?];
    writes.extend(also);
    c.etcd.commit(writes, None).await
}

/// Carries out cross-node migrations where this node is the target or the source.
async fn migrations(c: &Cluster, local: &LocalSnapshot, cl: &Cluster2) -> Result<(), EtcdError> {
    let me = &c.opts.node_name;
    let by_name: BTreeMap<&str, &LocalVm> = local
        .vms
        .iter()
        .map(|v| (v.spec.name.as_str(), v))
        .collect();
    let taken: BTreeSet<u16> = cl
        .migrations
        .iter()
        .filter(|m| m.value.phase.active() && m.value.target == *me)
        .filter_map(|m| m.value.listen.as_deref()?.rsplit(':').next()?.parse().ok())
        .collect();
    let tls = c.opts.tls_dir.display().to_string();
    for rec in cl.migrations.iter().filter(|m| m.value.phase.active()) {
        let m = &rec.value;
        if m.reason != MigrationReason::Drain {
            continue;
        }
        let l = by_name.get(m.vm.as_str()).copied();
        if m.target == *me
            && matches!(
                m.phase,
                MigrationPhase::TargetReady | MigrationPhase::Running
            )
            && !cl.nodes.contains_key(&m.source)
        {
            source_lost(c, cl, rec, l).await?;
            continue;
        }
        if m.target == *me
            && m.phase == MigrationPhase::Running
            && m.handover == Some(Handover::Unknown)
        {
            answer_unknown_handover(c, cl, rec, l).await?;
            continue;
        }
        if m.target == *me && m.phase == MigrationPhase::Scheduled {
            target_step(c, cl, rec, l, &taken, &tls).await?;
            continue;
        }
        if m.source != *me {
            continue;
        }
        let Some(l) = l else {
            set_phase(
                c,
                rec,
                |r| fail(r, "the VM is not on its source node"),
                vec![],
            )
            .await?;
            continue;
        };
        match m.phase {
            MigrationPhase::TargetReady => source_send(c, rec, l, &tls).await?,
            MigrationPhase::Running => source_finish(c, cl, rec, l).await?,
            _ => {}
        }
    }
    Ok(())
}

/// The source's side once the target listens: ask the local daemon to send the VM (once)
/// and mark the record `Running`.
async fn source_send(
    c: &Cluster,
    rec: &Versioned<MigrationRecord>,
    l: &LocalVm,
    tls: &str,
) -> Result<(), EtcdError> {
    let m = &rec.value;
    let listen = m.listen.clone().unwrap_or_default();
    if l.phase != "MigratingOut" && l.moved_to.is_none() {
        let body = json!({"to": listen, "tlsDir": tls});
        let r = c.request(Req::MigrateOut(m.vm.clone(), body)).await;
        if !(200..300).contains(&r.status) {
            let why = format!("the source refused: {:?}", r.body);
            set_phase(c, rec, |r| fail(r, &why), vec![]).await?;
            return Ok(());
        }
        tracing::info!(vm = %m.vm, to = %m.target, "migrating to another node for the cluster");
    }
    let from = l.launcher_version.clone();
    set_phase(
        c,
        rec,
        |r| {
            r.phase = MigrationPhase::Running;
            r.from_version = from;
        },
        vec![],
    )
    .await?;
    Ok(())
}

/// The source's side of a `Running` migration: once the VM moved to the record's
/// listener (and its report is filed), reassign the VM to the target and mark the
/// record `Succeeded` in one transaction; if the VM stopped migrating without moving,
/// mark it `Failed` with the daemon's message.
async fn source_finish(
    c: &Cluster,
    cl: &Cluster2,
    rec: &Versioned<MigrationRecord>,
    l: &LocalVm,
) -> Result<(), EtcdError> {
    let m = &rec.value;
    if l.handover_unknown {
        // Paused here, not knowing whether the target runs the VM: ask the target (once).
        if m.handover.is_none() {
            let why = l.message.clone();
            set_phase(
                c,
                rec,
                |r| {
                    r.handover = Some(Handover::Unknown);
                    r.error = why;
                },
                vec![],
            )
            .await?;
        }
        return Ok(());
    }
    let report = l.last_migration.as_ref().map(|x| x.report.clone());
    // The launcher's exit (64) can mark the VM moved a moment before the
    // migration job files its report: wait for the report (a little).
    let reported = l
        .last_migration
        .as_ref()
        .is_some_and(|x| x.finished_at.is_some() && x.report.is_object());
    let patience = model::now() < m.created_at + 30_000;
    if l.moved_to.is_some() && l.moved_to == m.listen && !reported && patience {
        return Ok(());
    }
    if l.moved_to.is_some() && l.moved_to == m.listen {
        let Some(vm) = cl.vms.get(&m.vm) else {
            return Ok(());
        };
        let mut moved = vm.value.clone();
        moved.node_name = Some(m.target.clone());
        let w = Write::put(model::key("vms", &m.vm), &moved, vm.revision)?;
        let now = model::now();
        if set_phase(
            c,
            rec,
            |r| {
                r.phase = MigrationPhase::Succeeded;
                r.finished_at = Some(now);
                r.report = report;
            },
            vec![w],
        )
        .await?
        {
            tracing::info!(vm = %m.vm, to = %m.target, "VM moved to another node");
        }
    } else if l.phase != "MigratingOut" {
        let why = l
            .message
            .clone()
            .unwrap_or_else(|| "the migration failed".into());
        set_phase(
            c,
            rec,
            |r| {
                fail(r, &why);
                r.report = report;
            },
            vec![],
        )
        .await?;
    }
    Ok(())
}

/// The target's side of a `Scheduled` migration: start the incoming launcher (the
/// record then carries its address), and once that launcher listens, say
/// `TargetReady` so that the source starts sending.
async fn target_step(
    c: &Cluster,
    cl: &Cluster2,
    rec: &Versioned<MigrationRecord>,
    l: Option<&LocalVm>,
    taken: &BTreeSet<u16>,
    tls: &str,
) -> Result<(), EtcdError> {
    let m = &rec.value;
    let timeout = u64::from(READY_TIMEOUT_S) * 1000;
    if let (Some(listen), Some(l)) = (&m.listen, l) {
        let listening = match &l.api_socket {
            Some(s) if l.active => crate::supervisor::status(std::path::Path::new(s))
                .await
                .is_some_and(|v| v.state == contracts::launcher::Phase::Incoming),
            _ => false,
        };
        if listening {
            tracing::info!(vm = %m.vm, from = %m.source, %listen, "incoming launcher ready");
            set_phase(c, rec, |r| r.phase = MigrationPhase::TargetReady, vec![]).await?;
        } else if !l.active || model::now() > m.created_at + timeout {
            set_phase(
                c,
                rec,
                |r| fail(r, "the incoming launcher on the target did not get ready"),
                vec![],
            )
            .await?;
        }
        return Ok(());
    }
    if let Some(l) = l {
        if !l.active {
            c.request(Req::DeleteVm(m.vm.clone())).await; // a stale record
        }
        return Ok(());
    }
    let Some(cvm) = cl.vms.get(&m.vm) else {
        return Ok(());
    };
    let Some(port) = free_port(c.opts.migration_address, taken) else {
        set_phase(
            c,
            rec,
            |r| fail(r, "no free port for an incoming migration"),
            vec![],
        )
        .await?;
        return Ok(());
    };
    let listen = format!("tcp:{}:{port}", c.opts.migration_address.ip());
    // The address first (write-ahead): a restarted agent finds the launcher it started.
    if !set_phase(c, rec, |r| r.listen = Some(listen.clone()), vec![]).await? {
        return Ok(());
    }
    let body = json!({"spec": spec_input(&cvm.value.spec), "listen": listen, "tlsDir": tls});
    let r = c.request(Req::Receive(body)).await;
    if (200..300).contains(&r.status) {
        tracing::info!(vm = %m.vm, from = %m.source, %listen, "receiving a VM for the cluster");
    } else {
        let why = format!("the target refused: {:?}", r.body);
        if let Some(now) = c
            .etcd
            .get::<MigrationRecord>(&model::migration_key(&m.vm, &m.id))
            .await?
        {
            set_phase(c, &now, |r| fail(r, &why), vec![]).await?;
        }
    }
    Ok(())
}

/// The target's side of a migration whose source node is gone: this node decides
/// where the VM runs. Running here (the source sent `Go` and this launcher started):
/// it stays, and the record says so. Not running here once the source is surely fenced
/// (the leader's failure record is older than the grace period): `Go` can never come,
/// so the incoming launcher is removed and the migration fails; the leader then
/// restarts the VM as its runStrategy says.
async fn source_lost(
    c: &Cluster,
    cl: &Cluster2,
    rec: &Versioned<MigrationRecord>,
    l: Option<&LocalVm>,
) -> Result<(), EtcdError> {
    let m = &rec.value;
    if runs_here(l).await {
        let why = format!(
            "source node {} failed after the handover; the VM runs on the target",
            m.source
        );
        if claim(c, cl, rec, why, None).await? {
            tracing::warn!(vm = %m.vm, from = %m.source, "source node failed after the handover: the VM stays here");
        }
        return Ok(());
    }
    let grace = cl
        .config
        .as_ref()
        .map_or(10, |c| c.value.node_failure.grace_period)
        .saturating_mul(1000);
    let fenced = cl
        .failures
        .get(&m.source)
        .is_some_and(|f| model::now() >= f.since.saturating_add(grace));
    if !fenced {
        return Ok(()); // the source may still send Go: wait
    }
    if l.is_some_and(|l| l.active) {
        tracing::warn!(vm = %m.vm, from = %m.source, "source node failed before the handover: removing the incoming launcher");
        c.request(Req::DeleteVm(m.vm.clone())).await;
        return Ok(());
    }
    let why = format!(
        "source node {} failed before the handover; the VM is restarted as its runStrategy says",
        m.source
    );
    set_phase(c, rec, |r| fail(r, &why), vec![]).await?;
    Ok(())
}

/// Whether this node's incoming launcher runs the VM (noded may not have noticed yet:
/// then its launcher is asked).
async fn runs_here(l: Option<&LocalVm>) -> bool {
    match l {
        Some(l) if l.active && l.phase == "Running" => true,
        Some(l) if l.active => match &l.api_socket {
            Some(s) => crate::supervisor::status(std::path::Path::new(s))
                .await
                .is_some_and(|v| v.state == contracts::launcher::Phase::Running),
            None => false,
        },
        _ => false,
    }
}

/// The target takes the VM: assigned to this node and the record `Succeeded`, in one
/// transaction against the revisions read. Whether it was written.
async fn claim(
    c: &Cluster,
    cl: &Cluster2,
    rec: &Versioned<MigrationRecord>,
    why: String,
    handover: Option<Handover>,
) -> Result<bool, EtcdError> {
    let m = &rec.value;
    let Some(vm) = cl.vms.get(&m.vm) else {
        return Ok(false);
    };
    let mut moved = vm.value.clone();
    moved.node_name = Some(c.opts.node_name.clone());
    let w = Write::put(model::key("vms", &m.vm), &moved, vm.revision)?;
    let now = model::now();
    set_phase(
        c,
        rec,
        |r| {
            r.phase = MigrationPhase::Succeeded;
            r.finished_at = Some(now);
            r.error = Some(why);
            if handover.is_some() {
                r.handover = handover;
            }
        },
        vec![w],
    )
    .await
}

/// The target's answer when the source lost the handover's: the VM runs here (claim
/// it), or this node's launcher ended without running it (the source resumes it).
/// While the incoming launcher lives and does not run the guest, the answer waits: it
/// either runs it (it got `Go`) or ends (its stall timeout).
async fn answer_unknown_handover(
    c: &Cluster,
    cl: &Cluster2,
    rec: &Versioned<MigrationRecord>,
    l: Option<&LocalVm>,
) -> Result<(), EtcdError> {
    let m = &rec.value;
    if runs_here(l).await {
        let why = format!(
            "the source ({}) lost the handover's answer; the VM runs on the target",
            m.source
        );
        if claim(c, cl, rec, why, Some(Handover::TargetRuns)).await? {
            tracing::warn!(vm = %m.vm, from = %m.source, "handover outcome unknown at the source: the VM runs here, claimed");
        }
        return Ok(());
    }
    if l.is_some_and(|l| l.active) {
        return Ok(());
    }
    let why = "the source lost the handover's answer; the target never ran the VM";
    if set_phase(
        c,
        rec,
        |r| {
            fail(r, why);
            r.handover = Some(Handover::TargetDoesNotRun);
        },
        vec![],
    )
    .await?
    {
        tracing::warn!(vm = %m.vm, from = %m.source, "handover outcome unknown at the source: the VM never ran here; the source resumes it");
    }
    Ok(())
}

/// The source's side of a VM it holds paused after an unknown handover outcome, once
/// no migration of it is active: the cluster's answer decides (see
/// [`crate::handover::Resolution`]).
async fn settle_unknown_handovers(c: &Cluster, local: &LocalSnapshot, cl: &Cluster2) {
    let me = &c.opts.node_name;
    for l in local.vms.iter().filter(|l| l.handover_unknown) {
        let name = &l.spec.name;
        if migration_active_for(cl, name) {
            continue; // the target has not answered yet
        }
        let assigned = cl.vms.get(name).and_then(|v| v.value.node_name.clone());
        let newest = cl
            .migrations
            .iter()
            .filter(|m| m.value.vm == *name && m.value.source == *me)
            .max_by_key(|m| m.value.created_at);
        let resolution = unknown_handover_resolution(
            assigned.as_deref() == Some(me.as_str()),
            newest.map(|m| &m.value),
        );
        c.ask(|tx| LocalCall::ResolveHandover(name.clone(), resolution, tx))
            .await;
    }
}

/// Pure: what a source paused by an unknown handover outcome does, given whether the
/// VM is still assigned to it and its newest migration record (not active any more).
pub(crate) fn unknown_handover_resolution(
    assigned_here: bool,
    newest: Option<&MigrationRecord>,
) -> Resolution {
    if !assigned_here {
        return Resolution::MovedAway;
    }
    match newest {
        Some(m)
            if m.phase == MigrationPhase::Failed
                && m.handover == Some(Handover::TargetDoesNotRun) =>
        {
            Resolution::Resume
        }
        Some(m) => Resolution::Crashed(format!(
            "the handover to {} had an unknown outcome and the target could not answer ({}); restarted as its runStrategy says",
            m.target,
            m.error.as_deref().unwrap_or("no answer")
        )),
        None => Resolution::Crashed(
            "the handover had an unknown outcome and no migration record is left to tell; restarted as its runStrategy says".into(),
        ),
    }
}

/// How long an incoming launcher may take to listen.
const READY_TIMEOUT_S: u32 = 60;

fn fail(r: &mut MigrationRecord, why: &str) {
    r.phase = MigrationPhase::Failed;
    r.error = Some(why.to_string());
    r.finished_at = Some(model::now());
}

/// Same-node update migrations become cluster records (the leader counts their
/// failures for `maxFailures`).
async fn publish_updates(
    c: &Cluster,
    mem: &mut Memory,
    local: &LocalSnapshot,
) -> Result<(), EtcdError> {
    let me = &c.opts.node_name;
    for u in &local.updates {
        let id = format!("{:013}-{me}-{}", u.started_at.max(0), u.id);
        if mem.published_updates.contains(&id)
            || u.finished_at.unwrap_or(0).max(0) as u64 <= mem.started
        {
            continue;
        }
        let rec = MigrationRecord {
            id: id.clone(),
            vm: u.vm.clone(),
            reason: MigrationReason::Update,
            source: me.clone(),
            target: me.clone(),
            phase: if u.outcome == "Succeeded" {
                MigrationPhase::Succeeded
            } else {
                MigrationPhase::Failed
            },
            listen: None,
            from_version: Some(u.source_version.clone()),
            to_version: Some(u.target_version.clone()),
            created_at: u.started_at.max(0) as u64,
            finished_at: u.finished_at.map(|t| t.max(0) as u64),
            error: u
                .report
                .get("error")
                .and_then(|e| e.as_str())
                .map(str::to_string),
            report: Some(u.report.clone()),
            handover: None,
        };
        let key = model::migration_key(&u.vm, &id);
        // Written once: an existing record (an earlier round, or before a restart) stays.
        c.etcd.commit(vec![Write::put(key, &rec, 0)?], None).await?;
        mem.published_updates.insert(id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(phase: MigrationPhase, handover: Option<Handover>) -> MigrationRecord {
        MigrationRecord {
            error: Some("why".into()),
            handover,
            ..MigrationRecord::for_test("x", "a", "b", phase)
        }
    }

    #[test]
    fn a_paused_source_resumes_only_when_the_target_says_it_never_ran_the_vm() {
        // The target claimed the VM: the paused copy goes.
        let claimed = record(MigrationPhase::Succeeded, Some(Handover::TargetRuns));
        assert_eq!(
            unknown_handover_resolution(false, Some(&claimed)),
            Resolution::MovedAway
        );
        // Assigned elsewhere by any means: never resumed here.
        let said_no = record(MigrationPhase::Failed, Some(Handover::TargetDoesNotRun));
        assert_eq!(
            unknown_handover_resolution(false, Some(&said_no)),
            Resolution::MovedAway
        );
        // The target's launcher ended without running it: resume, no reboot.
        assert_eq!(
            unknown_handover_resolution(true, Some(&said_no)),
            Resolution::Resume
        );
        // Abandoned (the target is fenced) or no record: it may have run there, so it
        // is not resumed from the old state; it restarts as runStrategy says.
        let abandoned = record(MigrationPhase::Failed, Some(Handover::Unknown));
        assert!(matches!(
            unknown_handover_resolution(true, Some(&abandoned)),
            Resolution::Crashed(why) if why.contains("could not answer")
        ));
        assert!(matches!(
            unknown_handover_resolution(true, None),
            Resolution::Crashed(_)
        ));
    }

    #[test]
    fn records_without_a_handover_field_read_and_write_as_before() {
        let r = record(MigrationPhase::Running, None);
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("handover"), "{json}");
        assert_eq!(serde_json::from_str::<MigrationRecord>(&json).unwrap(), r);
        let r = record(MigrationPhase::Running, Some(Handover::Unknown));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"handover\":\"Unknown\""), "{json}");
        assert_eq!(serde_json::from_str::<MigrationRecord>(&json).unwrap(), r);
    }
}

//! Leadership: campaign through etcd's election API on this node's lease; while leading,
//! run the controller round by round. Every write of the leader carries the guard (its
//! election key's create revision), so a deposed leader — its lease expired, or another
//! node elected — can write nothing, and it stops deciding as soon as its lease is not
//! surely alive.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::controller::{self, Decision, View};
use super::etcd::{EtcdError, LeaderGuard, Versioned, Write};
use super::model::{
    self, ClusterConfig, ClusterVm, ControllerStatus, EvictOrder, MigrationPhase, MigrationReason,
    MigrationRecord, NodeConfig, NodeFailureRecord, NodeObject, UpdateGrant, VmStatusReport,
};
use super::Cluster;

/// Migration records kept per VM (KubeVirt keeps the 5 most recent).
pub const RECORDS_KEPT: usize = 5;

/// A round without a wake-up.
const ROUND: Duration = Duration::from_millis(1000);

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Campaigns, leads, and campaigns again, forever.
pub async fn run(c: Cluster) {
    let ttl = Duration::from_secs(c.opts.lease_ttl);
    loop {
        let st = c.state();
        let Some(lease) = st.lease.filter(|_| st.lease_valid(ttl)) else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let Some(guard) = campaign(&c, lease, ttl).await else {
            continue;
        };
        tracing::info!(node = %c.opts.node_name, "leading the cluster");
        c.update(|s| {
            s.leading = true;
            s.leader = Some(c.opts.node_name.clone());
        });
        lead(&c, &guard, lease, ttl).await;
        c.update(|s| s.leading = false);
        tracing::warn!(node = %c.opts.node_name, "no longer leading the cluster");
    }
}

/// Blocks until elected (`Some(guard)`), or gives up when the lease changes or is not
/// surely alive any more (`None`).
async fn campaign(c: &Cluster, lease: i64, ttl: Duration) -> Option<LeaderGuard> {
    let mut client = c.etcd.client();
    let name = model::election_name();
    let me = c.opts.node_name.clone();
    let fut = client.campaign(name, me, lease);
    tokio::pin!(fut);
    loop {
        tokio::select! {
            r = &mut fut => {
                return match r {
                    Ok(resp) => resp.leader().map(|k| LeaderGuard {
                        key: k.key().to_vec(),
                        revision: k.rev(),
                    }),
                    Err(e) => {
                        tracing::debug!(error = %e, "campaign failed");
                        c.etcd.stream_failed();
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        None
                    }
                };
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                let st = c.state();
                if st.lease != Some(lease) || !st.lease_valid(ttl) {
                    return None;
                }
            }
        }
    }
}

async fn lead(c: &Cluster, guard: &LeaderGuard, lease: i64, ttl: Duration) {
    loop {
        let st = c.state();
        if st.lease != Some(lease) || !st.lease_valid(ttl) {
            return;
        }
        match round(c, guard).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => tracing::warn!(error = %e, "controller round failed"),
        }
        tokio::select! {
            _ = c.wake.notified() => {}
            _ = tokio::time::sleep(ROUND) => {}
        }
    }
}

/// Everything the controller reads, with revisions for the writes.
struct Read {
    view: View,
    vms: BTreeMap<String, i64>,
    grants: BTreeMap<String, i64>,
    records: Vec<Versioned<MigrationRecord>>,
    controller_rev: i64,
    failure_revs: BTreeMap<String, i64>,
}

async fn read(c: &Cluster) -> Result<Read, EtcdError> {
    let snap = c.etcd.snapshot().await?;
    let nodes = snap.list::<NodeObject>("nodes")?;
    let configs = snap.list::<NodeConfig>("nodeconfig")?;
    let vms = snap.list::<ClusterVm>("vms")?;
    let statuses = snap.list::<VmStatusReport>("vmstatus")?;
    let records = snap.list::<MigrationRecord>("migrations")?;
    let grants = snap.list::<UpdateGrant>("updates")?;
    let config = snap.get::<ClusterConfig>(&model::config_key())?;
    let controller = snap.get::<ControllerStatus>(&model::controller_key())?;
    let failures = snap.list::<NodeFailureRecord>("nodefailures")?;
    let view = View {
        now: model::now(),
        nodes: nodes.into_iter().map(|n| (n.name, n.value)).collect(),
        node_configs: configs.into_iter().map(|n| (n.name, n.value)).collect(),
        vms: vms
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect(),
        statuses: statuses.into_iter().map(|s| (s.name, s.value)).collect(),
        migrations: records.iter().map(|r| r.value.clone()).collect(),
        grants: grants
            .iter()
            .map(|g| (g.name.clone(), g.value.clone()))
            .collect(),
        config: config.map(|c| c.value).unwrap_or_default(),
        previous: controller
            .as_ref()
            .map(|c| c.value.clone())
            .unwrap_or_default(),
        failures: failures
            .iter()
            .map(|f| (f.name.clone(), f.value.clone()))
            .collect(),
    };
    Ok(Read {
        failure_revs: failures.into_iter().map(|f| (f.name, f.revision)).collect(),
        view,
        vms: vms.into_iter().map(|v| (v.name, v.revision)).collect(),
        grants: grants.into_iter().map(|g| (g.name, g.revision)).collect(),
        records,
        controller_rev: controller.map_or(0, |c| c.revision),
    })
}

/// One controller round. `Ok(false)`: leadership is gone.
async fn round(c: &Cluster, guard: &LeaderGuard) -> Result<bool, EtcdError> {
    let r = read(c).await?;
    let plan = controller::plan(&r.view);
    for d in &plan.decisions {
        let writes = match writes_for(d, &r) {
            Ok(Some(w)) => w,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, decision = ?d, "cannot encode a decision");
                continue;
            }
        };
        if !c.etcd.commit(writes, Some(guard)).await? {
            // Either something changed since the read (re-plan next round) or this node
            // does not lead any more: find out which.
            if !c.etcd.commit(vec![], Some(guard)).await? {
                return Ok(false);
            }
            continue;
        }
        tracing::info!(decision = ?d, "cluster decision");
    }
    prune(c, guard, &r.records).await?;
    let mut status = plan.status;
    status.leader = c.opts.node_name.clone();
    if status != r.view.previous {
        let w = Write::put(model::controller_key(), &status, r.controller_rev)?;
        if !c.etcd.commit(vec![w], Some(guard)).await?
            && !c.etcd.commit(vec![], Some(guard)).await?
        {
            return Ok(false);
        }
    }
    c.update(|s| s.controller = Some(status));
    Ok(true)
}

fn writes_for(d: &Decision, r: &Read) -> Result<Option<Vec<Write>>, EtcdError> {
    let vm_write = |name: &str, f: &dyn Fn(&mut ClusterVm)| -> Result<Option<Write>, EtcdError> {
        let (Some(vm), Some(rev)) = (r.view.vms.get(name), r.vms.get(name)) else {
            return Ok(None);
        };
        let mut next = vm.clone();
        f(&mut next);
        Ok(Some(Write::put(model::key("vms", name), &next, *rev)?))
    };
    let one = |w: Option<Write>| w.map(|w| vec![w]);
    Ok(match d {
        Decision::Place { vm, node } => one(vm_write(vm, &|v| {
            v.node_name = Some(node.clone());
        })?),
        Decision::Evict {
            vm,
            node,
            reason,
            affinity,
        } => one(vm_write(vm, &|v| {
            v.evict = Some(EvictOrder {
                node: node.clone(),
                reason: reason.clone(),
            });
            if affinity.is_some() {
                v.host_affinity = affinity.clone();
            }
        })?),
        Decision::Migrate { vm, source, target } => {
            let mut w = vec![new_drain_record(vm, source, target, r)?];
            // The VM must still be where the plan saw it.
            if let Some(x) = vm_write(vm, &|_| {})? {
                w.push(x);
            }
            Some(w)
        }
        Decision::Grant { vm, grant } => Some(vec![Write::put(
            model::key("updates", vm),
            grant,
            r.grants.get(vm).copied().unwrap_or(0),
        )?]),
        Decision::Abandon { vm, id, reason } => abandon(vm, id, reason, r)?.map(|w| vec![w]),
        Decision::NodeLost { node } => Some(vec![
            Write::put(
                model::key("nodefailures", node),
                &NodeFailureRecord {
                    since: model::now(),
                },
                0,
            )?,
            Write::Absent {
                key: model::key("nodes", node),
            },
        ]),
        Decision::NodeBack { node } => r.failure_revs.get(node).map(|rev| {
            vec![Write::Delete {
                key: model::key("nodefailures", node),
                expect: *rev,
            }]
        }),
        Decision::Reschedule { vm, node, reason } => {
            let Some(w) = vm_write(vm, &|v| {
                v.node_name = None;
                v.evict = None;
                v.message = Some(reason.clone());
            })?
            else {
                return Ok(None);
            };
            // Only while the node is still gone: a node that came back meanwhile keeps
            // its VMs (it never stopped holding its lease long enough to fence).
            Some(vec![
                w,
                Write::Absent {
                    key: model::key("nodes", node),
                },
            ])
        }
        Decision::Revoke { vm } => r.grants.get(vm).map(|rev| {
            vec![Write::Delete {
                key: model::key("updates", vm),
                expect: *rev,
            }]
        }),
    })
}

/// A new `Scheduled` record of a drain migration (its key must not exist yet).
fn new_drain_record(vm: &str, source: &str, target: &str, r: &Read) -> Result<Write, EtcdError> {
    let now = model::now();
    let id = format!("{now:013}-{}", SEQ.fetch_add(1, Ordering::Relaxed));
    let rec = MigrationRecord {
        id: id.clone(),
        vm: vm.to_string(),
        reason: MigrationReason::Drain,
        source: source.to_string(),
        target: target.to_string(),
        phase: MigrationPhase::Scheduled,
        listen: None,
        from_version: r
            .view
            .statuses
            .get(vm)
            .and_then(|s| s.launcher_version.clone()),
        to_version: None,
        created_at: now,
        finished_at: None,
        error: None,
        report: None,
        handover: None,
    };
    Write::put(model::migration_key(vm, &id), &rec, 0)
}

/// Marks a migration record `Failed` with the reason it was abandoned, if the record
/// is still the one the plan saw.
fn abandon(vm: &str, id: &str, reason: &str, r: &Read) -> Result<Option<Write>, EtcdError> {
    let Some(rec) = r
        .records
        .iter()
        .find(|x| x.value.id == id && x.value.vm == vm)
    else {
        return Ok(None);
    };
    let mut next = rec.value.clone();
    next.phase = MigrationPhase::Failed;
    next.error = Some(format!("abandoned: {reason}"));
    next.finished_at = Some(model::now());
    Ok(Some(Write::put(
        model::migration_key(vm, id),
        &next,
        rec.revision,
    )?))
}

/// Keeps the newest [`RECORDS_KEPT`] records per VM; records of VMs that no longer
/// exist go once they are over.
async fn prune(
    c: &Cluster,
    guard: &LeaderGuard,
    records: &[Versioned<MigrationRecord>],
) -> Result<(), EtcdError> {
    let mut per_vm: BTreeMap<&str, Vec<&Versioned<MigrationRecord>>> = BTreeMap::new();
    for r in records {
        per_vm.entry(r.value.vm.as_str()).or_default().push(r);
    }
    for (_, mut recs) in per_vm {
        recs.sort_by(|a, b| b.value.id.cmp(&a.value.id));
        for old in recs.iter().skip(RECORDS_KEPT) {
            if old.value.phase.active() {
                continue;
            }
            let w = Write::Delete {
                key: model::migration_key(&old.value.vm, &old.value.id),
                expect: old.revision,
            };
            c.etcd.commit(vec![w], Some(guard)).await?;
        }
    }
    Ok(())
}

//! The cluster routes of noded's API (any node answers them; they read and write etcd):
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/nodes` | every node: Ready, schedulable, capacity, launchers |
//! | `GET /v1/nodes/{name}` | one node, its VMs, and what blocks its drain |
//! | `PUT /v1/nodes/{name}/cordon` · `uncordon` · `drain` | operator actions (uncordon also cancels a drain) |
//! | `GET /v1/cluster` | connection, leader, controller status, configuration |
//! | `PUT /v1/cluster/config` | change the cluster configuration (a partial document) |
//! | `GET /v1/cluster/vms` | every VM in the cluster, with its node |
//! | `GET /v1/cluster/migrations` | the kept migration records |
//! | `POST /v1/vms`, `DELETE /v1/vms/{name}` | in a cluster, create or delete cluster-wide |

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::etcd::{EtcdError, Write};
use super::local::LocalCall;
use super::model::{
    self, ClusterConfig, ClusterVm, MigrationRecord, NodeConfig, NodeObject, VmStatusReport,
};
use super::Cluster;
use crate::requests::{err, Body, Reply};

fn ok(status: u16, v: Value) -> Reply {
    Reply {
        status,
        body: Body::Json(v),
    }
}

fn unavailable(e: EtcdError) -> Reply {
    err(
        503,
        format!("the cluster cannot be reached, so nothing new is decided: {e}"),
    )
}

/// Routes a request if it is a cluster route; `None` leaves it to the node's own API.
pub async fn route(
    c: &Cluster,
    method: &str,
    parts: &[&str],
    body: Option<Value>,
) -> Option<Reply> {
    let mut r = route_once(c, method, parts, body.clone()).await?;
    // A dropped connection (the client reconnects) gets one more try; every write
    // compares revisions, so a repeated one cannot apply twice.
    if r.as_ref().is_err_and(EtcdError::transient) {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        r = route_once(c, method, parts, body).await?;
    }
    Some(r.unwrap_or_else(unavailable))
}

async fn route_once(
    c: &Cluster,
    method: &str,
    parts: &[&str],
    body: Option<Value>,
) -> Option<Result<Reply, EtcdError>> {
    let r = match (method, parts) {
        ("GET", ["v1", "nodes"]) => nodes(c, None).await,
        ("GET", ["v1", "nodes", name]) => nodes(c, Some(name)).await,
        ("PUT", ["v1", "nodes", name, action]) => node_action(c, name, action).await,
        ("GET", ["v1", "cluster"]) => cluster(c).await,
        ("PUT", ["v1", "cluster", "config"]) => set_config(c, body.unwrap_or(Value::Null)).await,
        ("GET", ["v1", "cluster", "vms"]) => vms(c).await,
        ("GET", ["v1", "cluster", "migrations"]) => migrations(c).await,
        ("POST", ["v1", "vms"]) => create(c, body.unwrap_or(Value::Null)).await,
        ("DELETE", ["v1", "vms", name]) => delete(c, name).await,
        _ => return None,
    };
    Some(r)
}

fn node_view(
    name: &str,
    obj: Option<&NodeObject>,
    cfg: &NodeConfig,
    vms: &[(&String, &ClusterVm)],
) -> Value {
    let on: Vec<&String> = vms
        .iter()
        .filter(|(_, v)| v.node_name.as_deref() == Some(name))
        .map(|(n, _)| *n)
        .collect();
    json!({
        "name": name,
        "status": if obj.is_some() { "Ready" } else { "NotReady" },
        "schedulable": obj.is_some() && !cfg.unschedulable && cfg.drain_requested_at.is_none(),
        "cordoned": cfg.unschedulable || cfg.drain_requested_at.is_some(),
        "draining": cfg.drain_requested_at.is_some(),
        "migrationAddress": obj.map(|o| o.migration_address.clone()),
        "memory": obj.map(|o| json!({"total": o.memory_total, "allocated": o.memory_allocated})),
        "vcpus": obj.map(|o| json!({"total": o.vcpus_total, "allocated": o.vcpus_allocated})),
        "launchers": obj.map(|o| o.launchers.clone()).unwrap_or_default(),
        "channel": obj.map(|o| o.channel.clone()),
        "vms": on,
    })
}

async fn nodes(c: &Cluster, one: Option<&str>) -> Result<Reply, EtcdError> {
    // One read at one revision: the node, its VMs and its migrations agree.
    let snap = c.etcd.snapshot().await?;
    let objs = snap.list::<NodeObject>("nodes")?;
    let cfgs = snap.list::<NodeConfig>("nodeconfig")?;
    let vms = snap.list::<ClusterVm>("vms")?;
    let objs: BTreeMap<String, NodeObject> = objs.into_iter().map(|o| (o.name, o.value)).collect();
    let cfgs: BTreeMap<String, NodeConfig> = cfgs.into_iter().map(|o| (o.name, o.value)).collect();
    let vms: Vec<(&String, &ClusterVm)> = vms.iter().map(|v| (&v.name, &v.value)).collect();
    let mut names: Vec<&String> = objs.keys().chain(cfgs.keys()).collect();
    names.sort();
    names.dedup();
    let view = |n: &str| {
        node_view(
            n,
            objs.get(n),
            &cfgs.get(n).cloned().unwrap_or_default(),
            &vms,
        )
    };
    match one {
        None => Ok(ok(
            200,
            Value::Array(names.iter().map(|n| view(n)).collect()),
        )),
        Some(n) if !objs.contains_key(n) && !cfgs.contains_key(n) => Ok(err(
            404,
            format!("node {n} not found (nodectl node list shows the nodes)"),
        )),
        Some(n) => {
            let mut v = view(n);
            let ctl = snap
                .get::<model::ControllerStatus>(&model::controller_key())?
                .map(|x| x.value)
                .unwrap_or_default();
            let statuses = snap.list::<VmStatusReport>("vmstatus")?;
            let recs = snap.list::<MigrationRecord>("migrations")?;
            v["blocked"] = json!(ctl.drain_blocked.get(n).cloned().unwrap_or_default());
            v["vmStatuses"] = json!(statuses
                .into_iter()
                .filter(|s| s.value.node == n)
                .map(|s| json!({"name": s.name, "phase": s.value.phase, "launcherVersion": s.value.launcher_version}))
                .collect::<Vec<_>>());
            v["migrations"] = json!(recs
                .into_iter()
                .filter(|r| r.value.source == n || r.value.target == n)
                .map(|r| r.value)
                .collect::<Vec<_>>());
            v["evicted"] = json!(vms
                .iter()
                .filter(|(_, x)| x.node_name.is_none()
                    && x.message
                        .as_deref()
                        .is_some_and(|m| m.contains(&format!("node {n}"))))
                .map(|(name, x)| json!({"name": name, "message": x.message}))
                .collect::<Vec<_>>());
            Ok(ok(200, v))
        }
    }
}

async fn node_action(c: &Cluster, name: &str, action: &str) -> Result<Reply, EtcdError> {
    let key = model::key("nodeconfig", name);
    let exists = c
        .etcd
        .get::<NodeObject>(&model::key("nodes", name))
        .await?
        .is_some();
    for _ in 0..5 {
        let cur = c.etcd.get::<NodeConfig>(&key).await?;
        if cur.is_none() && !exists {
            return Ok(err(
                404,
                format!("node {name} not found (nodectl node list shows the nodes)"),
            ));
        }
        let rev = cur.as_ref().map_or(0, |v| v.revision);
        let mut cfg = cur.map(|v| v.value).unwrap_or_default();
        match action {
            "cordon" => cfg.unschedulable = true,
            "uncordon" => {
                cfg.unschedulable = false;
                cfg.drain_requested_at = None;
            }
            "drain" => {
                cfg.unschedulable = true;
                cfg.drain_requested_at.get_or_insert(model::now());
            }
            other => {
                return Ok(err(
                    404,
                    format!("unknown node action {other:?} (cordon, uncordon, drain)"),
                ))
            }
        }
        if c.etcd
            .commit(vec![Write::put(key.clone(), &cfg, rev)?], None)
            .await?
        {
            c.wake.notify_waiters();
            tracing::info!(node = name, action, "node configuration changed");
            return Ok(ok(
                200,
                json!({"name": name, "cordoned": cfg.unschedulable, "draining": cfg.drain_requested_at.is_some()}),
            ));
        }
    }
    Ok(err(
        409,
        "the node's configuration kept changing; try again",
    ))
}

async fn cluster(c: &Cluster) -> Result<Reply, EtcdError> {
    let st = c.state();
    let config = c.etcd.get::<ClusterConfig>(&model::config_key()).await;
    let ctl = c
        .etcd
        .get::<model::ControllerStatus>(&model::controller_key())
        .await;
    let (config, ctl, reachable) = match (config, ctl) {
        (Ok(a), Ok(b)) => (
            a.map(|v| v.value).unwrap_or_default(),
            b.map(|v| v.value).or(st.controller.clone()),
            true,
        ),
        _ => (ClusterConfig::default(), st.controller.clone(), false),
    };
    Ok(ok(
        200,
        json!({
            "node": st.node,
            "connected": reachable && st.connected,
            "error": if reachable { st.error.clone() } else { Some(st.error.clone().unwrap_or_else(|| "etcd does not answer".into())) },
            "leading": st.leading,
            "controller": ctl,
            "config": config,
        }),
    ))
}

/// Merges `patch` (a JSON object) into `base`, recursively.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p.clone(),
    }
}

async fn set_config(c: &Cluster, patch: Value) -> Result<Reply, EtcdError> {
    if !patch.is_object() {
        return Ok(err(
            400,
            "the body must be a JSON object (a partial cluster configuration)",
        ));
    }
    let key = model::config_key();
    let cur = c.etcd.get::<ClusterConfig>(&key).await?;
    let rev = cur.as_ref().map_or(0, |v| v.revision);
    let mut doc =
        serde_json::to_value(cur.map(|v| v.value).unwrap_or_default()).unwrap_or_default();
    merge(&mut doc, &patch);
    let cfg: ClusterConfig = match serde_json::from_value(doc) {
        Ok(c) => c,
        Err(e) => return Ok(err(400, format!("invalid cluster configuration: {e}"))),
    };
    if let Err(why) = cfg.validate() {
        return Ok(err(400, format!("invalid cluster configuration: {why}")));
    }
    if c.etcd
        .commit(vec![Write::put(key, &cfg, rev)?], None)
        .await?
    {
        c.wake.notify_waiters();
        Ok(ok(200, serde_json::to_value(&cfg).unwrap_or_default()))
    } else {
        Ok(err(
            409,
            "the cluster configuration changed meanwhile; try again",
        ))
    }
}

async fn vms(c: &Cluster) -> Result<Reply, EtcdError> {
    let (vms, _) = c.etcd.list::<ClusterVm>("vms").await?;
    let (statuses, _) = c.etcd.list::<VmStatusReport>("vmstatus").await?;
    let st: BTreeMap<String, VmStatusReport> =
        statuses.into_iter().map(|s| (s.name, s.value)).collect();
    let out: Vec<Value> = vms
        .into_iter()
        .map(|v| {
            let s = st.get(&v.name);
            let phase = match (&v.value.node_name, s) {
                (_, Some(s)) if Some(&s.node) == v.value.node_name.as_ref() => s.phase.clone(),
                (None, _) if v.value.message.is_some() => "Stopped".into(),
                (None, _) => "Pending".into(),
                (Some(_), _) => "Scheduled".into(),
            };
            json!({
                "name": v.name,
                "node": v.value.node_name,
                "phase": phase,
                "launcherVersion": s.and_then(|s| s.launcher_version.clone()),
                "runStrategy": v.value.spec.run_strategy,
                "evictionStrategy": v.value.spec.eviction_strategy,
                "message": v.value.message.clone().or_else(|| s.and_then(|s| s.message.clone())),
            })
        })
        .collect();
    Ok(ok(200, Value::Array(out)))
}

async fn migrations(c: &Cluster) -> Result<Reply, EtcdError> {
    let (recs, _) = c.etcd.list::<MigrationRecord>("migrations").await?;
    let mut recs: Vec<MigrationRecord> = recs.into_iter().map(|r| r.value).collect();
    recs.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(ok(200, serde_json::to_value(recs).unwrap_or_default()))
}

async fn create(c: &Cluster, body: Value) -> Result<Reply, EtcdError> {
    let spec = match c.ask(|tx| LocalCall::Validate(body, tx)).await {
        Some(Ok(s)) => s,
        Some(Err(e)) => return Ok(err(400, e)),
        None => return Ok(err(503, "noded is shutting down")),
    };
    let name = spec.name.clone();
    let vm = ClusterVm {
        spec,
        node_name: None,
        host_affinity: None,
        evict: None,
        message: None,
        deletion_requested: false,
        created_at: model::now(),
    };
    if !c
        .etcd
        .commit(vec![Write::put(model::key("vms", &name), &vm, 0)?], None)
        .await?
    {
        return Ok(err(409, format!("VM {name} already exists in the cluster")));
    }
    c.wake.notify_waiters();
    tracing::info!(vm = %name, "VM created in the cluster; the leader places it");
    Ok(ok(
        201,
        json!({"name": name, "phase": "Pending", "node": null}),
    ))
}

async fn delete(c: &Cluster, name: &str) -> Result<Reply, EtcdError> {
    let key = model::key("vms", name);
    let Some(cur) = c.etcd.get::<ClusterVm>(&key).await? else {
        return Ok(err(404, format!("VM {name} not found in the cluster")));
    };
    let w = if cur.value.node_name.is_none() {
        Write::Delete {
            key,
            expect: cur.revision,
        }
    } else {
        let mut next = cur.value.clone();
        next.deletion_requested = true;
        Write::put(key, &next, cur.revision)?
    };
    if !c.etcd.commit(vec![w], None).await? {
        return Ok(err(409, format!("VM {name} changed meanwhile; try again")));
    }
    c.wake.notify_waiters();
    Ok(ok(
        202,
        json!({"name": name, "phase": "Deleting", "node": cur.value.node_name}),
    ))
}

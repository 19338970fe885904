//! The cluster layer: noded instances that share one etcd cluster (docs/cluster.md).
//!
//! etcd does the distributed work: leases keep each node's object alive, transactions
//! that compare revisions make every write safe against lost updates, watches wake the
//! tasks, and etcd's election API picks the one leader. There is no consensus or
//! membership code here.
//!
//! Three tasks run in a noded started with `--cluster-endpoints`:
//! - [`agent`]: this node's side. Keeps the node's lease and object alive, reports the
//!   VMs it runs, and carries out what the cluster assigned to it (create, stop, receive
//!   or send a VM) by asking the reconciliation loop ([`local`]); the loop remains the
//!   only owner of local launchers.
//! - [`leader`]: campaigns for leadership; while leading, reads the cluster, asks the
//!   pure [`controller::plan`] what to do, and writes the decisions, each write
//!   conditional on still holding the election key.
//! - the API routes of [`api`] (`nodectl node ...`, cluster-wide `vm create/delete`).
//!
//! When etcd cannot be reached or has lost quorum, nothing running is stopped: each
//! node keeps enforcing runStrategy for the VMs it runs, and the cluster only stops
//! making new decisions (`nodectl status`, metric `noded_cluster_connected`).

pub mod agent;
pub mod api;
pub mod controller;
pub mod etcd;
pub mod fence;
pub mod leader;
pub mod local;
pub mod model;
pub mod peer;
pub mod persisted;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, Notify};

use local::LocalCall;

/// Cluster options of `noded`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// This node's name (unique in the cluster).
    pub node_name: String,
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// `IP:PORT`: incoming migrations listen on this IP, from this port up.
    pub migration_address: SocketAddr,
    /// ca.pem, cert.pem, key.pem for launcher-to-launcher mutual TLS.
    pub tls_dir: PathBuf,
    /// Node lease TTL, seconds.
    pub lease_ttl: u64,
    /// Memory offered to VMs, bytes.
    pub memory_total: u64,
    /// vCPUs offered to VMs.
    pub vcpus_total: u32,
    /// The launchers' watchdog file, fed while the node is healthy (set by the daemon).
    pub watchdog_file: Option<PathBuf>,
    /// Where the lease id and the peer list are kept across restarts (set by the daemon).
    pub state_dir: Option<PathBuf>,
}

/// Errors of the cluster options.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A bad option.
    #[error("{0}")]
    Option(String),
}

impl ClusterOptions {
    /// Checks what can be checked before connecting.
    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |m: String| Err(ClusterError::Option(m));
        if self.node_name.is_empty()
            || !self
                .node_name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return bad(format!(
                "--node-name {:?}: use lower-case letters, digits and '-'",
                self.node_name
            ));
        }
        if self.endpoints.is_empty() {
            return bad("--cluster-endpoints: give at least one http://HOST:PORT".into());
        }
        if let Some(e) = self.endpoints.iter().find(|e| !e.starts_with("http://")) {
            return bad(format!(
                "--cluster-endpoints: {e:?} is not http://HOST:PORT"
            ));
        }
        if !self.tls_dir.is_absolute() {
            return bad(format!(
                "--tls-dir {}: must be an absolute path (ca.pem, cert.pem, key.pem)",
                self.tls_dir.display()
            ));
        }
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            if !self.tls_dir.join(f).is_file() {
                return bad(format!(
                    "--tls-dir {}: {f} is missing (migrations between nodes use mutual TLS)",
                    self.tls_dir.display()
                ));
            }
        }
        if self.migration_address.ip().is_unspecified() {
            return bad(
                "--migration-address: give the IP peers reach this node on, not 0.0.0.0".into(),
            );
        }
        if !(3..=300).contains(&self.lease_ttl) {
            return bad(format!(
                "--lease-ttl {}: use 3 to 300 seconds",
                self.lease_ttl
            ));
        }
        Ok(())
    }
}

/// What this node knows of the cluster, shared by the tasks and shown by the API.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterState {
    /// This node.
    pub node: String,
    /// etcd answered the last round.
    pub connected: bool,
    /// Why not, when not.
    pub error: Option<String>,
    /// The leader's node name, as last read.
    pub leader: Option<String>,
    /// This node leads.
    pub leading: bool,
    /// The node's lease.
    #[serde(skip)]
    pub lease: Option<i64>,
    /// When the lease was last renewed.
    #[serde(skip)]
    pub renewed: Option<Instant>,
    /// The leader's last published status.
    pub controller: Option<model::ControllerStatus>,
    /// The other nodes' peer-check addresses, as last read (kept across restarts).
    #[serde(skip)]
    pub peers: Vec<(String, SocketAddr)>,
    /// This node fenced itself, and why (until it rejoined).
    pub fenced: Option<String>,
    /// The lease under which the agent last completed a round (starts are allowed
    /// only once the current lease is reconciled).
    #[serde(skip)]
    pub reconciled_lease: Option<i64>,
}

impl ClusterState {
    /// The lease is surely still alive (renewed within its TTL, with a margin).
    pub fn lease_valid(&self, ttl: Duration) -> bool {
        self.renewed
            .is_some_and(|t| t.elapsed() < ttl.saturating_sub(Duration::from_secs(1)))
    }
}

/// The handle the API and the tasks share.
#[derive(Clone)]
pub struct Cluster {
    /// Options.
    pub opts: Arc<ClusterOptions>,
    /// etcd.
    pub etcd: etcd::Etcd,
    /// Shared state.
    pub state: Arc<Mutex<ClusterState>>,
    /// Calls into the reconciliation loop.
    pub calls: mpsc::Sender<LocalCall>,
    /// Wakes the agent and the leader early (a watch event, an API write).
    pub wake: Arc<Notify>,
}

impl Cluster {
    /// Connects to etcd (retrying until it answers: a node may start before its cluster)
    /// and starts the agent, the leader and the watch.
    pub async fn start(opts: ClusterOptions, calls: mpsc::Sender<LocalCall>) -> Cluster {
        let etcd = loop {
            match etcd::Etcd::connect(&opts.endpoints).await {
                Ok(e) => break e,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach etcd yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let saved = opts
            .state_dir
            .as_deref()
            .map(persisted::load)
            .unwrap_or_default();
        let c = Cluster {
            state: Arc::new(Mutex::new(ClusterState {
                node: opts.node_name.clone(),
                connected: false,
                error: None,
                leader: None,
                leading: false,
                // The lease of the previous run: peers are asked about it until etcd
                // answers (keep_lease then resumes it, or finds it expired and fences).
                lease: saved.lease,
                renewed: None,
                controller: None,
                peers: saved.peers,
                fenced: None,
                reconciled_lease: None,
            })),
            opts: Arc::new(opts),
            etcd,
            calls,
            wake: Arc::new(Notify::new()),
        };
        tokio::spawn(agent::run(c.clone()));
        tokio::spawn(leader::run(c.clone()));
        tokio::spawn(fence::run(c.clone()));
        tokio::spawn(watch(c.clone()));
        c
    }

    /// A snapshot of the shared state.
    pub fn state(&self) -> ClusterState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the shared state.
    pub fn update(&self, f: impl FnOnce(&mut ClusterState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Asks the reconciliation loop.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> LocalCall,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.calls.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// An API request through the reconciliation loop.
    pub async fn request(&self, req: crate::requests::Req) -> crate::requests::Reply {
        self.ask(|tx| LocalCall::Request(req, tx))
            .await
            .unwrap_or_else(|| crate::requests::err(503, "noded is shutting down"))
    }
}

/// Watches the whole prefix and wakes the tasks on every change (they re-read; the
/// periodic rounds cover a broken watch).
async fn watch(c: Cluster) {
    loop {
        let mut client = c.etcd.client();
        let opts = etcd_client::WatchOptions::new().with_prefix();
        match client.watch(model::PREFIX, Some(opts)).await {
            Ok(mut stream) => {
                while let Ok(Some(_)) = stream.message().await {
                    c.wake.notify_waiters();
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "watch failed; retrying");
                c.etcd.stream_failed();
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

//! Self-fencing, on the medik8s self-node-remediation model (docs/cluster.md, "Node
//! failure", has the timing argument).
//!
//! Every [`TICK`], the monitor looks at the node's lease:
//! - renewed within `TTL − 3 s` and reconciled since: **healthy**. The watchdog file is
//!   fed and starts are allowed.
//! - otherwise starts are held, and the node asks its peers ([`super::peer`]) whether
//!   they reach etcd and how long its lease has left there. [`decide`] then says:
//!   - a peer reaches etcd and the lease has less than [`FENCE_MARGIN`] left (or is
//!     gone): this node is the one cut off. It **fences**: every launcher is killed
//!     (SIGKILL) before the lease can expire, and nothing is restarted here.
//!   - no peer answers at all: this node is isolated; it fences too.
//!   - peers answer but none reaches etcd: the control plane is down, not this node;
//!     its VMs keep running (the watchdog is fed).
//!   - a peer reaches etcd and the lease has time left: keep running, ask again.
//!
//! A lease that etcd says has expired fences at once (`keep_lease`), and a frozen noded
//! stops feeding the watchdog, so its launchers kill themselves.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration::tls::TlsConfig;

use super::local::LocalCall;
use super::peer;
use super::Cluster;

/// How often the monitor runs.
pub const TICK: Duration = Duration::from_millis(500);
/// Peers are asked once the lease is this close to its TTL without a renewal.
pub const CHECK_MARGIN: Duration = Duration::from_secs(3);
/// A node whose lease has less than this left in etcd (as a peer reads it) fences.
pub const FENCE_MARGIN_S: i64 = 2;
/// How often the watchdog file is fed while healthy (well under the launcher's timeout).
const FEED_EVERY: Duration = Duration::from_millis(1000);

/// What the peers said, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep running; feed the watchdog.
    KeepRunning(String),
    /// Kill every launcher now.
    Fence(String),
}

/// One peer's answer: `(peer, reaches_etcd, lease_ttl)`; `Err` when it did not answer.
pub type PeerAnswer = Result<(String, bool, Option<i64>), String>;

/// The decision from the peers' answers. Pure: the unit tests drive it.
pub fn decide(answers: &[PeerAnswer]) -> Verdict {
    if answers.is_empty() {
        return Verdict::KeepRunning("no peer is known: no other node could run these VMs".into());
    }
    let answered: Vec<&(String, bool, Option<i64>)> =
        answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    if answered.is_empty() {
        return Verdict::Fence(format!(
            "no peer answers ({} known): this node is cut off from the cluster",
            answers.len()
        ));
    }
    if let Some((peer, _, ttl)) = answered
        .iter()
        .find(|(_, reaches, ttl)| *reaches && ttl.is_none_or(|t| t < FENCE_MARGIN_S))
    {
        return Verdict::Fence(match ttl {
            Some(t) if *t >= 0 => format!(
                "peer {peer} reaches etcd and this node's lease has {t}s left: this node is cut off from etcd"
            ),
            _ => format!(
                "peer {peer} reaches etcd and this node's lease is gone: this node is cut off from etcd"
            ),
        });
    }
    if let Some((peer, _, ttl)) = answered.iter().find(|(_, reaches, _)| *reaches) {
        return Verdict::KeepRunning(format!(
            "peer {peer} reaches etcd and this node's lease has {}s left",
            ttl.unwrap_or(0)
        ));
    }
    Verdict::KeepRunning(format!(
        "{} peer(s) answer but none reaches etcd: the control plane is down, not this node",
        answered.len()
    ))
}

/// Starts the peer server and runs the monitor forever.
pub async fn run(c: Cluster) {
    let tls = match TlsConfig::load(&c.opts.tls_dir) {
        Ok(t) => t,
        Err(e) => {
            // validate() checked the files; a broken identity leaves the node unable to
            // answer or ask, which its peers read as "cut off" (the safe side).
            tracing::error!(error = %e, "cannot load the TLS identity for peer checks");
            return;
        }
    };
    start_server(&c, tls.clone());
    let mut last_feed: Option<Instant> = None;
    let mut last_verdict: Option<Verdict> = None;
    let mut first = true;
    // The loop starts holding (fencing.rs); tell it only of changes.
    let mut held = true;
    loop {
        // The first look at once: the watchdog file must exist before any launcher starts.
        if !std::mem::take(&mut first) {
            tokio::time::sleep(TICK).await;
        }
        let st = c.state();
        if st.fenced.is_some() {
            continue; // the agent rejoins; nothing is fed meanwhile
        }
        let ttl = Duration::from_secs(c.opts.lease_ttl);
        let fresh = st.renewed.is_some_and(|t| t.elapsed() + CHECK_MARGIN < ttl);
        let reconciled = st.lease.is_some() && st.reconciled_lease == st.lease;
        if fresh && reconciled {
            feed(&c, &mut last_feed);
            hold(&c, &mut held, false).await;
            last_verdict = None;
            continue;
        }
        hold(&c, &mut held, true).await;
        let Some(lease) = st.lease else {
            // Never had a lease since start: nothing can have been restarted elsewhere
            // on its account yet; wait for etcd, keep what runs (the previous lease, if
            // any, is checked by the peers below once known).
            if st.peers.is_empty() {
                feed(&c, &mut last_feed);
                continue;
            }
            check(&c, &tls, -1, &mut last_feed, &mut last_verdict).await;
            continue;
        };
        if fresh {
            // Renewed, but not reconciled yet (just rejoined): keep feeding.
            feed(&c, &mut last_feed);
            continue;
        }
        check(&c, &tls, lease, &mut last_feed, &mut last_verdict).await;
    }
}

async fn hold(c: &Cluster, held: &mut bool, now: bool) {
    if *held != now && c.calls.send(LocalCall::Hold(now)).await.is_ok() {
        *held = now;
    }
}

async fn check(
    c: &Cluster,
    tls: &Arc<TlsConfig>,
    lease: i64,
    last_feed: &mut Option<Instant>,
    last_verdict: &mut Option<Verdict>,
) {
    let answers = ask_peers(c, tls, lease).await;
    let v = decide(&answers);
    if last_verdict.as_ref() != Some(&v) {
        tracing::warn!(verdict = ?v, answers = ?answers, "lease not renewed: asked the peers");
        *last_verdict = Some(v.clone());
    }
    match v {
        Verdict::KeepRunning(_) => feed(c, last_feed),
        Verdict::Fence(why) => fence(c, &why).await,
    }
}

/// Fences this node: the loop kills every launcher; the agent rejoins later.
pub async fn fence(c: &Cluster, why: &str) {
    if c.state().fenced.is_some() {
        return;
    }
    c.update(|s| s.fenced = Some(why.to_string()));
    tracing::warn!(
        reason = why,
        "FENCING: this node stops its VMs; the cluster owns them now"
    );
    let _ = c.ask(|tx| LocalCall::Fence(why.to_string(), tx)).await;
}

/// Feeds the launchers' watchdog (its mtime is what they check).
fn feed(c: &Cluster, last: &mut Option<Instant>) {
    let Some(path) = &c.opts.watchdog_file else {
        return;
    };
    if last.is_some_and(|t| t.elapsed() < FEED_EVERY) {
        return;
    }
    match std::fs::write(path, format!("{}\n", super::model::now())) {
        Ok(()) => *last = Some(Instant::now()),
        Err(e) => tracing::error!(error = %e, path = %path.display(), "cannot feed the watchdog"),
    }
}

/// Asks every known peer at once; each answer within [`peer::EXCHANGE_TIMEOUT`].
async fn ask_peers(c: &Cluster, tls: &Arc<TlsConfig>, lease: i64) -> Vec<PeerAnswer> {
    let peers = c.state().peers;
    let me = c.opts.node_name.clone();
    let mut tasks = Vec::new();
    for (name, addr) in peers {
        let (tls, me) = (tls.clone(), me.clone());
        let h = tokio::task::spawn_blocking(move || peer::ask(&tls, addr, &me, lease));
        tasks.push((name, h));
    }
    let mut out = Vec::new();
    for (name, h) in tasks {
        let r = tokio::time::timeout(peer::EXCHANGE_TIMEOUT + Duration::from_millis(200), h).await;
        out.push(match r {
            Ok(Ok(Ok((node, (reaches, ttl))))) => Ok((node, reaches, ttl)),
            Ok(Ok(Err(e))) => Err(format!("{name}: {e}")),
            _ => Err(format!("{name}: no answer in time")),
        });
    }
    out
}

/// The peer server on the migration address's port, answering from this node's etcd
/// client (bounded, so a peer gets "cannot reach etcd" rather than no answer).
fn start_server(c: &Cluster, tls: Arc<TlsConfig>) {
    let addr: SocketAddr = c.opts.migration_address;
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, %addr, "cannot listen for peer checks");
            return;
        }
    };
    let rt = tokio::runtime::Handle::current();
    let etcd = c.etcd.clone();
    let answer = Arc::new(move |lease: i64| -> peer::Verdict {
        let etcd = etcd.clone();
        rt.block_on(async move {
            let call = async {
                if lease < 0 {
                    // Only "do you reach etcd": any read will do.
                    etcd.client()
                        .get(super::model::config_key(), None)
                        .await
                        .map(|_| -1)
                } else {
                    etcd.client()
                        .lease_time_to_live(lease, None)
                        .await
                        .map(|r| r.ttl())
                }
            };
            match tokio::time::timeout(Duration::from_millis(500), call).await {
                Ok(Ok(ttl)) => (true, Some(ttl)),
                // etcd answers "lease not found" for an expired lease.
                Ok(Err(e)) if e.to_string().contains("not found") => (true, Some(-1)),
                _ => (false, None),
            }
        })
    });
    let node = c.opts.node_name.clone();
    tracing::info!(%addr, "answering peer checks");
    std::thread::spawn(move || peer::serve(listener, tls, node, answer));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yes(peer: &str, ttl: i64) -> PeerAnswer {
        Ok((peer.into(), true, Some(ttl)))
    }

    fn no(peer: &str) -> PeerAnswer {
        Ok((peer.into(), false, None))
    }

    fn silent(peer: &str) -> PeerAnswer {
        Err(format!("{peer}: no answer"))
    }

    fn fences(v: &Verdict) -> bool {
        matches!(v, Verdict::Fence(_))
    }

    #[test]
    fn a_peer_that_reaches_etcd_while_the_lease_runs_out_means_fence() {
        assert!(fences(&decide(&[yes("b", 1)])));
        assert!(fences(&decide(&[no("b"), yes("c", -1)])));
        assert!(fences(&decide(&[silent("b"), yes("c", 0)])));
    }

    #[test]
    fn a_lease_with_time_left_keeps_the_node_running() {
        // Just after etcd regained quorum, its new leader extends every lease: peers
        // reach etcd before this node renews, but its lease is far from expiry.
        assert!(!fences(&decide(&[yes("b", 5)])));
        assert!(!fences(&decide(&[yes("b", FENCE_MARGIN_S)])));
    }

    #[test]
    fn peers_that_answer_without_etcd_mean_the_control_plane_is_down() {
        let v = decide(&[no("b"), silent("c")]);
        assert!(!fences(&v));
        assert!(format!("{v:?}").contains("control plane is down"));
    }

    #[test]
    fn no_answer_at_all_means_this_node_is_isolated() {
        let v = decide(&[silent("b"), silent("c")]);
        assert!(fences(&v));
        assert!(format!("{v:?}").contains("no peer answers"));
    }

    #[test]
    fn a_node_alone_keeps_running() {
        assert!(!fences(&decide(&[])));
    }
}

//! The one place that talks to etcd: typed reads, writes that compare the revision
//! they read (no lost updates), leases, and the leader guard that makes a deposed
//! leader's writes fail.
//!
//! Every call has a deadline ([`CALL_TIMEOUT`]): a member that lost quorum answers
//! nothing (the client asks with `require_leader`), and the callers must learn that
//! quickly to report the outage and stop deciding.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::model::PREFIX;

/// Deadline of one etcd call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest object this noded writes or accepts (etcd's own request limit is 1.5 MiB).
pub const MAX_OBJECT_BYTES: usize = 256 * 1024;

/// What can go wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The client's error (connection refused, no leader, ...).
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    /// No answer in time: etcd is down, cut off, or has lost quorum.
    #[error(
        "etcd did not answer within 5s ({0}): the cluster may have lost quorum or be unreachable"
    )]
    Timeout(&'static str),
    /// An object this version cannot read.
    #[error("{key}: cannot decode ({error}); refusing to act on it")]
    Decode {
        /// The key.
        key: String,
        /// Why.
        error: String,
    },
    /// An object too large to be ours.
    #[error("{key}: {len} bytes is more than the {MAX_OBJECT_BYTES} an object may have")]
    TooLarge {
        /// The key.
        key: String,
        /// Its size.
        len: usize,
    },
}

/// The leader's proof of leadership: its election key and that key's create revision.
/// A write guarded by it succeeds only while that exact key still exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderGuard {
    /// The election key.
    pub key: Vec<u8>,
    /// Its create revision.
    pub revision: i64,
}

impl EtcdError {
    /// A failure of the connection rather than an answer: worth one more try.
    pub fn transient(&self) -> bool {
        matches!(
            self,
            EtcdError::Timeout(_)
                | EtcdError::Client(etcd_client::Error::GRpcStatus(_))
                | EtcdError::Client(etcd_client::Error::TransportError(_))
        )
    }
}

/// A decoded object with the revision to compare when writing it back.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    /// The name (the key without its kind prefix).
    pub name: String,
    /// The object.
    pub value: T,
    /// Its mod revision.
    pub revision: i64,
}

/// One write of a transaction.
pub enum Write {
    /// Put `value` at `key` if its mod revision is `expect` (0: the key must not exist);
    /// `lease`, when given, attaches the key to it.
    Put {
        /// Key.
        key: String,
        /// Encoded object.
        value: Vec<u8>,
        /// Expected mod revision.
        expect: i64,
        /// Lease.
        lease: Option<i64>,
    },
    /// Delete `key` if its mod revision is `expect`.
    Delete {
        /// Key.
        key: String,
        /// Expected mod revision.
        expect: i64,
    },
    /// No write: the transaction holds only while `key` does not exist (a node's object,
    /// say, which its lease keeps alive).
    Absent {
        /// Key.
        key: String,
    },
}

impl Write {
    /// A put of `value` encoded as JSON.
    pub fn put<T: Serialize>(key: String, value: &T, expect: i64) -> Result<Write, EtcdError> {
        let value = serde_json::to_vec(value).map_err(|e| EtcdError::Decode {
            key: key.clone(),
            error: e.to_string(),
        })?;
        if value.len() > MAX_OBJECT_BYTES {
            return Err(EtcdError::TooLarge {
                len: value.len(),
                key,
            });
        }
        Ok(Write::Put {
            key,
            value,
            expect,
            lease: None,
        })
    }

    /// The same put, attached to a lease.
    pub fn with_lease(self, id: i64) -> Write {
        match self {
            Write::Put {
                key, value, expect, ..
            } => Write::Put {
                key,
                value,
                expect,
                lease: Some(id),
            },
            other => other,
        }
    }
}

/// A connection to the etcd cluster: one client per member, and calls go to the current
/// member until it fails to answer (a timeout, a broken connection, or no leader: a
/// member cut off from the quorum refuses, as the client asks with `require_leader`);
/// then the next member becomes current. One member at a time keeps failover explicit
/// and observable instead of hidden in a balancer.
#[derive(Clone)]
pub struct Etcd {
    members: std::sync::Arc<Vec<(String, Client)>>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn deadline<T>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(EtcdError::Timeout(what)),
    }
}

impl Etcd {
    /// Makes a client for every member (connections are made when first used).
    pub async fn connect(endpoints: &[String]) -> Result<Etcd, EtcdError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(10))
            .with_keep_alive_while_idle(true)
            // A member without a leader (lost quorum) refuses instead of serving stale
            // data or hanging.
            .with_require_leader(true);
        let mut members = Vec::new();
        for e in endpoints {
            let c = deadline("connect", Client::connect([e.as_str()], Some(opts.clone()))).await?;
            members.push((e.clone(), c));
        }
        Ok(Etcd {
            members: std::sync::Arc::new(members),
            current: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        })
    }

    fn pick(&self) -> (usize, Client) {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed) % self.members.len();
        (i, self.members[i].1.clone())
    }

    /// After a failed call on member `i`: the next member becomes current.
    fn failed(&self, i: usize, e: &EtcdError) {
        if e.transient() || matches!(e, EtcdError::Client(_)) {
            let next = (i + 1) % self.members.len();
            if self
                .current
                .compare_exchange(
                    i,
                    next,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
            {
                tracing::info!(failed = %self.members[i].0, next = %self.members[next].0, error = %e, "switching etcd member");
            }
        }
    }

    /// Runs one call on the current member, switching members when it fails.
    async fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T, EtcdError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let (i, c) = self.pick();
        let r = deadline(what, f(c)).await;
        if let Err(e) = &r {
            self.failed(i, e);
        }
        r
    }

    /// The current member's client, for long-lived calls (election campaign, watch,
    /// lease keep-alive); a failure there should be reported with [`Etcd::stream_failed`].
    pub fn client(&self) -> Client {
        self.pick().1
    }

    /// A long-lived call on the current member failed: move on to the next member.
    pub fn stream_failed(&self) {
        let (i, _) = self.pick();
        self.failed(i, &EtcdError::Timeout("stream"));
    }

    /// Every object of `kind`, decoded; an undecodable one is an error (refuse, don't
    /// guess). Returns the store revision of the read too.
    pub async fn list<T: DeserializeOwned>(
        &self,
        kind: &str,
    ) -> Result<(Vec<Versioned<T>>, i64), EtcdError> {
        let prefix = super::model::kind_prefix(kind);
        let p = prefix.clone();
        let resp = self
            .call("list", |mut c| async move {
                c.get(p, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let name = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
            out.push(Versioned {
                value: decode(&key, kv.value())?,
                name,
                revision: kv.mod_revision(),
            });
        }
        Ok((out, rev))
    }

    /// Every object under the prefix, read at one revision: the agent and the leader
    /// decide from a consistent cut (a VM's node and its migration records read at two
    /// different instants could disagree).
    pub async fn snapshot(&self) -> Result<Snapshot, EtcdError> {
        let resp = self
            .call("read", |mut c| async move {
                c.get(PREFIX, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        Ok(Snapshot {
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            kvs: resp
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.value().to_vec(),
                        kv.mod_revision(),
                    )
                })
                .collect(),
        })
    }

    /// One object, if it exists.
    pub async fn get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, EtcdError> {
        let k = key.to_string();
        let resp = self
            .call("get", |mut c| async move { c.get(k, None).await })
            .await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some(Versioned {
                name: key.rsplit('/').next().unwrap_or(key).to_string(),
                value: decode(key, kv.value())?,
                revision: kv.mod_revision(),
            })),
        }
    }

    /// Applies `writes` atomically if every expected revision still holds and, with a
    /// guard, if the writer still leads. `Ok(false)`: something changed since it was read
    /// (or leadership was lost); nothing was written.
    pub async fn commit(
        &self,
        writes: Vec<Write>,
        guard: Option<&LeaderGuard>,
    ) -> Result<bool, EtcdError> {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        if let Some(g) = guard {
            compares.push(Compare::create_revision(
                g.key.clone(),
                CompareOp::Equal,
                g.revision,
            ));
        }
        for w in writes {
            match w {
                Write::Put {
                    key,
                    value,
                    expect,
                    lease,
                } => {
                    compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, expect));
                    let opts = lease.map(|l| PutOptions::new().with_lease(l));
                    ops.push(TxnOp::put(key, value, opts));
                }
                Write::Delete { key, expect } => {
                    compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, expect));
                    ops.push(TxnOp::delete(key, None));
                }
                Write::Absent { key } => {
                    compares.push(Compare::mod_revision(key, CompareOp::Equal, 0));
                }
            }
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let resp = self
            .call("txn", |mut c| async move { c.txn(txn).await })
            .await?;
        Ok(resp.succeeded())
    }

    /// A new lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        Ok(self
            .call("lease grant", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?
            .id())
    }
}

/// The whole cluster state at one revision.
pub struct Snapshot {
    /// The store revision of the read.
    pub revision: i64,
    kvs: Vec<(String, Vec<u8>, i64)>,
}

impl Snapshot {
    /// Every object of `kind`, decoded.
    pub fn list<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<Versioned<T>>, EtcdError> {
        let prefix = super::model::kind_prefix(kind);
        self.kvs
            .iter()
            .filter_map(|(k, v, rev)| {
                let name = k.strip_prefix(&prefix)?;
                Some(decode(k, v).map(|value| Versioned {
                    name: name.to_string(),
                    value,
                    revision: *rev,
                }))
            })
            .collect()
    }

    /// One object, if it exists.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<Versioned<T>>, EtcdError> {
        self.kvs
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(k, v, rev)| {
                decode(k, v).map(|value| Versioned {
                    name: k.rsplit('/').next().unwrap_or(k).to_string(),
                    value,
                    revision: *rev,
                })
            })
            .transpose()
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, EtcdError> {
    if bytes.len() > MAX_OBJECT_BYTES {
        return Err(EtcdError::TooLarge {
            key: key.to_string(),
            len: bytes.len(),
        });
    }
    serde_json::from_slice(bytes).map_err(|e| EtcdError::Decode {
        key: key.to_string(),
        error: e.to_string(),
    })
}

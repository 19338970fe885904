//! The launcher's control API (`launcher run --api-socket`): the body of every request
//! and reply, typed. The launcher parses requests into these types (an unknown field is
//! refused with HTTP 400) and noded and `launcher migrate` build them; neither writes
//! the JSON by hand.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Default longest acceptable pause of a migration, in milliseconds.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default time allowed per GiB of guest memory, in seconds (0 = never give up).
pub const DEFAULT_COMPLETION_TIMEOUT_PER_GIB_S: u64 = 150;
/// Default time allowed without progress, in seconds (0 = never give up).
pub const DEFAULT_PROGRESS_TIMEOUT_S: u64 = 150;
/// How much longer than the migration's own budget a driver waits for the report
/// (connection set-up, switch-over, the report itself).
pub const REPLY_MARGIN: Duration = Duration::from_secs(60);

/// The completion timeout of a guest of `memory_bytes` (whole GiB, at least one) at
/// `per_gib`: what the sender enforces (`migration::policy`) and what drivers wait for.
pub fn completion_timeout(memory_bytes: u64, per_gib: Duration) -> Duration {
    let gibs = u128::from(memory_bytes.div_ceil(1 << 30).max(1));
    let nanos = per_gib.as_nanos().saturating_mul(gibs);
    match u64::try_from(nanos / 1_000_000_000) {
        Ok(secs) => Duration::new(secs, (nanos % 1_000_000_000) as u32),
        Err(_) => Duration::MAX,
    }
}

/// Parses a request or reply body; an empty body is read as `{}` (so that types whose
/// fields all have defaults accept it). The error names the offending field.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Serialises a contract type for the wire (these types always serialise).
pub fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// What the launcher reports as the VM's state (`GET /v1/status`, field `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Guest code runs.
    Running,
    /// Paused through the API (or left paused by a migration whose outcome is unknown).
    Paused,
    /// A migration is under way (the guest runs until the switch-over).
    Migrating,
    /// Waiting for an incoming migration.
    Incoming,
}

impl Phase {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Migrating => "migrating",
            Phase::Incoming => "incoming",
        }
    }
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Status {
    /// The VM's state.
    pub state: Phase,
    /// The launcher's version.
    pub version: String,
    /// The launcher's pid.
    pub pid: u32,
    /// Versioned machine type (absent while waiting for an incoming VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
    /// Guest memory (absent while waiting for an incoming VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// vCPUs (absent while waiting for an incoming VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u8>,
}

/// `PUT /v1/migrate`: where and how to migrate. Absent limits take the defaults above.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MigrateRequest {
    /// Destination: `unix:PATH` or `tcp:HOST:PORT` (a launcher started with `--incoming`).
    pub to: String,
    /// Same host: hand guest memory (and TAPs) over as file descriptors.
    #[serde(default)]
    pub local: bool,
    /// Longest acceptable pause, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Bandwidth cap in bytes per second (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Throttle the vCPUs when the guest dirties memory faster than the link drains.
    #[serde(default)]
    pub auto_converge: bool,
    /// Give up after this many seconds per GiB of guest memory (0 = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_timeout_per_gib: Option<u64>,
    /// Give up after this many seconds without progress (0 = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_timeout: Option<u64>,
    /// TLS for a `tcp:` destination: an absolute directory with ca.pem, cert.pem, key.pem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<String>,
    /// The name the destination's certificate must carry (default: the HOST of `to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Plain, unauthenticated TCP to a `tcp:` destination.
    #[serde(default)]
    pub insecure: bool,
}

impl MigrateRequest {
    /// The downtime target, defaulted.
    pub fn downtime(&self) -> Duration {
        Duration::from_millis(self.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS))
    }

    /// The completion timeout per GiB, defaulted (zero: none).
    pub fn completion_timeout_per_gib(&self) -> Duration {
        Duration::from_secs(
            self.completion_timeout_per_gib
                .unwrap_or(DEFAULT_COMPLETION_TIMEOUT_PER_GIB_S),
        )
    }

    /// The progress timeout, defaulted (zero: none).
    pub fn progress_timeout(&self) -> Duration {
        Duration::from_secs(self.progress_timeout.unwrap_or(DEFAULT_PROGRESS_TIMEOUT_S))
    }

    /// The longest a migration of a guest of `memory_bytes` may take under these limits
    /// before the source gives up by itself: the completion timeout for its size (whole
    /// GiB, at least one) plus the progress timeout. `None` when there is no completion
    /// timeout. This is the one place the formula lives; the sender enforces the same
    /// limits (`migration::policy`).
    pub fn budget(&self, memory_bytes: u64) -> Option<Duration> {
        let per_gib = self.completion_timeout_per_gib();
        if per_gib.is_zero() {
            return None;
        }
        Some(completion_timeout(memory_bytes, per_gib).saturating_add(self.progress_timeout()))
    }

    /// How long a driver waits for the report of `PUT /v1/migrate`: the budget plus
    /// [`REPLY_MARGIN`]; `None` (wait for ever) when the migration has no budget.
    pub fn reply_timeout(&self, memory_bytes: u64) -> Option<Duration> {
        self.budget(memory_bytes)
            .map(|b| b.saturating_add(REPLY_MARGIN))
    }
}

/// `PUT /v1/migrate/limits`: change the limits of the migration in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsPatch {
    /// New bandwidth cap in bytes per second (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// New downtime target in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
}

/// `GET /v1/migrate`: progress of the migration in progress.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MigrationProgress {
    /// Whether a migration is in progress (the other fields only then).
    pub active: bool,
    /// Iteration just finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u64>,
    /// Bytes sent so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transferred_bytes: Option<u64>,
    /// Bytes dirty now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_bytes: Option<u64>,
    /// Measured stream throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Expected downtime if the switch-over happened now (absent: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_downtime_ms: Option<f64>,
    /// Current auto-converge throttle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_percent: Option<u8>,
}

impl MigrationProgress {
    /// The progress of an active migration after `p` (`None`: no iteration finished yet).
    pub fn active(p: Option<&crate::report::Progress>) -> Self {
        let Some(p) = p else {
            return Self {
                active: true,
                ..Self::default()
            };
        };
        Self {
            active: true,
            iteration: Some(p.iteration),
            transferred_bytes: Some(p.transferred_bytes),
            remaining_bytes: Some(p.remaining_bytes),
            bandwidth_bytes_per_s: Some(p.bandwidth_bytes_per_s),
            expected_downtime_ms: p
                .expected_downtime_ms
                .is_finite()
                .then_some(p.expected_downtime_ms),
            throttle_percent: Some(p.throttle_percent),
        }
    }
}

/// `PUT /v1/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SnapshotRequest {
    /// Absolute path of the snapshot file to write.
    pub path: String,
    /// Stop the VM after writing (the snapshot becomes its only continuation).
    #[serde(default)]
    pub stop: bool,
}

/// The answer to `PUT /v1/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SnapshotReply {
    /// The file written.
    pub path: String,
    /// Guest memory bytes written.
    pub memory_bytes: u64,
    /// Bytes of VM state written.
    pub state_bytes: u64,
}

/// The body of requests that take none (`pause`, `resume`, `migrate/cancel`,
/// `shutdown`) and of their replies: `{}`. Anything else in it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Every error reply: HTTP 4xx/5xx with `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// What went wrong and what to do.
    pub error: String,
}

/// A `{min, max}` range of format versions, both ends inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    /// Oldest accepted.
    pub min: u64,
    /// Newest accepted.
    pub max: u64,
}

impl Range {
    /// Whether `v` is in the range.
    pub fn contains(&self, v: u64) -> bool {
        self.min <= v && v <= self.max
    }
}

/// What `launcher capabilities` prints: what this launcher's receiver and snapshot
/// loader accept. The launcher builds it from the same values its receiver and loader
/// check, so what it advertises is what it enforces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Capabilities {
    /// The launcher's version.
    pub version: String,
    /// Machine types, preferred first.
    pub machine_types: Vec<String>,
    /// Migration protocol versions it speaks.
    pub migration_protocol: Range,
    /// Snapshot formats it reads.
    pub snapshot_format: Range,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_request_round_trips_and_defaults() {
        let r = MigrateRequest {
            to: "unix:/run/m.sock".into(),
            local: true,
            downtime_ms: Some(50),
            tls_dir: Some("/etc/tls".into()),
            ..MigrateRequest::default()
        };
        let v = to_json(&r);
        assert_eq!(v["downtimeMs"], 50);
        assert_eq!(v["tlsDir"], "/etc/tls");
        assert!(v.get("maxBandwidth").is_none());
        let back: MigrateRequest = parse_body(v.to_string().as_bytes()).unwrap();
        assert_eq!(back, r);
        let min: MigrateRequest = parse_body(br#"{"to": "unix:/x"}"#).unwrap();
        assert_eq!(min.downtime(), Duration::from_millis(300));
        assert_eq!(min.progress_timeout(), Duration::from_secs(150));
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused_by_name() {
        let e =
            parse_body::<MigrateRequest>(br#"{"to": "unix:/x", "downtime_ms": 5}"#).unwrap_err();
        assert!(e.contains("unknown field `downtime_ms`"), "{e}");
        let e = parse_body::<MigrateRequest>(br#"{"to": "unix:/x", "local": "yes"}"#).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let e = parse_body::<MigrateRequest>(b"").unwrap_err();
        assert!(e.contains("missing field `to`"), "{e}");
        let e = parse_body::<LimitsPatch>(br#"{"bandwidth": 1}"#).unwrap_err();
        assert!(e.contains("unknown field `bandwidth`"), "{e}");
        assert!(parse_body::<Empty>(b"").is_ok());
        assert!(parse_body::<Empty>(b"{}").is_ok());
        assert!(parse_body::<Empty>(br#"{"force": true}"#).is_err());
        let e = parse_body::<SnapshotRequest>(br#"{"path": "/s", "Stop": true}"#).unwrap_err();
        assert!(e.contains("unknown field `Stop`"), "{e}");
    }

    #[test]
    fn the_timeout_formula() {
        let r = MigrateRequest {
            to: "unix:/x".into(),
            completion_timeout_per_gib: Some(10),
            progress_timeout: Some(5),
            ..MigrateRequest::default()
        };
        // 64 MiB counts as one GiB; 3 GiB + 1 byte as four.
        assert_eq!(r.budget(64 << 20), Some(Duration::from_secs(15)));
        assert_eq!(r.budget((3 << 30) + 1), Some(Duration::from_secs(45)));
        assert_eq!(r.reply_timeout(1 << 30), Some(Duration::from_secs(75)));
        let never = MigrateRequest {
            completion_timeout_per_gib: Some(0),
            ..r
        };
        assert_eq!(never.reply_timeout(1 << 30), None);
    }

    #[test]
    fn status_and_progress_round_trip() {
        let s = Status {
            state: Phase::Paused,
            version: "1.2.3".into(),
            pid: 7,
            machine_type: Some("q35-1.0".into()),
            memory_bytes: Some(64 << 20),
            vcpus: Some(2),
        };
        let v = to_json(&s);
        assert_eq!(v["state"], "paused");
        assert_eq!(v["machineType"], "q35-1.0");
        assert_eq!(serde_json::from_value::<Status>(v).unwrap(), s);
        let bad = serde_json::json!({"state": "sleeping", "version": "1", "pid": 1});
        assert!(serde_json::from_value::<Status>(bad).is_err());
        let p = crate::report::Progress {
            iteration: 3,
            transferred_bytes: 10,
            remaining_bytes: 2,
            bandwidth_bytes_per_s: 5,
            expected_downtime_ms: f64::INFINITY,
            throttle_percent: 0,
        };
        let v = to_json(&MigrationProgress::active(Some(&p)));
        assert_eq!(v["iteration"], 3);
        assert!(v.get("expectedDowntimeMs").is_none());
        assert_eq!(
            to_json(&MigrationProgress::default()),
            serde_json::json!({"active": false})
        );
    }
}

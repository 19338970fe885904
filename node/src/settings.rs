//! Node settings for the update coordinator, with KubeVirt's names and defaults.
//!
//! Settings are changed by *merging* a partial document (YAML or JSON) into the current
//! settings: keys that are not given keep their value. Unknown keys are refused with their
//! full dotted path, because a misspelt setting that is silently ignored is how an
//! operator ends up with updates that never happen.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

use super::launchers::Channel;

/// Why a settings document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The document is not YAML/JSON or not a mapping.
    #[error("invalid settings: {0}")]
    Syntax(String),
    /// A key that no setting has.
    #[error("unknown setting `{0}`")]
    Unknown(String),
    /// A known key with a bad value.
    #[error("invalid setting `{key}`: {reason}")]
    Invalid {
        /// Dotted path.
        key: String,
        /// Why.
        reason: String,
    },
}

/// How outdated workloads may be updated (KubeVirt `workloadUpdateMethods` entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkloadUpdateMethod {
    /// Live-migrate to a launcher of the target version.
    LiveMigrate,
    /// Stop (gracefully, then forcibly) and restart per runStrategy.
    Evict,
}

/// KubeVirt `approvalStrategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ApprovalStrategy {
    /// A newly installed launcher becomes the target at once.
    #[default]
    Automatic,
    /// A newly installed launcher waits for `nodectl update approve`.
    Manual,
}

/// A Go-style duration such as `1m0s`, `30s`, `1h`, `500ms`, kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    /// Parses `1h2m3s`, `1m0s`, `500ms`, `0s`, `1.5s` (jiff's friendly duration
    /// format, which reads Go's spelling); at most a year.
    pub fn parse(s: &str) -> Option<GoDuration> {
        let s = s.trim();
        if s == "0" {
            return Some(GoDuration(Duration::ZERO));
        }
        let d: jiff::SignedDuration = s.parse().ok()?;
        let d = Duration::try_from(d).ok()?;
        (d <= Duration::from_secs(366 * 86400)).then_some(GoDuration(d))
    }

    /// Formats like Go does for whole seconds: `1m0s`, `30s`, `1h0m0s`.
    pub fn format(&self) -> String {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            return format!("{ms}ms");
        }
        let s = ms / 1000;
        let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
        if h > 0 {
            format!("{h}h{m}m{s}s")
        } else if m > 0 {
            format!("{m}m{s}s")
        } else {
            format!("{s}s")
        }
    }
}

impl Serialize for GoDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.format())
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        GoDuration::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("{s:?} is not a duration (e.g. 1m0s, 30s, 500ms)"))
        })
    }
}

/// `workloadUpdateStrategy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadUpdateStrategy {
    /// Allowed methods; `[]` pauses workload updates.
    pub workload_update_methods: Vec<WorkloadUpdateMethod>,
    /// Evictions per batch window (Evict only).
    pub batch_eviction_size: u32,
    /// Batch window length (Evict only).
    pub batch_eviction_interval: GoDuration,
}

/// `liveMigrationConfig`, plus extensions marked as such.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LiveMigrationConfig {
    /// Concurrent outgoing migrations on this node.
    pub parallel_migrations_per_node: u32,
    /// Bytes per second; 0 = unlimited. Accepts quantities ("64Mi") on input.
    pub bandwidth_per_migration: u64,
    /// Seconds per GiB of guest memory before a migration is aborted.
    #[serde(rename = "completionTimeoutPerGiB")]
    pub completion_timeout_per_gib: u64,
    /// Seconds without progress before a migration is aborted.
    pub progress_timeout: u64,
    /// Throttle vCPUs of guests that dirty memory faster than it is sent.
    pub allow_auto_converge: bool,
    /// Target downtime of the switch-over, in milliseconds.
    pub downtime_target_ms: u64,
    /// Extension: base of the exponential retry backoff after a failed migration (s).
    pub retry_backoff_base_seconds: u64,
    /// Extension: cap of that backoff (s).
    pub retry_backoff_max_seconds: u64,
    /// Extension: how long a target launcher may take to be ready for the incoming stream.
    pub target_ready_timeout_seconds: u64,
}

/// All node settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSettings {
    /// See [`WorkloadUpdateStrategy`].
    pub workload_update_strategy: WorkloadUpdateStrategy,
    /// See [`LiveMigrationConfig`].
    pub live_migration_config: LiveMigrationConfig,
    /// See [`ApprovalStrategy`].
    pub approval_strategy: ApprovalStrategy,
    /// The release channel this node follows (settings from before channels: stable).
    #[serde(default)]
    pub channel: Channel,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            workload_update_strategy: WorkloadUpdateStrategy {
                workload_update_methods: vec![WorkloadUpdateMethod::LiveMigrate],
                batch_eviction_size: 10,
                batch_eviction_interval: GoDuration(Duration::from_secs(60)),
            },
            live_migration_config: LiveMigrationConfig {
                parallel_migrations_per_node: 2,
                bandwidth_per_migration: 0,
                // The launcher's defaults, so that noded and `launcher migrate` agree.
                completion_timeout_per_gib:
                    contracts::launcher::DEFAULT_COMPLETION_TIMEOUT_PER_GIB_S,
                progress_timeout: contracts::launcher::DEFAULT_PROGRESS_TIMEOUT_S,
                allow_auto_converge: false,
                downtime_target_ms: contracts::launcher::DEFAULT_DOWNTIME_MS,
                retry_backoff_base_seconds: 20,
                retry_backoff_max_seconds: 300,
                target_ready_timeout_seconds: 30,
            },
            approval_strategy: ApprovalStrategy::Automatic,
            channel: Channel::Stable,
        }
    }
}

impl NodeSettings {
    /// Whether a method is enabled.
    pub fn allows(&self, m: WorkloadUpdateMethod) -> bool {
        self.workload_update_strategy
            .workload_update_methods
            .contains(&m)
    }

    /// The settings as JSON (never fails for this plain structure).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Returns these settings with a partial JSON document merged in.
    pub fn merged(&self, patch: &Value) -> Result<NodeSettings, SettingsError> {
        if patch.is_null() {
            return Ok(self.clone());
        }
        if !patch.is_object() {
            return Err(SettingsError::Syntax("settings must be a mapping".into()));
        }
        let mut current = self.to_json();
        merge(&mut current, patch, "")?;
        // Each leaf is checked separately so that an error names its key.
        check_leaves(&current)?;
        serde_json::from_value(current).map_err(|e| SettingsError::Syntax(e.to_string()))
    }
}

/// Merges `patch` into `target`, refusing keys the target does not have.
fn merge(target: &mut Value, patch: &Value, path: &str) -> Result<(), SettingsError> {
    let (Value::Object(t), Value::Object(p)) = (&mut *target, patch) else {
        *target = patch.clone();
        return Ok(());
    };
    for (k, v) in p {
        let key = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let Some(slot) = t.get_mut(k) else {
            return Err(SettingsError::Unknown(key));
        };
        if slot.is_object() && !v.is_object() {
            return Err(SettingsError::Invalid {
                key,
                reason: "must be a mapping".into(),
            });
        }
        merge(slot, v, &key)?;
    }
    Ok(())
}

/// Validates the leaves whose type serde alone would report without their path.
fn check_leaves(v: &Value) -> Result<(), SettingsError> {
    let bad = |key: &str, reason: String| SettingsError::Invalid {
        key: key.into(),
        reason,
    };
    let w = &v["workloadUpdateStrategy"];
    let methods = &w["workloadUpdateMethods"];
    let list = methods.as_array().ok_or_else(|| {
        bad(
            "workloadUpdateStrategy.workloadUpdateMethods",
            "must be a list".into(),
        )
    })?;
    for m in list {
        serde_json::from_value::<WorkloadUpdateMethod>(m.clone()).map_err(|_| {
            bad(
                "workloadUpdateStrategy.workloadUpdateMethods",
                format!("{m} is not LiveMigrate or Evict"),
            )
        })?;
    }
    let uint = |key: &str, val: &Value, min: u64| -> Result<(), SettingsError> {
        match val.as_u64() {
            Some(n) if n >= min => Ok(()),
            _ => Err(bad(key, format!("{val} must be an integer >= {min}"))),
        }
    };
    uint(
        "workloadUpdateStrategy.batchEvictionSize",
        &w["batchEvictionSize"],
        1,
    )?;
    if let Some(s) = w["batchEvictionInterval"].as_str() {
        GoDuration::parse(s).ok_or_else(|| {
            bad(
                "workloadUpdateStrategy.batchEvictionInterval",
                format!("{s:?} is not a duration (e.g. 1m0s, 30s)"),
            )
        })?;
    } else {
        return Err(bad(
            "workloadUpdateStrategy.batchEvictionInterval",
            "must be a duration string such as 1m0s".into(),
        ));
    }
    let l = &v["liveMigrationConfig"];
    for (k, min) in [
        ("parallelMigrationsPerNode", 1),
        ("completionTimeoutPerGiB", 1),
        ("progressTimeout", 1),
        ("downtimeTargetMs", 1),
        ("retryBackoffBaseSeconds", 0),
        ("retryBackoffMaxSeconds", 0),
        ("targetReadyTimeoutSeconds", 1),
    ] {
        uint(&format!("liveMigrationConfig.{k}"), &l[k], min)?;
    }
    if !l["allowAutoConverge"].is_boolean() {
        return Err(bad(
            "liveMigrationConfig.allowAutoConverge",
            "must be true or false".into(),
        ));
    }
    let a = &v["approvalStrategy"];
    serde_json::from_value::<ApprovalStrategy>(a.clone()).map_err(|_| {
        bad(
            "approvalStrategy",
            format!("{a} is not Automatic or Manual"),
        )
    })?;
    let c = &v["channel"];
    if c.as_str().and_then(Channel::parse).is_none() {
        return Err(bad(
            "channel",
            format!("unknown channel {c} (use {})", Channel::NAMES.join(" or ")),
        ));
    }
    Ok(())
}

/// Normalizes `bandwidthPerMigration` given as a quantity string into bytes before merging.
pub fn normalize_patch(mut patch: Value) -> Result<Value, SettingsError> {
    if let Some(b) = patch
        .get_mut("liveMigrationConfig")
        .and_then(|l| l.get_mut("bandwidthPerMigration"))
    {
        if let Value::String(s) = &*b {
            let n = super::spec::parse_quantity(s).map_err(|e| SettingsError::Invalid {
                key: "liveMigrationConfig.bandwidthPerMigration".into(),
                reason: e.to_string(),
            })?;
            *b = Value::from(n);
        } else if !b.is_u64() {
            return Err(SettingsError::Invalid {
                key: "liveMigrationConfig.bandwidthPerMigration".into(),
                reason: format!("{b} must be a quantity (e.g. 64Mi, 0)"),
            });
        }
    }
    Ok(patch)
}

/// Parses a settings document (YAML/JSON) and merges it into `base`.
pub fn apply_text(base: &NodeSettings, text: &str) -> Result<NodeSettings, SettingsError> {
    let patch: Value =
        serde_norway::from_str(text).map_err(|e| SettingsError::Syntax(e.to_string()))?;
    apply(base, patch)
}

/// Merges a JSON patch into `base` (quantities normalized first).
pub fn apply(base: &NodeSettings, patch: Value) -> Result<NodeSettings, SettingsError> {
    base.merged(&normalize_patch(patch)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_kubevirts() {
        let d = NodeSettings::default();
        let j = d.to_json();
        assert_eq!(
            j["workloadUpdateStrategy"]["workloadUpdateMethods"],
            serde_json::json!(["LiveMigrate"])
        );
        assert_eq!(j["workloadUpdateStrategy"]["batchEvictionSize"], 10);
        assert_eq!(j["workloadUpdateStrategy"]["batchEvictionInterval"], "1m0s");
        assert_eq!(j["liveMigrationConfig"]["parallelMigrationsPerNode"], 2);
        assert_eq!(j["liveMigrationConfig"]["completionTimeoutPerGiB"], 150);
        assert_eq!(j["liveMigrationConfig"]["progressTimeout"], 150);
        assert_eq!(j["liveMigrationConfig"]["allowAutoConverge"], false);
        assert_eq!(j["approvalStrategy"], "Automatic");
        assert_eq!(j["channel"], "stable");
        let back: NodeSettings = serde_json::from_value(j).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn merge_keeps_unset_keys() {
        let d = NodeSettings::default();
        let s = apply_text(&d, "workloadUpdateStrategy:\n  workloadUpdateMethods: []\n").unwrap();
        assert!(s
            .workload_update_strategy
            .workload_update_methods
            .is_empty());
        assert_eq!(s.workload_update_strategy.batch_eviction_size, 10);
        let s = apply_text(
            &s,
            "{\"workloadUpdateStrategy\": {\"workloadUpdateMethods\": [\"LiveMigrate\", \"Evict\"], \"batchEvictionInterval\": \"2s\"}, \"liveMigrationConfig\": {\"bandwidthPerMigration\": \"64Mi\"}, \"approvalStrategy\": \"Manual\"}",
        )
        .unwrap();
        assert!(s.allows(WorkloadUpdateMethod::Evict));
        assert_eq!(
            s.workload_update_strategy.batch_eviction_interval.0,
            Duration::from_secs(2)
        );
        assert_eq!(s.live_migration_config.bandwidth_per_migration, 64 << 20);
        assert_eq!(s.approval_strategy, ApprovalStrategy::Manual);
    }

    #[test]
    fn refuses_unknown_and_bad_values() {
        let d = NodeSettings::default();
        let e = apply_text(
            &d,
            "liveMigrationConfig:\n  parallelMigrationsPerCluster: 5\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown setting `liveMigrationConfig.parallelMigrationsPerCluster`"
        );
        assert!(matches!(apply_text(&d, "foo: 1"), Err(SettingsError::Unknown(k)) if k == "foo"));
        let e = apply_text(
            &d,
            "workloadUpdateStrategy: {workloadUpdateMethods: [Reboot]}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("workloadUpdateMethods"), "{e}");
        let e =
            apply_text(&d, "workloadUpdateStrategy: {batchEvictionInterval: soon}").unwrap_err();
        assert!(e.to_string().contains("batchEvictionInterval"), "{e}");
        let e = apply_text(&d, "workloadUpdateStrategy: {batchEvictionSize: 0}").unwrap_err();
        assert!(e.to_string().contains("batchEvictionSize"), "{e}");
        let e = apply_text(&d, "approvalStrategy: Sometimes").unwrap_err();
        assert!(e.to_string().contains("approvalStrategy"), "{e}");
        let e = apply_text(&d, "channel: beta").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid setting `channel`: unknown channel \"beta\" (use stable or candidate)"
        );
        assert_eq!(
            apply_text(&d, "channel: candidate").unwrap().channel,
            Channel::Candidate
        );
        let e = apply_text(&d, "liveMigrationConfig: 3").unwrap_err();
        assert!(e.to_string().contains("must be a mapping"), "{e}");
        assert!(apply_text(&d, "[").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            GoDuration::parse("1m0s").unwrap().0,
            Duration::from_secs(60)
        );
        assert_eq!(
            GoDuration::parse("1h30m").unwrap().0,
            Duration::from_secs(5400)
        );
        assert_eq!(
            GoDuration::parse("500ms").unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            GoDuration::parse("1.5s").unwrap().0,
            Duration::from_millis(1500)
        );
        assert!(GoDuration::parse("5").is_none());
        assert!(GoDuration::parse("s").is_none());
        assert!(GoDuration::parse("3d").is_none());
        assert_eq!(GoDuration(Duration::from_secs(60)).format(), "1m0s");
        assert_eq!(GoDuration(Duration::from_secs(3)).format(), "3s");
    }
}

//! Metrics for `GET /metrics` (on the API socket, and over TCP with
//! `noded --metrics-address`), in the OpenMetrics text format through the
//! `prometheus-client` crate. Units are seconds and bytes; every phase and outcome has
//! a series from the start (zero-valued), so that alerts and rates work on a fresh node.
//!
//! - `noded_build_info{version}` — 1;
//! - `noded_vmi_number_of_outdated` — KubeVirt's `kubevirt_vmi_number_of_outdated`;
//! - `noded_vms{phase}`, `noded_launchers_installed`, `noded_update_approval_pending`,
//!   `noded_node_degraded`;
//! - `noded_migrations_total{outcome}`, `noded_migration_duration_seconds{outcome}`
//!   (histogram), `noded_migration_transferred_bytes_total{outcome}`,
//!   `noded_migration_downtime_seconds` (histogram, completed migrations);
//! - `noded_evictions_total`, `noded_launcher_starts_total`, `noded_launcher_crashes_total`;
//! - in a cluster only: `noded_cluster_connected`, `noded_cluster_leader`.
//!
//! `deploy/prometheus/noded-rules.yaml` alerts on these; a test checks that every
//! metric name it uses is one this module exports ([`METRIC_NAMES`]).

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Every phase a VM can show (`VmState::phase`).
pub const PHASES: &[&str] = &[
    "Stopped",
    "Starting",
    "CrashLoopBackOff",
    "Running",
    "Migrating",
    "MigratingOut",
    "Receiving",
    "MovedAway",
    "Fenced",
    "Evicting",
    "Stopping",
];

/// Every migration outcome.
pub const OUTCOMES: &[&str] = &["Succeeded", "Failed", "Cancelled"];

/// The names of the exported series (as Prometheus sees them), for the rules test.
pub const METRIC_NAMES: &[&str] = &[
    "noded_build_info",
    "noded_vmi_number_of_outdated",
    "noded_vms",
    "noded_launchers_installed",
    "noded_update_approval_pending",
    "noded_node_degraded",
    "noded_migrations_total",
    "noded_migration_duration_seconds",
    "noded_migration_transferred_bytes_total",
    "noded_migration_downtime_seconds",
    "noded_evictions_total",
    "noded_launcher_starts_total",
    "noded_launcher_crashes_total",
];

/// Upper bounds (seconds) of the downtime histogram: 1 ms to 5 s.
const DOWNTIME_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Upper bounds (seconds) of the migration duration histogram: 50 ms to 10 min.
const DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

/// Counters kept by the reconciliation loop (reset when noded restarts, as Prometheus
/// counters may be).
#[derive(Debug, Clone)]
pub struct Counters {
    migrations: Family<OutcomeLabel, Counter>,
    duration: Family<OutcomeLabel, Histogram>,
    transferred: Family<OutcomeLabel, Counter>,
    downtime: Histogram,
    /// Evictions started.
    pub evictions: Counter,
    /// Launcher starts (boots and restarts).
    pub starts: Counter,
    /// Launchers that ended with a failure.
    pub crashes: Counter,
}

impl Default for Counters {
    fn default() -> Self {
        let c = Counters {
            migrations: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS.iter().copied())
            }),
            transferred: Family::default(),
            downtime: Histogram::new(DOWNTIME_BUCKETS.iter().copied()),
            evictions: Counter::default(),
            starts: Counter::default(),
            crashes: Counter::default(),
        };
        for o in OUTCOMES {
            let l = OutcomeLabel {
                outcome: o.to_string(),
            };
            let _ = c.migrations.get_or_create(&l);
            let _ = c.duration.get_or_create(&l);
            let _ = c.transferred.get_or_create(&l);
        }
        c
    }
}

/// What one finished migration contributes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MigrationFigures {
    /// Pause in milliseconds (completed migrations).
    pub downtime_ms: Option<f64>,
    /// Total time in milliseconds.
    pub total_ms: Option<f64>,
    /// Bytes sent.
    pub transferred_bytes: Option<u64>,
}

impl MigrationFigures {
    /// Reads the figures from a launcher's migration report, in either naming (the
    /// report moves from snake_case to camelCase).
    pub fn from_report(report: &serde_json::Value) -> Self {
        let f = |snake: &str, camel: &str| report[snake].as_f64().or(report[camel].as_f64());
        MigrationFigures {
            downtime_ms: f("downtime_ms", "downtimeMs"),
            total_ms: f("total_ms", "totalMs"),
            transferred_bytes: report["transferred_bytes"]
                .as_u64()
                .or(report["transferredBytes"].as_u64()),
        }
    }
}

impl Counters {
    /// Records a finished migration.
    pub fn migration(&mut self, outcome: &str, figures: MigrationFigures) {
        let l = OutcomeLabel {
            outcome: outcome.to_string(),
        };
        self.migrations.get_or_create(&l).inc();
        if let Some(t) = figures.total_ms.filter(|t| t.is_finite() && *t >= 0.0) {
            self.duration.get_or_create(&l).observe(t / 1000.0);
        }
        if let Some(b) = figures.transferred_bytes {
            self.transferred.get_or_create(&l).inc_by(b);
        }
        if outcome == "Succeeded" {
            if let Some(d) = figures.downtime_ms.filter(|d| d.is_finite() && *d >= 0.0) {
                self.downtime.observe(d / 1000.0);
            }
        }
    }
}

/// Gauges computed from the current state.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Outdated VMs.
    pub outdated: usize,
    /// VMs per phase.
    pub phases: BTreeMap<String, usize>,
    /// Installed launcher versions.
    pub launchers: usize,
    /// Approval pending (0/1).
    pub approval_pending: bool,
    /// The node's Degraded condition.
    pub degraded: bool,
    /// In a cluster: (etcd reachable with quorum, this node leads).
    pub cluster: Option<(bool, bool)>,
}

fn gauge(v: usize) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    g
}

/// Renders everything in the OpenMetrics text format.
pub fn render(c: &Counters, g: &Gauges) -> String {
    let mut r = Registry::default();
    let build = Family::<VersionLabel, Gauge>::default();
    build
        .get_or_create(&VersionLabel {
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .set(1);
    r.register("noded_build_info", "noded's version (always 1)", build);
    r.register(
        "noded_vmi_number_of_outdated",
        "VMs whose launcher is older than the target",
        gauge(g.outdated),
    );
    let phases = Family::<PhaseLabel, Gauge>::default();
    for p in PHASES {
        let n = g.phases.get(*p).copied().unwrap_or(0);
        phases
            .get_or_create(&PhaseLabel {
                phase: p.to_string(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register("noded_vms", "VMs by phase", phases);
    r.register(
        "noded_launchers_installed",
        "Installed launcher versions",
        gauge(g.launchers),
    );
    r.register(
        "noded_update_approval_pending",
        "1 while a new launcher waits for approval",
        gauge(usize::from(g.approval_pending)),
    );
    r.register(
        "noded_node_degraded",
        "1 while the node's Degraded condition is True (VMs failing or retrying)",
        gauge(usize::from(g.degraded)),
    );
    r.register(
        "noded_migrations",
        "Finished migrations by outcome",
        c.migrations.clone(),
    );
    r.register_with_unit(
        "noded_migration_duration",
        "Duration of finished migrations by outcome",
        Unit::Seconds,
        c.duration.clone(),
    );
    r.register_with_unit(
        "noded_migration_transferred",
        "Bytes sent by finished migrations by outcome",
        Unit::Bytes,
        c.transferred.clone(),
    );
    r.register_with_unit(
        "noded_migration_downtime",
        "Pause of completed migrations",
        Unit::Seconds,
        c.downtime.clone(),
    );
    r.register(
        "noded_evictions",
        "Evictions for updates",
        c.evictions.clone(),
    );
    r.register(
        "noded_launcher_starts",
        "Launchers started for boots and restarts",
        c.starts.clone(),
    );
    r.register(
        "noded_launcher_crashes",
        "Launchers that ended with a failure",
        c.crashes.clone(),
    );
    if let Some((connected, leading)) = g.cluster {
        r.register(
            "noded_cluster_connected",
            "Whether this node reaches a quorate etcd cluster (1) or not (0); without it the cluster makes no new decision, and running VMs keep running",
            gauge(usize::from(connected)),
        );
        r.register(
            "noded_cluster_leader",
            "Whether this node leads the cluster",
            gauge(usize::from(leading)),
        );
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

/// Serves `GET /metrics` (and nothing else) over TCP, for a Prometheus that cannot
/// reach the Unix socket.
pub async fn serve_tcp(listener: tokio::net::TcpListener, state: super::api::ApiState) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(
                |axum::extract::State(s): axum::extract::State<super::api::ApiState>| async move {
                    super::api::reply(super::api::ask(&s.cmds, super::requests::Req::Metrics).await)
                },
            ),
        )
        .with_state(state);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics listener failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_exist_from_the_start_in_seconds() {
        let mut c = Counters::default();
        let fresh = render(&c, &Gauges::default());
        for name in METRIC_NAMES {
            assert!(fresh.contains(name), "{name} missing:\n{fresh}");
        }
        assert!(
            fresh.contains("noded_vms{phase=\"CrashLoopBackOff\"} 0\n"),
            "{fresh}"
        );
        assert!(
            fresh.contains("noded_migrations_total{outcome=\"Failed\"} 0\n"),
            "{fresh}"
        );
        assert!(fresh.contains("noded_build_info{version=\""), "{fresh}");
        c.migration(
            "Succeeded",
            MigrationFigures::from_report(&serde_json::json!({
                "downtime_ms": 3.0, "total_ms": 400.0, "transferred_bytes": 1000
            })),
        );
        c.migration(
            "Succeeded",
            MigrationFigures::from_report(&serde_json::json!({
                "downtimeMs": 40.0, "totalMs": 2000.0, "transferredBytes": 24
            })),
        );
        c.migration("Failed", MigrationFigures::default());
        let text = render(
            &c,
            &Gauges {
                outdated: 2,
                ..Default::default()
            },
        );
        assert!(text.contains("noded_vmi_number_of_outdated 2\n"), "{text}");
        assert!(
            !text.contains("noded_cluster_connected"),
            "single node: no cluster series"
        );
        let in_cluster = render(
            &c,
            &Gauges {
                cluster: Some((true, false)),
                ..Default::default()
            },
        );
        assert!(
            in_cluster.contains("noded_cluster_connected 1\n"),
            "{in_cluster}"
        );
        assert!(
            in_cluster.contains("noded_cluster_leader 0\n"),
            "{in_cluster}"
        );
        assert!(
            in_cluster.trim_end().ends_with("# EOF"),
            "one exposition, EOF last"
        );
        assert!(text.contains("noded_migrations_total{outcome=\"Succeeded\"} 2\n"));
        assert!(text.contains("noded_migrations_total{outcome=\"Failed\"} 1\n"));
        assert!(
            text.contains("noded_migration_downtime_seconds_bucket{le=\"0.002\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("noded_migration_downtime_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("noded_migration_downtime_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(
            text.contains("noded_migration_downtime_seconds_sum 0.043"),
            "{text}"
        );
        assert!(
            text.contains("noded_migration_transferred_bytes_total{outcome=\"Succeeded\"} 1024\n")
        );
        assert!(
            text.contains(
                "noded_migration_duration_seconds_bucket{le=\"2.5\",outcome=\"Succeeded\"} 2\n"
            ),
            "{text}"
        );
    }

    fn rules_text() -> String {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/prometheus/noded-rules.yaml"
        );
        std::fs::read_to_string(path).expect("deploy/prometheus/noded-rules.yaml")
    }

    #[test]
    fn alert_rules_use_exported_metrics() {
        let text = rules_text();
        let doc: serde_json::Value = serde_norway::from_str(&text).expect("rules are YAML");
        let rendered = render(&Counters::default(), &Gauges::default());
        let mut used = 0;
        for rule in doc["groups"][0]["rules"].as_array().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(i) = rest.find("noded_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    METRIC_NAMES.contains(&base),
                    "rule {} uses {name}, which noded does not export",
                    rule["alert"]
                );
                assert!(rendered.contains(&name), "{name} is not in the output");
                used += 1;
            }
        }
        assert!(used >= 4, "the rules use {used} noded metrics");
    }

    /// `promtool check rules` (Debian's `prometheus` package; CI installs it).
    #[test]
    fn promtool_accepts_the_rules() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/prometheus/noded-rules.yaml"
        );
        let out = match std::process::Command::new("promtool")
            .args(["check", "rules", path])
            .output()
        {
            Ok(o) => o,
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipping: promtool not installed ({e}); apt-get install prometheus");
                return;
            }
            Err(e) => panic!("promtool is required in CI: {e}"),
        };
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

//! Prometheus text-format metrics for `GET /metrics`: the outdated-VM gauge users know
//! from KubeVirt (`kubevirt_vmi_number_of_outdated`, here `noded_vmi_number_of_outdated`),
//! migrations by outcome, a downtime histogram, evictions and restarts.

use std::collections::BTreeMap;
use std::fmt::Write;

/// Upper bounds (ms) of the downtime histogram buckets.
pub const DOWNTIME_BUCKETS_MS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// Counters kept by the reconciliation loop (reset when noded restarts, as Prometheus
/// counters may be).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Finished migrations by outcome.
    pub migrations: BTreeMap<String, u64>,
    /// Downtime histogram bucket counts (same length as [`DOWNTIME_BUCKETS_MS`]).
    pub downtime_buckets: Vec<u64>,
    /// Sum of observed downtimes (ms).
    pub downtime_sum_ms: f64,
    /// Number of observed downtimes.
    pub downtime_count: u64,
    /// Evictions started.
    pub evictions: u64,
    /// Launcher starts (boots and restarts).
    pub starts: u64,
}

impl Counters {
    /// Records a finished migration.
    pub fn migration(&mut self, outcome: &str, downtime_ms: Option<f64>) {
        *self.migrations.entry(outcome.to_string()).or_default() += 1;
        if let Some(d) = downtime_ms.filter(|d| d.is_finite() && *d >= 0.0) {
            if self.downtime_buckets.len() != DOWNTIME_BUCKETS_MS.len() {
                self.downtime_buckets = vec![0; DOWNTIME_BUCKETS_MS.len()];
            }
            for (i, b) in DOWNTIME_BUCKETS_MS.iter().enumerate() {
                if d <= *b {
                    self.downtime_buckets[i] += 1;
                }
            }
            self.downtime_sum_ms += d;
            self.downtime_count += 1;
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
}

/// Renders everything in the Prometheus text exposition format.
pub fn render(c: &Counters, g: &Gauges) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# HELP noded_vmi_number_of_outdated VMs whose launcher is older than the newest installed.");
    let _ = writeln!(o, "# TYPE noded_vmi_number_of_outdated gauge");
    let _ = writeln!(o, "noded_vmi_number_of_outdated {}", g.outdated);
    let _ = writeln!(o, "# HELP noded_vms VMs by phase.");
    let _ = writeln!(o, "# TYPE noded_vms gauge");
    for (p, n) in &g.phases {
        let _ = writeln!(o, "noded_vms{{phase=\"{p}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP noded_launchers_installed Installed launcher versions."
    );
    let _ = writeln!(o, "# TYPE noded_launchers_installed gauge");
    let _ = writeln!(o, "noded_launchers_installed {}", g.launchers);
    let _ = writeln!(
        o,
        "# HELP noded_update_approval_pending 1 while a new launcher waits for approval."
    );
    let _ = writeln!(o, "# TYPE noded_update_approval_pending gauge");
    let _ = writeln!(
        o,
        "noded_update_approval_pending {}",
        u8::from(g.approval_pending)
    );
    let _ = writeln!(
        o,
        "# HELP noded_migrations_total Finished migrations by outcome."
    );
    let _ = writeln!(o, "# TYPE noded_migrations_total counter");
    for outcome in ["Succeeded", "Failed", "Cancelled"] {
        let n = c.migrations.get(outcome).copied().unwrap_or(0);
        let _ = writeln!(o, "noded_migrations_total{{outcome=\"{outcome}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP noded_migration_downtime_milliseconds Downtime of completed migrations."
    );
    let _ = writeln!(o, "# TYPE noded_migration_downtime_milliseconds histogram");
    for (i, b) in DOWNTIME_BUCKETS_MS.iter().enumerate() {
        let n = c.downtime_buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(
            o,
            "noded_migration_downtime_milliseconds_bucket{{le=\"{b}\"}} {n}"
        );
    }
    let _ = writeln!(
        o,
        "noded_migration_downtime_milliseconds_bucket{{le=\"+Inf\"}} {}",
        c.downtime_count
    );
    let _ = writeln!(
        o,
        "noded_migration_downtime_milliseconds_sum {}",
        c.downtime_sum_ms
    );
    let _ = writeln!(
        o,
        "noded_migration_downtime_milliseconds_count {}",
        c.downtime_count
    );
    let _ = writeln!(o, "# HELP noded_evictions_total Evictions for updates.");
    let _ = writeln!(o, "# TYPE noded_evictions_total counter");
    let _ = writeln!(o, "noded_evictions_total {}", c.evictions);
    let _ = writeln!(
        o,
        "# HELP noded_launcher_starts_total Launchers started for boots and restarts."
    );
    let _ = writeln!(o, "# TYPE noded_launcher_starts_total counter");
    let _ = writeln!(o, "noded_launcher_starts_total {}", c.starts);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut c = Counters::default();
        c.migration("Succeeded", Some(3.0));
        c.migration("Succeeded", Some(40.0));
        c.migration("Failed", None);
        let text = render(
            &c,
            &Gauges {
                outdated: 2,
                ..Default::default()
            },
        );
        assert!(text.contains("noded_vmi_number_of_outdated 2\n"));
        assert!(text.contains("noded_migrations_total{outcome=\"Succeeded\"} 2\n"));
        assert!(text.contains("noded_migrations_total{outcome=\"Failed\"} 1\n"));
        assert!(text.contains("bucket{le=\"2\"} 0\n"));
        assert!(text.contains("bucket{le=\"5\"} 1\n"));
        assert!(text.contains("bucket{le=\"50\"} 2\n"));
        assert!(text.contains("bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("noded_migration_downtime_milliseconds_sum 43\n"));
    }
}

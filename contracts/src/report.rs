//! The migration report: what the source launcher answers to `PUT /v1/migrate`, what
//! `launcher migrate` prints and what noded records. One struct, used by the migration
//! engine that fills it in, the launcher that sends it and noded that interprets it.

use serde::{Deserialize, Serialize};

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The VM runs on the destination; the source has stopped for good.
    Completed,
    /// The migration failed; see `error` for where the VM runs.
    Failed,
    /// Cancelled through the API; the source runs on.
    Cancelled,
}

/// The report of one migration, with QEMU-like statistics. Launchers released before
/// the contracts crate wrote the same fields in snake_case; they are read too (an update
/// migrates away from exactly such a launcher).
///
/// Unlike the requests, the report does accept fields it does not know: it travels from
/// the launcher to noded, and the launcher is the part that gets updated first, so a
/// noded must read the report of a newer launcher (which added, for example,
/// `dirtyTracking`). The fields noded acts on (`status`, `sourceRunning`, `error`) are
/// typed and required as before; an unknown *value* of them is still refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// completed, failed or cancelled.
    pub status: Outcome,
    /// Why it did not complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the source VM keeps running (true after every failure before Go).
    #[serde(alias = "source_running")]
    pub source_running: bool,
    /// From start to the destination's Started (or the failure).
    #[serde(alias = "total_ms")]
    pub total_ms: f64,
    /// Handshake and (local mode) fd handover until pre-copy began.
    #[serde(alias = "setup_ms")]
    pub setup_ms: f64,
    /// From the source's pause until the destination ran the guest.
    #[serde(alias = "downtime_ms")]
    pub downtime_ms: f64,
    /// Pre-copy iterations including the final one (QEMU's dirty sync count).
    pub iterations: u64,
    /// Bytes written to the stream.
    #[serde(alias = "transferred_bytes")]
    pub transferred_bytes: u64,
    /// Guest memory size.
    #[serde(alias = "memory_bytes")]
    pub memory_bytes: u64,
    /// Pages that were zero when sent (as ranges without bytes) or skipped.
    #[serde(alias = "zero_pages")]
    pub zero_pages: u64,
    /// Pages sent with their bytes.
    #[serde(alias = "normal_pages")]
    pub normal_pages: u64,
    /// Stream throughput over the pre-copy phase.
    #[serde(alias = "throughput_bytes_per_s")]
    pub throughput_bytes_per_s: u64,
    /// Guest dirty rate measured over the last iteration.
    #[serde(alias = "dirty_rate_pages_per_s")]
    pub dirty_rate_pages_per_s: u64,
    /// Highest auto-converge throttle applied.
    #[serde(alias = "throttle_percent")]
    pub throttle_percent: u8,
    /// Guest time lost to throttling during pre-copy (what the VMM can see).
    #[serde(alias = "guest_stall_ms")]
    pub guest_stall_ms: f64,
    /// copy or local.
    pub mode: String,
    /// How the guest's dirty pages were tracked: "ring" (KVM's dirty ring) or "bitmap"
    /// (the fallback); absent in local mode, which tracks nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_tracking: Option<String>,
    /// The scheduling boost of the switch-over threads ("SCHED_FIFO 10", "nice -10 ...")
    /// or why there was none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_over_boost: Option<String>,
    /// The protocol version the destination chose; absent when it never answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u32>,
    /// Where the pause went, as the source saw it; absent when it never paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_over_times: Option<SwitchOverTimes>,
}

/// Milestones of the switch-over, in ms from the moment the source began to pause (so
/// each one includes the ones before it; a milestone not reached stays 0). They say
/// which step of a long pause took the time: stopping the vCPUs, the last pages, the
/// state, the destination's load (`readyMs - stateSentMs`) or its start
/// (`startedMs - goSentMs`). Every field defaults, and unknown ones are ignored, so
/// that reports of launchers with more or fewer milestones are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SwitchOverTimes {
    /// Every vCPU stopped (and answered the pause).
    pub vcpus_stopped_ms: f64,
    /// The last dirty pages were written to the stream (copy mode; local: as above).
    pub final_pages_ms: f64,
    /// The state frame and `Complete` were written.
    pub state_sent_ms: f64,
    /// The destination's `Ready` arrived (it loaded memory and state).
    pub ready_ms: f64,
    /// `Go` was written (after the disk locks were released).
    pub go_sent_ms: f64,
    /// The destination's `Started` arrived.
    pub started_ms: f64,
    /// The destination's own measure from `Go` to its vCPUs running.
    pub destination_go_to_resume_ms: f64,
    /// Before the pause, not part of it nor of the milestones above: from `SwitchOver` to
    /// the destination's `SwitchOverReady` (protocol version 2 on), the time its thread
    /// took to wake up and raise its priority while the guest still ran.
    pub destination_raised_ms: f64,
}

impl Report {
    /// An empty report for `mode` and a guest of `memory_bytes`.
    pub fn new(mode: &str, memory_bytes: u64) -> Self {
        Self {
            status: Outcome::Failed,
            error: None,
            source_running: true,
            total_ms: 0.0,
            setup_ms: 0.0,
            downtime_ms: 0.0,
            iterations: 0,
            transferred_bytes: 0,
            memory_bytes,
            zero_pages: 0,
            normal_pages: 0,
            throughput_bytes_per_s: 0,
            dirty_rate_pages_per_s: 0,
            throttle_percent: 0,
            guest_stall_ms: 0.0,
            mode: mode.to_string(),
            dirty_tracking: None,
            switch_over_boost: None,
            protocol_version: None,
            switch_over_times: None,
        }
    }

    /// The report of a migration refused before it started: the source runs on.
    pub fn refused(mode: &str, memory_bytes: u64, error: impl Into<String>) -> Self {
        Self {
            error: Some(error.into()),
            ..Self::new(mode, memory_bytes)
        }
    }

    /// What the report means for whoever drives the migration (noded, `launcher
    /// migrate`): the one interpretation of a report, given the HTTP status it came with.
    pub fn verdict(&self, http_status: u16) -> Verdict {
        let ok = (200..300).contains(&http_status);
        match self.status {
            Outcome::Completed if ok => Verdict::Completed,
            // A completed report with an error status is not believed: find out.
            Outcome::Completed => Verdict::Unknown(self.error_or("completed with an error status")),
            _ if !self.source_running => {
                Verdict::Unknown(self.error_or("handover outcome unknown"))
            }
            Outcome::Cancelled => Verdict::Cancelled(self.error_or("migration cancelled")),
            Outcome::Failed => Verdict::Failed(self.error_or("migration failed")),
        }
    }

    fn error_or(&self, default: &str) -> String {
        self.error.clone().unwrap_or_else(|| default.to_string())
    }
}

/// Where the VM runs after a migration, as its report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The destination runs the VM; the source exits by itself.
    Completed,
    /// Failed before the point of no return: the source runs on.
    Failed(String),
    /// Cancelled: the source runs on.
    Cancelled(String),
    /// The source stopped (or the answer is not believable) and does not know whether
    /// the destination runs the VM: ask the destination before doing anything.
    Unknown(String),
}

/// One line of progress, reported after every iteration (not a wire type: see
/// [`crate::launcher::MigrationProgress`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Iteration just finished.
    pub iteration: u64,
    /// Bytes sent so far.
    pub transferred_bytes: u64,
    /// Bytes dirty now.
    pub remaining_bytes: u64,
    /// Measured stream throughput.
    pub bandwidth_bytes_per_s: u64,
    /// Expected downtime if we switched now, in ms.
    pub expected_downtime_ms: f64,
    /// Current throttle.
    pub throttle_percent: u8,
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_newer_launchers_report_with_fields_unknown_here_is_read() {
        let mut v = serde_json::to_value(Report::refused("copy", 1 << 20, "x")).unwrap();
        v["someFieldOfAFutureLauncher"] = serde_json::json!({"a": 1});
        v["switchOverTimes"] = serde_json::json!({"readyMs": 2.5, "someFutureMilestoneMs": 1});
        let r: Report = serde_json::from_value(v.clone()).expect("read");
        assert_eq!(r.status, Outcome::Failed);
        let t = r.switch_over_times.expect("the milestones");
        assert_eq!((t.ready_ms, t.vcpus_stopped_ms), (2.5, 0.0));
        v["status"] = serde_json::json!("teleported");
        assert!(
            serde_json::from_value::<Report>(v).is_err(),
            "an unknown status is refused"
        );
    }

    use super::*;

    #[test]
    fn report_round_trips_in_camel_case() {
        let mut r = Report::new("local", 64 << 20);
        r.status = Outcome::Completed;
        r.source_running = false;
        r.downtime_ms = 1.5;
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["sourceRunning"], false);
        assert_eq!(v["downtimeMs"], 1.5);
        assert_eq!(v["memoryBytes"], 64 << 20);
        assert!(v.get("error").is_none());
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.verdict(200), Verdict::Completed);
    }

    #[test]
    fn incomplete_reports_are_refused() {
        // An incomplete report is refused.
        let v = serde_json::json!({"status": "failed", "sourceRunning": true});
        assert!(serde_json::from_value::<Report>(v).is_err());
    }

    #[test]
    fn a_report_of_an_older_launcher_is_read() {
        let old = serde_json::json!({
            "status": "completed", "source_running": false, "total_ms": 10.0,
            "setup_ms": 1.0, "downtime_ms": 0.5, "iterations": 2, "transferred_bytes": 4096,
            "memory_bytes": 1, "zero_pages": 0, "normal_pages": 1,
            "throughput_bytes_per_s": 1, "dirty_rate_pages_per_s": 0, "throttle_percent": 0,
            "guest_stall_ms": 0.0, "mode": "local"
        });
        let r: Report = serde_json::from_value(old).unwrap();
        assert_eq!((r.downtime_ms, r.verdict(200)), (0.5, Verdict::Completed));
        // Written back in today's names.
        assert_eq!(serde_json::to_value(&r).unwrap()["downtimeMs"], 0.5);
    }

    #[test]
    fn verdicts() {
        let r = Report::refused("copy", 1, "no VM");
        assert_eq!(r.verdict(409), Verdict::Failed("no VM".into()));
        let mut r = Report::new("copy", 1);
        r.status = Outcome::Cancelled;
        assert!(matches!(r.verdict(500), Verdict::Cancelled(_)));
        r.status = Outcome::Failed;
        r.source_running = false;
        assert_eq!(
            r.verdict(500),
            Verdict::Unknown("handover outcome unknown".into())
        );
        r.status = Outcome::Completed;
        assert!(matches!(r.verdict(500), Verdict::Unknown(_)));
    }
}

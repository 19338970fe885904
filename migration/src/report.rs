//! The migration report: what `launcher migrate` prints and noded records.

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

/// The report of one migration, with QEMU-like statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// completed, failed or cancelled.
    pub status: Outcome,
    /// Why it did not complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the source VM keeps running (true after every failure before Go).
    pub source_running: bool,
    /// From start to the destination's Started (or the failure).
    pub total_ms: f64,
    /// Handshake and (local mode) fd handover until pre-copy began.
    pub setup_ms: f64,
    /// From the source's pause until the destination ran the guest.
    pub downtime_ms: f64,
    /// Pre-copy iterations including the final one (QEMU's dirty sync count).
    pub iterations: u64,
    /// Bytes written to the stream.
    pub transferred_bytes: u64,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Pages that were zero when sent (as ranges without bytes) or skipped.
    pub zero_pages: u64,
    /// Pages sent with their bytes.
    pub normal_pages: u64,
    /// Stream throughput over the pre-copy phase.
    pub throughput_bytes_per_s: u64,
    /// Guest dirty rate measured over the last iteration.
    pub dirty_rate_pages_per_s: u64,
    /// Highest auto-converge throttle applied.
    pub throttle_percent: u8,
    /// Guest time lost to throttling during pre-copy (what the VMM can see).
    pub guest_stall_ms: f64,
    /// copy or local.
    pub mode: String,
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
        }
    }
}

/// One line of progress, reported after every iteration.
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

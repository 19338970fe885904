//! The switch-over decision and auto-converge, as pure functions over
//! statistics the sender collects after each pre-copy iteration.
//!
//! - [`decide`]: switch over when the estimated final transfer (remaining
//!   dirty bytes plus the device state) over the measured bandwidth fits the
//!   downtime target; abandon the migration (the source keeps running) when
//!   the completion timeout (per GiB of guest memory) or the progress timeout
//!   (no shrinking of the remaining bytes) expires.
//! - [`auto_converge`]: QEMU's vCPU throttling steps.

use std::fmt;
use std::time::Duration;

use thiserror::Error;

/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;
/// Default downtime target (QEMU's default; the API's, `contracts::launcher`).
pub const DEFAULT_DOWNTIME_TARGET: Duration =
    Duration::from_millis(contracts::launcher::DEFAULT_DOWNTIME_MS);
/// Default completion timeout per GiB of guest memory (KubeVirt's default).
pub const DEFAULT_COMPLETION_TIMEOUT_PER_GIB: Duration =
    Duration::from_secs(contracts::launcher::DEFAULT_COMPLETION_TIMEOUT_PER_GIB_S);
/// Default progress timeout (KubeVirt's default).
pub const DEFAULT_PROGRESS_TIMEOUT: Duration =
    Duration::from_secs(contracts::launcher::DEFAULT_PROGRESS_TIMEOUT_S);
/// Auto-converge triggers when the guest dirtied more than this percentage
/// of what was sent in a period.
pub const AUTO_CONVERGE_THRESHOLD_PERCENT: u64 = 50;
/// Consecutive high-dirty periods needed for one throttle step.
pub const AUTO_CONVERGE_PERIODS: u8 = 2;
/// First throttle step, in percent of vCPU time.
pub const THROTTLE_INITIAL: u8 = 20;
/// Further throttle steps.
pub const THROTTLE_INCREMENT: u8 = 10;
/// Highest throttle.
pub const THROTTLE_MAX: u8 = 99;

/// Errors of the policy module (invalid limits).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    #[error("downtime target of {0:?} is longer than the completion timeout")]
    DowntimeAboveCompletion(Duration),
}

/// What the sender measured so far; refreshed after each iteration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationStats {
    /// The iteration that just completed (0 = the first full pass).
    pub iteration: u64,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Bytes dirty now, which the next iteration (or the final transfer)
    /// would send.
    pub remaining_dirty_bytes: u64,
    /// Estimated size of the device state frame.
    pub state_bytes_estimate: u64,
    /// Measured throughput of the stream (0 = not measured yet).
    pub bandwidth_bytes_per_s: u64,
    /// Time since the migration started.
    pub elapsed: Duration,
    /// Value of `elapsed` when `remaining_dirty_bytes` last shrank (or
    /// the migration started).
    pub last_progress: Duration,
    /// Measured guest dirty rate.
    pub dirty_rate_bytes_per_s: u64,
    /// Bytes sent in the last period (iteration).
    pub sent_in_last_period: u64,
    /// Bytes dirtied by the guest during the last period.
    pub dirtied_in_last_period: u64,
    /// Bytes sent in total.
    pub transferred_bytes: u64,
    /// Current vCPU throttle.
    pub throttle_percent: u8,
    /// `remaining_dirty_bytes` at the previous iteration (0 at the first).
    pub previous_remaining_dirty_bytes: u64,
    /// Earlier iterations at which the final transfer already fitted the target.
    pub iterations_within_target: u64,
}

/// The operator's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationLimits {
    /// Longest acceptable pause (default 300 ms).
    pub downtime_target: Duration,
    /// Bytes per second, 0 = unlimited.
    pub max_bandwidth: u64,
    /// Allowed total time per GiB of guest memory (default 150 s); zero
    /// disables the timeout.
    pub completion_timeout_per_gib: Duration,
    /// Allowed time without the remaining bytes shrinking (default 150 s);
    /// zero disables the timeout.
    pub progress_timeout: Duration,
    /// Throttle the vCPUs when the guest dirties faster than the link drains.
    pub auto_converge: bool,
}

impl Default for MigrationLimits {
    fn default() -> Self {
        MigrationLimits {
            downtime_target: DEFAULT_DOWNTIME_TARGET,
            max_bandwidth: 0,
            completion_timeout_per_gib: DEFAULT_COMPLETION_TIMEOUT_PER_GIB,
            progress_timeout: DEFAULT_PROGRESS_TIMEOUT,
            auto_converge: false,
        }
    }
}

impl MigrationLimits {
    /// Checks that the limits make sense together.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let c = self.completion_timeout_per_gib;
        if !c.is_zero() && self.downtime_target > c {
            return Err(PolicyError::DowntimeAboveCompletion(self.downtime_target));
        }
        Ok(())
    }
}

/// Why a migration was abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    CompletionTimeout { elapsed: Duration, limit: Duration },
    ProgressTimeout { stalled: Duration, limit: Duration },
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbortReason::CompletionTimeout { elapsed, limit } => write!(
                f,
                "completion timeout: {:.1} s elapsed, limit {:.1} s",
                elapsed.as_secs_f64(),
                limit.as_secs_f64()
            ),
            AbortReason::ProgressTimeout { stalled, limit } => write!(
                f,
                "progress timeout: no progress for {:.1} s, limit {:.1} s",
                stalled.as_secs_f64(),
                limit.as_secs_f64()
            ),
        }
    }
}

/// The decision after an iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run another iteration.
    Continue,
    /// Pause the vCPUs and send the rest.
    SwitchOver,
    /// Give up; the source resumes.
    Abort(AbortReason),
}

pub use contracts::launcher::completion_timeout;

/// The bandwidth the final transfer is estimated with: the measured one,
/// capped by the limit. 0 when nothing was measured yet.
pub fn effective_bandwidth(stats: &MigrationStats, limits: &MigrationLimits) -> u64 {
    match limits.max_bandwidth {
        0 => stats.bandwidth_bytes_per_s,
        max => stats.bandwidth_bytes_per_s.min(max),
    }
}

/// The expected downtime if the sender switched over now, or `None` while
/// no bandwidth was measured (unless nothing but the state is left, then
/// the state is not counted, as Cloud Hypervisor does).
pub fn expected_downtime(stats: &MigrationStats, limits: &MigrationLimits) -> Option<Duration> {
    let bw = effective_bandwidth(stats, limits);
    if bw == 0 {
        return (stats.remaining_dirty_bytes == 0).then_some(Duration::ZERO);
    }
    let bytes = u128::from(stats.remaining_dirty_bytes) + u128::from(stats.state_bytes_estimate);
    let nanos = bytes * 1_000_000_000 / u128::from(bw);
    Some(Duration::from_nanos(
        u64::try_from(nanos).unwrap_or(u64::MAX),
    ))
}

/// Below this expected pause, another iteration is not worth its time.
pub const GOOD_ENOUGH_DOWNTIME: Duration = Duration::from_millis(2);
/// At most this many iterations are spent shrinking a pause that already fits the target.
pub const MAX_EXTRA_ITERATIONS: u64 = 5;

/// Going beyond QEMU and Cloud Hypervisor: when the final transfer already fits the
/// target but the remaining bytes still halve from one iteration to the next (a link
/// much faster than the guest dirties memory), a few more cheap iterations cut the
/// actual pause well below the target. Stop as soon as the pause is good enough, the
/// remaining bytes stop shrinking fast, or the extra iterations are used up.
pub fn worth_another_iteration(stats: &MigrationStats, limits: &MigrationLimits) -> bool {
    let Some(expected) = expected_downtime(stats, limits) else {
        return false;
    };
    expected > GOOD_ENOUGH_DOWNTIME
        && stats.iterations_within_target < MAX_EXTRA_ITERATIONS
        && stats.previous_remaining_dirty_bytes > 0
        && stats.remaining_dirty_bytes.saturating_mul(2) <= stats.previous_remaining_dirty_bytes
}

/// Whether the final transfer fits the downtime target, computed exactly.
pub fn fits_target(stats: &MigrationStats, limits: &MigrationLimits) -> bool {
    let bw = effective_bandwidth(stats, limits);
    if bw == 0 {
        // No measurement yet: only switch when no memory is left to send.
        return stats.remaining_dirty_bytes == 0;
    }
    let bytes = u128::from(stats.remaining_dirty_bytes) + u128::from(stats.state_bytes_estimate);
    bytes * 1_000_000_000 <= u128::from(bw) * limits.downtime_target.as_nanos()
}

/// The switch-over decision. Switching wins over the timeouts when both
/// apply: a migration that can finish within the target should not be
/// abandoned.
pub fn decide(stats: &MigrationStats, limits: &MigrationLimits) -> Decision {
    if fits_target(stats, limits) {
        if worth_another_iteration(stats, limits) {
            return Decision::Continue;
        }
        return Decision::SwitchOver;
    }
    if !limits.completion_timeout_per_gib.is_zero() {
        let limit = completion_timeout(stats.memory_bytes, limits.completion_timeout_per_gib);
        if stats.elapsed > limit {
            return Decision::Abort(AbortReason::CompletionTimeout {
                elapsed: stats.elapsed,
                limit,
            });
        }
    }
    if !limits.progress_timeout.is_zero() {
        let stalled = stats.elapsed.saturating_sub(stats.last_progress);
        if stalled > limits.progress_timeout {
            return Decision::Abort(AbortReason::ProgressTimeout {
                stalled,
                limit: limits.progress_timeout,
            });
        }
    }
    Decision::Continue
}

/// Auto-converge state carried from one period to the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttle {
    /// vCPU throttle in percent (0 = none).
    pub percent: u8,
    /// Consecutive periods in which the guest dirtied too much.
    pub high_periods: u8,
}

/// Whether a period counts as "dirtying faster than the link drains": more
/// than 50 % of what was sent was dirtied again.
pub fn dirty_rate_high(sent_in_period: u64, dirtied_in_period: u64) -> bool {
    u128::from(dirtied_in_period) * 100
        > u128::from(sent_in_period) * u128::from(AUTO_CONVERGE_THRESHOLD_PERCENT)
}

/// One auto-converge step, as QEMU does it: after two periods in a row in
/// which the guest dirtied more than half of what was sent, throttle 20 %,
/// then 10 % more per trigger, up to 99 %. (QEMU does not reset the count
/// on a calm period; here the two periods must be consecutive.)
pub fn auto_converge(prev: Throttle, sent_in_period: u64, dirtied_in_period: u64) -> Throttle {
    if !dirty_rate_high(sent_in_period, dirtied_in_period) {
        return Throttle {
            percent: prev.percent,
            high_periods: 0,
        };
    }
    let high = prev.high_periods.saturating_add(1);
    if high < AUTO_CONVERGE_PERIODS {
        return Throttle {
            percent: prev.percent,
            high_periods: high,
        };
    }
    let percent = if prev.percent == 0 {
        THROTTLE_INITIAL
    } else {
        prev.percent
            .saturating_add(THROTTLE_INCREMENT)
            .min(THROTTLE_MAX)
    };
    Throttle {
        percent,
        high_periods: 0,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn stats() -> MigrationStats {
        MigrationStats {
            iteration: 1,
            memory_bytes: 256 * MIB,
            remaining_dirty_bytes: 32 * MIB,
            state_bytes_estimate: 64 * 1024,
            bandwidth_bytes_per_s: 1000 * MIB,
            elapsed: Duration::from_secs(1),
            last_progress: Duration::from_secs(1),
            ..Default::default()
        }
    }

    #[test]
    fn switch_over_when_it_fits() {
        let l = MigrationLimits::default();
        assert_eq!(decide(&stats(), &l), Decision::SwitchOver);
        let mut s = stats();
        s.bandwidth_bytes_per_s = 100 * MIB;
        assert_eq!(decide(&s, &l), Decision::Continue);
        let est = expected_downtime(&s, &l).unwrap();
        assert!(
            est > Duration::from_millis(320) && est < Duration::from_millis(321),
            "{est:?}"
        );
        // A bandwidth cap is taken into account.
        let capped = MigrationLimits {
            max_bandwidth: 10 * MIB,
            ..l
        };
        assert_eq!(decide(&stats(), &capped), Decision::Continue);
        // A 1 ms target never fits while memory keeps being dirtied.
        let tight = MigrationLimits {
            downtime_target: Duration::from_millis(1),
            ..l
        };
        assert_eq!(decide(&stats(), &tight), Decision::Continue);
    }

    #[test]
    fn zero_bandwidth() {
        let l = MigrationLimits::default();
        let mut s = stats();
        s.bandwidth_bytes_per_s = 0;
        assert_eq!(decide(&s, &l), Decision::Continue);
        assert_eq!(expected_downtime(&s, &l), None);
        s.remaining_dirty_bytes = 0;
        assert_eq!(decide(&s, &l), Decision::SwitchOver);
        assert_eq!(expected_downtime(&s, &l), Some(Duration::ZERO));
    }

    #[test]
    fn timeouts() {
        let l = MigrationLimits::default();
        let mut s = stats();
        s.bandwidth_bytes_per_s = MIB;
        s.elapsed = Duration::from_secs(151);
        s.last_progress = Duration::from_secs(150);
        assert!(matches!(
            decide(&s, &l),
            Decision::Abort(AbortReason::CompletionTimeout { .. })
        ));
        s.memory_bytes = 2 * GIB;
        assert_eq!(decide(&s, &l), Decision::Continue);
        s.last_progress = Duration::ZERO;
        let d = decide(&s, &l);
        assert!(
            matches!(d, Decision::Abort(AbortReason::ProgressTimeout { .. })),
            "{d:?}"
        );
        let off = MigrationLimits {
            progress_timeout: Duration::ZERO,
            ..l
        };
        assert_eq!(decide(&s, &off), Decision::Continue);
        assert_eq!(
            completion_timeout(0, Duration::from_secs(150)),
            Duration::from_secs(150)
        );
        assert_eq!(
            completion_timeout(GIB + 1, Duration::from_secs(150)),
            Duration::from_secs(300)
        );
        assert_eq!(
            completion_timeout(u64::MAX, Duration::from_secs(150)),
            Duration::from_secs(150 << 34)
        );
        assert_eq!(completion_timeout(2 * GIB, Duration::MAX), Duration::MAX);
        assert!(MigrationLimits::default().validate().is_ok());
        let bad = MigrationLimits {
            downtime_target: Duration::from_secs(1000),
            ..l
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn auto_converge_steps() {
        let mut t = Throttle::default();
        let mut seen = vec![];
        for _ in 0..30 {
            t = auto_converge(t, 100, 60);
            seen.push(t.percent);
        }
        assert_eq!(&seen[..8], &[0, 20, 20, 30, 30, 40, 40, 50]);
        assert_eq!(*seen.last().unwrap(), 99);
        // A calm period resets the count.
        let t = auto_converge(Throttle::default(), 100, 60);
        let t = auto_converge(t, 100, 50);
        let t = auto_converge(t, 100, 60);
        assert_eq!(t.percent, 0);
        assert!(!dirty_rate_high(0, 0));
        assert!(dirty_rate_high(0, 1));
        assert!(!dirty_rate_high(u64::MAX, u64::MAX / 2));
    }

    /// The model: floating-point free, written the obvious way.
    fn model_decide(s: &MigrationStats, l: &MigrationLimits) -> Decision {
        let bw = if l.max_bandwidth > 0 {
            s.bandwidth_bytes_per_s.min(l.max_bandwidth)
        } else {
            s.bandwidth_bytes_per_s
        };
        let fits = if bw == 0 {
            s.remaining_dirty_bytes == 0
        } else {
            let ms = l.downtime_target.as_millis();
            (s.remaining_dirty_bytes as u128 + s.state_bytes_estimate as u128) * 1000
                <= bw as u128 * ms
        };
        if fits {
            return Decision::SwitchOver;
        }
        let gib = (s.memory_bytes as u128).div_ceil(GIB as u128).max(1);
        let limit_s = l.completion_timeout_per_gib.as_secs() as u128 * gib;
        if limit_s > 0 && s.elapsed.as_millis() > limit_s * 1000 {
            return Decision::Abort(AbortReason::CompletionTimeout {
                elapsed: s.elapsed,
                limit: Duration::from_secs(limit_s as u64),
            });
        }
        let stalled = s.elapsed.saturating_sub(s.last_progress);
        if !l.progress_timeout.is_zero() && stalled > l.progress_timeout {
            return Decision::Abort(AbortReason::ProgressTimeout {
                stalled,
                limit: l.progress_timeout,
            });
        }
        Decision::Continue
    }

    proptest! {
        #[test]
        fn decide_matches_model(
            remaining in prop_oneof![Just(0u64), 0u64..(8 * GIB)],
            state in 0u64..(4 * MIB),
            bw in prop_oneof![Just(0u64), 1u64..(4 * GIB)],
            max_bw in prop_oneof![Just(0u64), 1u64..(4 * GIB)],
            memory in 0u64..(16 * GIB),
            elapsed_ms in 0u64..3_000_000,
            progress_ms in 0u64..3_000_000,
            target_ms in 0u64..2000,
            per_gib_s in 0u64..300,
            progress_s in 0u64..300,
        ) {
            let s = MigrationStats {
                remaining_dirty_bytes: remaining,
                state_bytes_estimate: state,
                bandwidth_bytes_per_s: bw,
                memory_bytes: memory,
                elapsed: Duration::from_millis(elapsed_ms),
                last_progress: Duration::from_millis(progress_ms.min(elapsed_ms)),
                ..Default::default()
            };
            let l = MigrationLimits {
                downtime_target: Duration::from_millis(target_ms),
                max_bandwidth: max_bw,
                completion_timeout_per_gib: Duration::from_secs(per_gib_s),
                progress_timeout: Duration::from_secs(progress_s),
                auto_converge: false,
            };
            prop_assert_eq!(decide(&s, &l), model_decide(&s, &l));
            // Monotonic: less to send never turns a switch-over into anything else.
            if decide(&s, &l) == Decision::SwitchOver {
                let less = MigrationStats { remaining_dirty_bytes: remaining / 2, ..s };
                prop_assert_eq!(decide(&less, &l), Decision::SwitchOver);
            }
        }

        #[test]
        fn auto_converge_matches_model(periods in proptest::collection::vec((0u64..1000, 0u64..1000), 0..60)) {
            let mut t = Throttle::default();
            let (mut percent, mut streak) = (0u32, 0u32);
            for (sent, dirtied) in periods {
                let prev = t.percent;
                t = auto_converge(t, sent, dirtied);
                // Model.
                if dirtied as f64 > sent as f64 * 0.5 {
                    streak += 1;
                    if streak == 2 {
                        streak = 0;
                        percent = if percent == 0 { 20 } else { (percent + 10).min(99) };
                    }
                } else {
                    streak = 0;
                }
                prop_assert_eq!(u32::from(t.percent), percent);
                prop_assert_eq!(u32::from(t.high_periods), streak);
                prop_assert!(t.percent >= prev && t.percent <= THROTTLE_MAX);
            }
        }
    }
}

#[cfg(test)]
mod extra_iteration_tests {
    use super::*;

    fn stats(remaining: u64, previous: u64, within: u64) -> MigrationStats {
        MigrationStats {
            iteration: 3,
            memory_bytes: 1 << 30,
            remaining_dirty_bytes: remaining,
            previous_remaining_dirty_bytes: previous,
            iterations_within_target: within,
            bandwidth_bytes_per_s: 1 << 30,
            ..Default::default()
        }
    }

    #[test]
    fn keeps_iterating_while_the_remainder_halves_and_the_pause_is_not_yet_tiny() {
        let limits = MigrationLimits::default();
        // 32 MiB at 1 GiB/s = 31 ms: fits 300 ms, halved from 96 MiB.
        assert_eq!(
            decide(&stats(32 << 20, 96 << 20, 0), &limits),
            Decision::Continue
        );
    }

    #[test]
    fn switches_when_the_remainder_stops_shrinking_fast() {
        let limits = MigrationLimits::default();
        assert_eq!(
            decide(&stats(32 << 20, 40 << 20, 0), &limits),
            Decision::SwitchOver
        );
    }

    #[test]
    fn switches_when_the_pause_is_good_enough_or_extra_iterations_are_used_up() {
        let limits = MigrationLimits::default();
        assert_eq!(
            decide(&stats(1 << 20, 8 << 20, 0), &limits),
            Decision::SwitchOver
        );
        assert_eq!(
            decide(&stats(32 << 20, 96 << 20, MAX_EXTRA_ITERATIONS), &limits),
            Decision::SwitchOver
        );
    }

    #[test]
    fn never_continues_past_a_target_that_does_not_fit() {
        let limits = MigrationLimits {
            downtime_target: Duration::from_millis(1),
            ..Default::default()
        };
        // 32 MiB does not fit 1 ms: the ordinary rule (Continue) applies, not the extra one.
        assert!(!fits_target(&stats(32 << 20, 96 << 20, 0), &limits));
    }
}

//! The pre-copy sender: runs on the source launcher, owns the VM for the
//! duration of the migration, and hands it over exactly once.
//!
//! Invariants kept here (see `protocol.rs` for the state diagram):
//! - dirty logging is on only while migrating ([`DirtyLogging`] turns it off on drop);
//! - every failure before `Go` resumes the source (the [`vmm::PauseGuard`] does it on drop);
//! - after `Go`, only an explicit `Abort` from the destination resumes the source;
//!   a broken connection leaves it paused and the report says the outcome is unknown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmm::Vm;

use crate::boost::Boost;
use crate::dirty::DirtyBitmap;
use crate::frame::{FrameError, FrameReader, FrameWriter, MemoryRange, MAX_MEMORY_RANGES};
use crate::policy::{self, Decision, MigrationLimits, MigrationStats, Throttle};
use crate::protocol::{
    FdRegion, Hello, MemoryLayout, MemoryRegion, MigrationMode, ReceiverMessage, SenderMessage,
    SenderPhase, VersionRange, PAGE_SIZE, SWITCH_OVER_VERSION,
};
use crate::report::{Outcome, Progress, Report, SwitchOverTimes};
use crate::transport::{self, RateLimit, RateLimitedWriter, Stream};
use guards::{DirtyLogging, Throttler};

/// Largest data payload of one memory frame we build (well under the 64 MiB bound,
/// small enough that a cancel or a lifted bandwidth cap takes effect quickly).
const FRAME_DATA_BYTES: u64 = 4 << 20;
/// How long the destination may take to load the state and answer Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination may take to answer Go.
const STARTED_TIMEOUT: Duration = Duration::from_secs(30);
/// Auto-converge throttling period.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

/// Errors of the sender; each message says where the VM runs now.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The stream or framing failed.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The destination said no or failed.
    #[error("destination refused: {0}")]
    Refused(String),
    /// The VM could not be paused, saved or its dirty log read.
    #[error("source VM: {0}")]
    Vm(String),
    /// Cancelled through the API.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A timeout of the policy.
    #[error("abandoned: {0}")]
    Abandoned(String),
    /// Something the destination sent makes no sense here.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// What the caller controls.
pub struct SendOptions {
    /// Copy memory, or hand the memfds over (Unix socket only).
    pub mode: MigrationMode,
    /// Downtime target, timeouts, auto-converge.
    pub limits: MigrationLimits,
    /// Bandwidth cap, changeable while the migration runs.
    pub rate: Arc<RateLimit>,
    /// Set to cancel (before Go).
    pub cancel: Arc<AtomicBool>,
    /// This launcher's version, told to the destination.
    pub launcher_version: String,
    /// Downtime target in ms, changeable while the migration runs (overrides `limits`).
    pub downtime_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Called after every pre-copy iteration (the launcher publishes it on its API).
    pub progress: Option<ProgressFn>,
}

/// The memory layout of `vm` as the protocol describes it.
pub fn layout_of(vm: &Vm) -> MemoryLayout {
    MemoryLayout {
        regions: vm
            .memory_regions()
            .iter()
            .map(|r| MemoryRegion {
                gpa: r.gpa,
                size: r.size,
            })
            .collect(),
    }
}

fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Reads the return path on its own thread so that a refusal mid-stream is seen.
fn spawn_return_path(stream: Stream) -> Receiver<Result<ReceiverMessage, FrameError>> {
    let (tx, rx) = channel();
    let _ = std::thread::Builder::new()
        .name("mig-return".into())
        .spawn(move || {
            // Ready and Started arrive here during the pause: this thread must not wait
            // for a core behind other VMs' vCPUs. It wakes only for control messages, so
            // the boost costs others nothing measurable.
            let _boost = Boost::current_thread();
            let mut r = FrameReader::new(stream);
            match r.read_preamble() {
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
            loop {
                let m = r.read_control_frame::<ReceiverMessage>();
                let end = m.is_err();
                if tx.send(m).is_err() || end {
                    return;
                }
            }
        });
    rx
}

struct Sender<'a> {
    vm: &'a Vm,
    w: FrameWriter<RateLimitedWriter<Stream>>,
    back: Receiver<Result<ReceiverMessage, FrameError>>,
    phase: SenderPhase,
    /// The protocol version the destination chose (in its `Accept`).
    version: u32,
    opts: &'a SendOptions,
    report: Report,
    buf_ranges: Vec<MemoryRange>,
    copy_buf: Vec<u8>,
}

impl Sender<'_> {
    /// A message from the return path, if one is waiting; a refusal or error ends the migration.
    fn poll_back(&mut self) -> Result<(), SendError> {
        match self.back.try_recv() {
            Ok(msg) => Err(self.unexpected(msg)),
            Err(_) => Ok(()),
        }
    }

    fn unexpected(&mut self, msg: Result<ReceiverMessage, FrameError>) -> SendError {
        match msg {
            Ok(ReceiverMessage::Refuse { reason }) => SendError::Refused(reason.to_string()),
            Ok(ReceiverMessage::Error { reason }) | Ok(ReceiverMessage::Abort { reason }) => {
                SendError::Refused(reason)
            }
            Ok(other) => {
                SendError::Protocol(format!("unexpected {} from the destination", other.name()))
            }
            Err(e) => SendError::Frame(e),
        }
    }

    fn wait_back(&mut self, timeout: Duration, what: &str) -> Result<ReceiverMessage, SendError> {
        match self.back.recv_timeout(timeout) {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => Err(SendError::Frame(e)),
            Err(RecvTimeoutError::Timeout) => Err(SendError::Refused(format!(
                "no answer from the destination within {timeout:?} while waiting for {what}"
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(SendError::Refused(format!(
                "the destination closed the connection while we waited for {what}"
            ))),
        }
    }

    fn check_cancel(&self) -> Result<(), SendError> {
        if self.opts.cancel.load(Ordering::SeqCst) {
            return Err(SendError::Cancelled("cancelled through the API".into()));
        }
        Ok(())
    }

    /// Send `[gpa, gpa+len)` page by page: data pages with bytes, zero pages as
    /// ranges (or not at all when `skip_zero`, for iteration 0 on fresh memory).
    fn send_range(&mut self, gpa: u64, len: u64, skip_zero: bool) -> Result<(), SendError> {
        let mut off = 0;
        while off < len {
            self.check_cancel()?;
            self.poll_back()?;
            let chunk = (len - off).min(FRAME_DATA_BYTES);
            let base = gpa + off;
            // Copy first (through the volatile accessors): the CRC must cover exactly the
            // bytes that go on the wire, and the guest may change its memory meanwhile. A
            // page the guest changes after this copy is dirty again and goes next time.
            let mut copy = std::mem::take(&mut self.copy_buf);
            copy.resize(chunk as usize, 0);
            self.vm
                .read_memory(base, &mut copy)
                .map_err(|e| SendError::Vm(e.to_string()))?;
            self.buf_ranges.clear();
            let mut data: Vec<&[u8]> = Vec::new();
            let runs = vmm::pages::page_runs(&copy, MAX_MEMORY_RANGES as usize);
            let consumed = runs.last().map_or(chunk, |r| (r.offset + r.len) as u64);
            for run in &runs {
                let rgpa = base + run.offset as u64;
                let pages = run.len as u64 / PAGE_SIZE;
                if run.zero {
                    self.report.zero_pages += pages;
                    if !skip_zero {
                        self.buf_ranges
                            .push(MemoryRange::zero(rgpa, run.len as u64));
                    }
                } else {
                    self.report.normal_pages += pages;
                    self.buf_ranges
                        .push(MemoryRange::data(rgpa, run.len as u64));
                    data.push(&copy[run.offset..run.offset + run.len]);
                }
            }
            if !self.buf_ranges.is_empty() {
                let ranges = std::mem::take(&mut self.buf_ranges);
                let r = self.w.write_memory(&ranges, &data);
                self.buf_ranges = ranges;
                r?;
            }
            drop(data);
            self.copy_buf = copy;
            off += consumed;
            // A busy guest must not wait on a full dirty ring until the next pass.
            self.vm
                .drain_dirty_rings()
                .map_err(|e| SendError::Vm(e.to_string()))?;
        }
        Ok(())
    }

    /// Harvest KVM's and the VMM's dirty pages into one bitmap per region.
    fn collect_dirty(&self, into: &mut [DirtyBitmap]) -> Result<(), SendError> {
        let harvested = self
            .vm
            .harvest_dirty()
            .map_err(|e| SendError::Vm(e.to_string()))?;
        for (bm, words) in into.iter_mut().zip(harvested) {
            bm.merge_words(&words)
                .map_err(|e| SendError::Vm(e.to_string()))?;
        }
        Ok(())
    }

    fn send_dirty(&mut self, dirty: &mut [DirtyBitmap]) -> Result<(), SendError> {
        let max_run = FRAME_DATA_BYTES / PAGE_SIZE;
        for bm in dirty.iter_mut() {
            let runs: Vec<_> = bm.runs(max_run).collect();
            for run in runs {
                self.send_range(run.gpa, run.len, false)?;
            }
            bm.clear();
        }
        Ok(())
    }
}

/// Migrate `vm` over `stream`. Returns the report; on `Completed` the caller must
/// never run the VM again (it stays paused) and should exit.
pub fn send(vm: &Arc<Vm>, stream: Stream, opts: &SendOptions) -> Report {
    let mode_name = match opts.mode {
        MigrationMode::Copy => "copy",
        MigrationMode::Local => "local",
    };
    let span = tracing::info_span!("migration", mode = mode_name);
    let _e = span.enter();
    let mut report = Report::new(mode_name, vm.memory_bytes());
    let start = Instant::now();
    // A stalled connection must not block a write for ever (least of all while paused).
    let _ = stream.set_write_timeout(Some(transport::stall_timeout()));
    let back = match stream.try_clone() {
        Ok(s) => spawn_return_path(s),
        Err(e) => {
            report.error = Some(format!("cannot clone the migration stream: {e}"));
            return report;
        }
    };
    let unix = stream.as_unix().and_then(|u| u.try_clone().ok());
    let mut s = Sender {
        vm,
        w: FrameWriter::new(RateLimitedWriter::new(stream, opts.rate.clone())),
        back,
        phase: SenderPhase::AwaitAccept,
        version: 0,
        opts,
        report,
        buf_ranges: Vec::new(),
        copy_buf: Vec::with_capacity(FRAME_DATA_BYTES as usize),
    };
    // The throttle thread exists only when auto-converge may use it.
    let throttler = opts
        .limits
        .auto_converge
        .then(|| Throttler::start(vm.clone()));
    let result = run(&mut s, unix.as_ref(), start, throttler.as_ref());
    s.report.guest_stall_ms = throttler.as_ref().map_or(0.0, |t| ms(t.stalled()));
    drop(throttler);
    s.report.transferred_bytes = s.w.bytes_written();
    s.report.total_ms = ms(start.elapsed());
    match result {
        Ok(()) => {
            s.report.status = Outcome::Completed;
            s.report.source_running = false;
            tracing::info!(downtime_ms = s.report.downtime_ms, "migration completed");
        }
        Err(mut e) => {
            // A destination that refuses mid-stream says why on the return path and then
            // closes; our next write fails with a bare EPIPE. Prefer its reason.
            if matches!(e, SendError::Frame(_)) && s.phase.source_may_resume() {
                if let Ok(Ok(msg)) = s.back.recv_timeout(Duration::from_millis(200)) {
                    e = s.unexpected(Ok(msg));
                }
            }
            // Tell the destination why, so it discards everything (best effort).
            // A cancel may surface as a write error (the rate limiter aborts blocked writes).
            let cancelled =
                matches!(e, SendError::Cancelled(_)) || opts.cancel.load(Ordering::SeqCst);
            let msg = if cancelled {
                SenderMessage::Cancel {
                    reason: "cancelled through the API".into(),
                }
            } else {
                SenderMessage::Error {
                    reason: e.to_string(),
                }
            };
            if s.phase.source_may_resume() && !opts.rate.is_aborted() {
                opts.rate.set(0);
                let _ = s.w.write_control(&msg);
            }
            s.report.status = if cancelled {
                Outcome::Cancelled
            } else {
                Outcome::Failed
            };
            s.report.source_running = s.phase.source_may_resume();
            let where_ = if s.report.source_running {
                "the VM keeps running on the source"
            } else {
                "handover outcome unknown: the source stays paused; ask the destination whether it runs, then resume or stop the source"
            };
            let what = if cancelled {
                "cancelled through the API".to_string()
            } else {
                e.to_string()
            };
            s.report.error = Some(format!("{what}; {where_}"));
            tracing::warn!(error = %e, source_running = s.report.source_running, "migration did not complete");
        }
    }
    let _ = s.w.get_ref().get_ref().shutdown();
    s.report
}

/// Handshake, pre-copy, switch-over and handover, in that order.
fn run(
    s: &mut Sender<'_>,
    unix: Option<&std::os::unix::net::UnixStream>,
    start: Instant,
    throttler: Option<&Throttler>,
) -> Result<(), SendError> {
    let layout = layout_of(s.vm);
    handshake(s, &layout)?;
    let mut dirty: Vec<DirtyBitmap> = layout
        .regions
        .iter()
        .map(|r| DirtyBitmap::for_region(r.gpa, r.size))
        .collect::<Result<_, _>>()
        .map_err(|e| SendError::Vm(e.to_string()))?;
    let logging = match s.opts.mode {
        MigrationMode::Local => {
            hand_over_fds(s, unix, &layout)?;
            s.report.setup_ms = ms(start.elapsed());
            s.report.iterations = 1;
            None
        }
        MigrationMode::Copy => {
            s.report.setup_ms = ms(start.elapsed());
            let (logging, mode) = DirtyLogging::on(s.vm)?;
            s.report.dirty_tracking = Some(mode.name().to_string());
            precopy(s, &mut dirty, start, throttler)?;
            Some(logging)
        }
    };
    s.report.throughput_bytes_per_s =
        (s.w.bytes_written() as f64 / start.elapsed().as_secs_f64().max(1e-6)) as u64;
    // The pause must not wait for a core behind other VMs' vCPUs.
    let boost = Boost::current_thread();
    s.report.switch_over_boost = Some(boost.applied().to_string());
    let paused = switch_over(s, &mut dirty, logging.is_some(), throttler)?;
    let result = handover(s, paused, logging);
    drop(boost);
    result
}

/// Preamble, Hello, and the destination's Accept.
fn handshake(s: &mut Sender<'_>, layout: &MemoryLayout) -> Result<(), SendError> {
    let vm = s.vm;
    s.w.write_preamble()?;
    s.w.write_control(&SenderMessage::Hello(Hello {
        versions: VersionRange::ours(),
        machine_type: vm.config().machine_type.clone(),
        memory: layout.clone(),
        vcpus: u32::from(vm.config().vcpus),
        mode: s.opts.mode,
        launcher_version: s.opts.launcher_version.clone(),
    }))?;
    let answer = s.wait_back(transport::stall_timeout(), "Accept")?;
    s.phase
        .advance(&answer)
        .map_err(|e| SendError::Protocol(e.to_string()))?;
    let ReceiverMessage::Accept { version } = answer else {
        return Err(s.unexpected(Ok(answer)));
    };
    s.version = version;
    s.report.protocol_version = Some(version);
    Ok(())
}

/// Local mode: the memfds (and TAPs) travel once with `SCM_RIGHTS`; waits until the
/// destination has mapped them and built its VM shell, so none of that is in the pause.
fn hand_over_fds(
    s: &mut Sender<'_>,
    unix: Option<&std::os::unix::net::UnixStream>,
    layout: &MemoryLayout,
) -> Result<(), SendError> {
    let unix = unix.ok_or_else(|| {
        SendError::Protocol(
            "local mode needs a unix: destination (file descriptors cannot cross TCP)".into(),
        )
    })?;
    let fd_err = |e: transport::TransportError| {
        SendError::Frame(FrameError::Io(std::io::Error::other(e.to_string())))
    };
    let regions: Vec<FdRegion> = layout
        .regions
        .iter()
        .map(|r| FdRegion {
            gpa: r.gpa,
            size: r.size,
            file_offset: 0,
        })
        .collect();
    let frame = crate::frame::encode_control_frame(&SenderMessage::MemoryFds { regions })?;
    transport::send_fds(unix, &frame, &s.vm.memory_fds()).map_err(fd_err)?;
    let mapped = s.wait_back(READY_TIMEOUT, "MemoryMapped")?;
    s.phase
        .advance(&mapped)
        .map_err(|e| SendError::Protocol(e.to_string()))?;
    // The TAPs go along: frames that arrive during the pause wait in their queues.
    let taps = s.vm.net_fds();
    if !taps.is_empty() {
        let frame = crate::frame::encode_control_frame(&SenderMessage::NetFds {
            count: taps.len() as u32,
        })?;
        transport::send_fds(unix, &frame, &taps).map_err(fd_err)?;
    }
    Ok(())
}

/// Copy mode: iteration 0 sends everything that holds data, then each iteration sends
/// what was dirtied during the previous one, until the policy says switch over.
fn precopy(
    s: &mut Sender<'_>,
    dirty: &mut [DirtyBitmap],
    start: Instant,
    throttler: Option<&Throttler>,
) -> Result<(), SendError> {
    let vm = s.vm;
    let t0 = Instant::now();
    let sent0 = s.w.bytes_written();
    for (i, r) in vm.memory_regions().iter().enumerate() {
        let mut data_pages = 0;
        for (a, b) in vm.memory_data_ranges(i) {
            s.send_range(a, b - a, true)?;
            data_pages += (b - a) / PAGE_SIZE;
        }
        // Holes were never written: zero pages that cost nothing to skip.
        s.report.zero_pages += r.size / PAGE_SIZE - data_pages;
    }
    s.w.write_control(&SenderMessage::IterationDone { iteration: 0 })?;
    let mut stats = MigrationStats {
        memory_bytes: vm.memory_bytes(),
        state_bytes_estimate: 64 << 10,
        ..Default::default()
    };
    let mut throttle = Throttle::default();
    let mut period_start = t0;
    let mut period_sent = s.w.bytes_written() - sent0;
    loop {
        s.check_cancel()?;
        s.poll_back()?;
        let elapsed_period = period_start.elapsed();
        s.collect_dirty(dirty)?;
        let dirty_bytes: u64 = dirty.iter().map(|d| d.dirty_bytes()).sum();
        update_stats(&mut stats, elapsed_period, period_sent, dirty_bytes, start);
        stats.transferred_bytes = s.w.bytes_written();
        s.report.dirty_rate_pages_per_s = stats.dirty_rate_bytes_per_s / PAGE_SIZE;
        let mut limits = s.opts.limits;
        limits.max_bandwidth = s.opts.rate.get();
        limits.downtime_target = Duration::from_millis(s.opts.downtime_ms.load(Ordering::Relaxed));
        report_progress(s, &stats, &limits, throttle.percent);
        let decision = policy::decide(&stats, &limits);
        if policy::fits_target(&stats, &limits) {
            stats.iterations_within_target += 1;
        }
        match decision {
            Decision::SwitchOver => break,
            Decision::Abort(reason) => return Err(SendError::Abandoned(reason.to_string())),
            Decision::Continue => {}
        }
        if limits.auto_converge {
            throttle = policy::auto_converge(throttle, period_sent, dirty_bytes);
            if let Some(t) = throttler {
                t.set(throttle.percent);
            }
            s.report.throttle_percent = s.report.throttle_percent.max(throttle.percent);
        }
        period_start = Instant::now();
        let before = s.w.bytes_written();
        s.send_dirty(dirty)?;
        stats.iteration += 1;
        s.w.write_control(&SenderMessage::IterationDone {
            iteration: stats.iteration,
        })?;
        period_sent = s.w.bytes_written() - before;
        if period_sent == 0 {
            // Nothing was dirty: give the guest a moment rather than spin.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    s.report.iterations = stats.iteration + 1;
    Ok(())
}

/// The policy's inputs after a pass that sent `period_sent` bytes in `elapsed_period`
/// and left `dirty_bytes` dirty.
fn update_stats(
    stats: &mut MigrationStats,
    elapsed_period: Duration,
    period_sent: u64,
    dirty_bytes: u64,
    start: Instant,
) {
    let secs = elapsed_period.as_secs_f64().max(1e-6);
    stats.bandwidth_bytes_per_s = (period_sent as f64 / secs) as u64;
    stats.dirty_rate_bytes_per_s = (dirty_bytes as f64 / secs) as u64;
    stats.sent_in_last_period = period_sent;
    stats.dirtied_in_last_period = dirty_bytes;
    stats.elapsed = start.elapsed();
    if dirty_bytes < stats.remaining_dirty_bytes || stats.iteration == 0 {
        stats.last_progress = stats.elapsed;
    }
    // Iteration 0 "had" everything it sent left to send.
    stats.previous_remaining_dirty_bytes = if stats.iteration == 0 {
        period_sent
    } else {
        stats.remaining_dirty_bytes
    };
    stats.remaining_dirty_bytes = dirty_bytes;
}

fn report_progress(s: &Sender<'_>, stats: &MigrationStats, limits: &MigrationLimits, pct: u8) {
    let expected = policy::expected_downtime(stats, limits);
    tracing::info!(
        iteration = stats.iteration,
        remaining = stats.remaining_dirty_bytes,
        bandwidth = stats.bandwidth_bytes_per_s,
        "pre-copy iteration"
    );
    if let Some(cb) = &s.opts.progress {
        cb(&Progress {
            iteration: stats.iteration,
            transferred_bytes: stats.transferred_bytes,
            remaining_bytes: stats.remaining_dirty_bytes,
            bandwidth_bytes_per_s: stats.bandwidth_bytes_per_s,
            expected_downtime_ms: expected.map(ms).unwrap_or(f64::INFINITY),
            throttle_percent: pct,
        });
    }
}

/// The VM paused for the switch-over, and when that happened.
struct Paused<'a> {
    guard: vmm::PauseGuard<'a>,
    at: Instant,
    realtime_ns: u64,
}

/// Pause; last dirty pages; state; Complete; wait for Ready. Dropping the guard on any
/// error resumes the source.
fn switch_over<'a>(
    s: &mut Sender<'a>,
    dirty: &mut [DirtyBitmap],
    copy: bool,
    throttler: Option<&Throttler>,
) -> Result<Paused<'a>, SendError> {
    let vm = s.vm;
    s.check_cancel()?;
    let announced = Instant::now();
    // Announce it, and pause only once the destination answers that its thread runs at
    // the raised priority: on a host whose cores are busy with other VMs' vCPUs, that
    // thread waits for a core to wake up, and the wait then falls while the guest still
    // runs rather than inside the downtime. A version-1 destination knows neither message.
    if s.version >= SWITCH_OVER_VERSION {
        s.w.write_control(&SenderMessage::SwitchOver)?;
        s.phase
            .sent_switch_over()
            .map_err(|e| SendError::Protocol(e.to_string()))?;
        let answer = s.wait_back(
            transport::stall_timeout().min(READY_TIMEOUT),
            "SwitchOverReady",
        )?;
        s.phase
            .advance(&answer)
            .map_err(|e| SendError::Protocol(e.to_string()))?;
        s.check_cancel()?;
    }
    let destination_raised_ms = ms(announced.elapsed());
    let at = Instant::now();
    let realtime_ns = realtime_ns();
    let (guard, vcpus_boosted) = vm
        .pause_boosted()
        .map_err(|e| SendError::Vm(e.to_string()))?;
    let mut times = SwitchOverTimes {
        vcpus_stopped_ms: ms(at.elapsed()),
        destination_raised_ms,
        ..Default::default()
    };
    if let Some(b) = s.report.switch_over_boost.as_mut() {
        b.push_str(if vcpus_boosted {
            "; vCPUs SCHED_FIFO while pausing"
        } else {
            "; vCPUs not boosted (SCHED_FIFO refused)"
        });
    }
    if let Some(t) = throttler {
        t.set(0);
    }
    // No bandwidth cap for the final transfer: the guest is stopped.
    s.opts.rate.set(0);
    if copy {
        s.collect_dirty(dirty)?;
        s.send_dirty(dirty)?;
    }
    let t_dirty = at.elapsed();
    times.final_pages_ms = ms(t_dirty);
    let state = vm
        .save_state(&guard)
        .map_err(|e| SendError::Vm(e.to_string()))?;
    let bytes = state.to_bytes().map_err(|e| SendError::Vm(e.to_string()))?;
    s.w.write_state(&bytes)?;
    s.w.write_control(&SenderMessage::Complete)?;
    s.phase
        .sent_complete()
        .map_err(|e| SendError::Protocol(e.to_string()))?;
    let t_sent = at.elapsed();
    times.state_sent_ms = ms(t_sent);
    s.report.switch_over_times = Some(times);
    let ready = s.wait_back(transport::stall_timeout().min(READY_TIMEOUT), "Ready")?;
    if let Some(t) = s.report.switch_over_times.as_mut() {
        t.ready_ms = ms(at.elapsed());
    }
    tracing::info!(
        final_pages_us = t_dirty.as_micros() as u64,
        state_sent_us = t_sent.as_micros() as u64,
        ready_us = at.elapsed().as_micros() as u64,
        "switch-over"
    );
    s.phase
        .advance(&ready)
        .map_err(|e| SendError::Protocol(e.to_string()))?;
    if !matches!(ready, ReceiverMessage::Ready) {
        return Err(s.unexpected(Ok(ready)));
    }
    Ok(Paused {
        guard,
        at,
        realtime_ns,
    })
}

/// Release the disks, send Go (the point of no return) and wait for Started; only an
/// explicit Abort lets the source run again after Go.
fn handover(
    s: &mut Sender<'_>,
    paused: Paused<'_>,
    logging: Option<DirtyLogging<'_>>,
) -> Result<(), SendError> {
    let vm = s.vm;
    let Paused {
        guard,
        at: pause_at,
        realtime_ns: pause_realtime,
    } = paused;
    // Last chance to cancel (a guest reset during pre-copy cancels through the launcher).
    s.check_cancel()?;
    // One owner: the data disks' locks go with Go. If anything fails before the destination
    // runs, the guard's resume takes them back first (and the source stays paused if it
    // cannot).
    vm.release_disk_locks(&guard)
        .map_err(|e| SendError::Vm(e.to_string()))?;
    s.w.write_control(&SenderMessage::Go)?;
    s.phase
        .sent_go()
        .map_err(|e| SendError::Protocol(e.to_string()))?;
    if let Some(t) = s.report.switch_over_times.as_mut() {
        t.go_sent_ms = ms(pause_at.elapsed());
    }
    drop(logging);
    let started = match s.wait_back(transport::stall_timeout().min(STARTED_TIMEOUT), "Started") {
        Ok(m) => m,
        Err(e) => {
            guard.keep_paused();
            return Err(e);
        }
    };
    let advanced = s.phase.advance(&started);
    match started {
        ReceiverMessage::Started {
            resumed_realtime_ns,
            go_to_resume_us,
        } if advanced.is_ok() => {
            guard.keep_paused();
            let wall = pause_at.elapsed();
            if let Some(t) = s.report.switch_over_times.as_mut() {
                t.started_ms = ms(wall);
                t.destination_go_to_resume_ms = go_to_resume_us as f64 / 1000.0;
            }
            let by_clock = resumed_realtime_ns.saturating_sub(pause_realtime);
            s.report.downtime_ms = if by_clock > 0 && (by_clock as u128) < wall.as_nanos() {
                by_clock as f64 / 1e6
            } else {
                ms(wall)
            };
            Ok(())
        }
        ReceiverMessage::Abort { reason } => {
            // The destination did not start the guest: take the disks back and resume here
            // (guard drop). Should another process have taken a disk meanwhile, stay paused.
            if let Err(e) = vm.acquire_disk_locks() {
                guard.keep_paused();
                return Err(SendError::Vm(format!(
                    "destination aborted after Go ({reason}) and the source cannot take its disks back ({e}); the source stays paused: resume it once the disks are free"
                )));
            }
            Err(SendError::Refused(format!(
                "destination aborted after Go: {reason}"
            )))
        }
        other => {
            guard.keep_paused();
            Err(SendError::Protocol(format!(
                "unexpected {} after Go",
                other.name()
            )))
        }
    }
}

#[path = "sender_guards.rs"]
mod guards;

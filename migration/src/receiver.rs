//! The receiver: runs in a launcher started with `--incoming`, builds the VM
//! from the stream, and starts it only after the sender's `Go`.
//!
//! Any error before `Go` discards everything (the VM was never started) and is
//! reported to the sender, which then resumes the source.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use vmm::devices::serial::SerialOut;
use vmm::machine::PreparedVm;
use vmm::vstate::memory::{GuestRam, RamRegion};
use vmm::{Vm, VmState};

use crate::boost::Boost;
use crate::frame::{FrameError, FrameReader, FrameType, FrameWriter, MemoryRange, MemorySink};
use crate::protocol::{
    self, Hello, Incoming, MemoryLayout, MigrationMode, ReceiverCapabilities, ReceiverMessage,
    ReceiverPhase, RefuseReason, SenderMessage, VersionRange,
};
use crate::transport::{FdReader, Stream, MAX_FDS};

/// Why an incoming migration did not produce a running VM.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Stream, framing or checksum failure.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// We refused the VM (reason also sent to the sender).
    #[error("refused: {0}")]
    Refused(RefuseReason),
    /// The sender cancelled or failed.
    #[error("the sender ended the migration: {0}")]
    SenderEnded(String),
    /// A message out of order.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// What this receiver can run.
pub fn capabilities(local_mode: bool) -> ReceiverCapabilities {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    ReceiverCapabilities {
        accepted_versions: VersionRange::ours(),
        machine_types: vmm::config::MACHINE_TYPES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        max_memory_bytes: (pages.max(0) as u64).saturating_mul(page.max(0) as u64),
        max_vcpus: u32::from(vmm::config::MAX_VCPUS),
        local_mode,
    }
}

/// Stores verified pages into the not-yet-running guest's memory at their offset.
struct RamSink<'a>(&'a PreparedVm);

impl MemorySink for RamSink<'_> {
    fn data(&mut self, range: &MemoryRange, data: &[u8]) -> Result<(), String> {
        self.0
            .load_memory(range.gpa, data)
            .map_err(|e| e.to_string())
    }

    fn zero(&mut self, range: &MemoryRange) -> Result<(), String> {
        self.0
            .load_zero(range.gpa, range.len)
            .map_err(|e| e.to_string())
    }
}

/// What the receiver measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReceiveStats {
    /// Mode used.
    pub local: bool,
    /// Bytes read from the stream.
    pub bytes: u64,
    /// Microseconds from Go to the vCPUs running.
    pub go_to_resume_us: u64,
}

/// What the receiving launcher brings of its own.
#[derive(Debug, Default, Clone)]
pub struct ReceiveOptions {
    /// This launcher's `--net` options (each with "mac= was given"): in a copy migration
    /// they replace the backends of the VM's interfaces, in order; without them the TAPs
    /// are opened by the names the VM had. A local migration uses the handed-over TAPs.
    pub nets: Vec<(vmm::config::NetConfig, bool)>,
    /// The protocol versions this launcher declares (`launcher capabilities`); the
    /// receiver accepts only versions both declared and implemented. None: all it implements.
    pub versions: Option<VersionRange>,
    /// The machine types this launcher runs; None: all the VMM implements.
    pub machine_types: Option<Vec<String>>,
}

/// What this receiver can run, narrowed to what the launcher declares in `opts`, so
/// that what `launcher capabilities` advertises is what the receiver enforces.
pub fn capabilities_with(local_mode: bool, opts: &ReceiveOptions) -> ReceiverCapabilities {
    let mut caps = capabilities(local_mode);
    if let Some(d) = opts.versions {
        let ours = caps.accepted_versions;
        caps.accepted_versions = VersionRange {
            min: d.min.max(ours.min),
            max: d.max.min(ours.max),
        };
    }
    if let Some(m) = &opts.machine_types {
        caps.machine_types.retain(|t| m.contains(t));
    }
    caps
}

/// Receive one VM over `stream` and start it. `serial` is the console sink of the new VM.
pub fn receive(stream: Stream, serial: SerialOut) -> Result<(Vm, ReceiveStats), ReceiveError> {
    receive_with(stream, serial, &ReceiveOptions::default())
}

/// [`receive`] with this launcher's own network backends.
pub fn receive_with(
    stream: Stream,
    serial: SerialOut,
    opts: &ReceiveOptions,
) -> Result<(Vm, ReceiveStats), ReceiveError> {
    let span = tracing::info_span!("incoming-migration");
    let _e = span.enter();
    // A stalled sender must not keep this process waiting for ever.
    let _ = stream.set_read_timeout(Some(crate::transport::stall_timeout()));
    let mut w = FrameWriter::new(stream.try_clone().map_err(FrameError::Io)?);
    w.write_preamble()?;
    let result = match stream.as_unix().map(|u| u.try_clone()) {
        Some(Ok(u)) => {
            let mut r = FrameReader::new(FdReader::new(u, MAX_FDS));
            receive_on(&mut r, &mut w, serial, true, opts, |r| {
                r.get_mut().take_fds()
            })
        }
        _ => {
            let mut r = FrameReader::new(stream.try_clone().map_err(FrameError::Io)?);
            receive_on(&mut r, &mut w, serial, false, opts, |_| Vec::new())
        }
    };
    let result = result.map_err(|e| match e {
        ReceiveError::Frame(FrameError::Io(io)) => ReceiveError::Frame(FrameError::Io(
            crate::transport::stall_error(io, "no data from the sender"),
        )),
        other => other,
    });
    if let Err(e) = &result {
        // Tell the sender why (it resumes the source); best effort, the stream may be gone.
        let reason = match e {
            ReceiveError::Refused(r) => ReceiverMessage::Refuse { reason: r.clone() },
            other => ReceiverMessage::Error {
                reason: other.to_string(),
            },
        };
        if !matches!(e, ReceiveError::Refused(_)) {
            let _ = w.write_control(&reason);
        }
        tracing::warn!(error = %e, "incoming migration failed; nothing was started");
    }
    let _ = stream.shutdown();
    result
}

fn refuse<W: std::io::Write>(w: &mut FrameWriter<W>, reason: RefuseReason) -> ReceiveError {
    let _ = w.write_control(&ReceiverMessage::Refuse {
        reason: reason.clone(),
    });
    ReceiveError::Refused(reason)
}

/// What the handshake settled.
struct Accepted {
    hello: Hello,
    /// The protocol version chosen in `Accept`.
    version: u32,
    vcpus: u8,
    /// Copy mode: the VM shell, built before pre-copy starts.
    prepared: Option<PreparedVm>,
}

/// Milestones of the switch-over on this side, in µs from its start (`SwitchOver`, or
/// the state frame from a version-1 sender), logged with the Ready: the source's report
/// sees the destination only as one wait, this says which step of it took the time.
#[derive(Default)]
struct Timeline {
    start: Option<Instant>,
    marks: Vec<(&'static str, u64)>,
}

impl Timeline {
    fn start(&mut self) {
        self.start.get_or_insert_with(Instant::now);
    }

    fn mark(&mut self, what: &'static str) {
        if let Some(t) = self.start {
            self.marks.push((what, t.elapsed().as_micros() as u64));
        }
    }

    fn describe(&self) -> String {
        self.marks
            .iter()
            .map(|(w, us)| format!("{w}={us}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What pre-copy delivered.
struct Received {
    prepared: Option<PreparedVm>,
    state_bytes: Option<Vec<u8>>,
    tap_fds: Vec<OwnedFd>,
    /// Raised at `SwitchOver` (version 2 on: the source pauses once we answer), or at the
    /// state frame from a version-1 sender (which pauses just before it).
    boost: Option<Boost>,
    timeline: Timeline,
}

fn receive_on<R: Read, W: std::io::Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    serial: SerialOut,
    unix: bool,
    opts: &ReceiveOptions,
    take_fds: impl FnMut(&mut FrameReader<R>) -> Vec<OwnedFd>,
) -> Result<(Vm, ReceiveStats), ReceiveError> {
    let accepted = handshake(r, w, unix, opts)?;
    let hello = accepted.hello.clone();
    let mut received = receive_precopy(r, w, accepted, take_fds)?;
    let boost = received.boost.as_ref().map(|b| b.applied().to_string());
    tracing::info!(boost = boost.as_deref().unwrap_or("none"), "switch-over");
    let vm = load(w, &hello, &mut received, serial, opts)?;
    let go_to_resume_us = handover(r, w, &vm)?;
    drop(received.boost);
    Ok((
        vm,
        ReceiveStats {
            local: hello.mode == MigrationMode::Local,
            bytes: r.bytes_read(),
            go_to_resume_us,
        },
    ))
}

/// Preamble and Hello; refuse or Accept (building the VM shell in copy mode first).
fn handshake<R: Read, W: std::io::Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    unix: bool,
    opts: &ReceiveOptions,
) -> Result<Accepted, ReceiveError> {
    r.read_preamble()?;
    let hello = match r.read_control_frame::<SenderMessage>()? {
        SenderMessage::Hello(h) => h,
        other => {
            return Err(ReceiveError::Protocol(format!(
                "expected Hello, got {}",
                other.name()
            )))
        }
    };
    let version = match protocol::check_hello(&hello, &capabilities_with(unix, opts)) {
        Ok(v) => v,
        Err(reason) => return Err(refuse(w, reason)),
    };
    // The layout must be the one this launcher builds for that memory size.
    let total = hello.memory.total_bytes();
    let ours: Vec<(u64, u64)> = vmm::layout::ram_regions(total);
    let theirs: Vec<(u64, u64)> = hello
        .memory
        .regions
        .iter()
        .map(|m| (m.gpa, m.size))
        .collect();
    if ours != theirs {
        return Err(refuse(
            w,
            RefuseReason::InvalidConfig(format!(
                "memory layout {theirs:x?} is not the q35 layout for {total} bytes ({ours:x?})"
            )),
        ));
    }
    let Ok(vcpus) = u8::try_from(hello.vcpus) else {
        return Err(refuse(
            w,
            RefuseReason::InvalidConfig(format!("{} vCPUs", hello.vcpus)),
        ));
    };
    // Build the VM shell now, while the source runs: it keeps KVM setup out of the pause.
    let prepared = match hello.mode {
        MigrationMode::Copy => match GuestRam::new(total)
            .map_err(|e| e.to_string())
            .and_then(|ram| Vm::prepare(ram, vcpus).map_err(|e| e.to_string()))
        {
            Ok(p) => Some(p),
            Err(e) => return Err(refuse(w, RefuseReason::LoadFailed(e))),
        },
        MigrationMode::Local => None,
    };
    w.write_control(&ReceiverMessage::Accept { version })?;
    tracing::info!(
        version,
        peer = %hello.launcher_version,
        mode = ?hello.mode,
        memory = total,
        "accepted incoming migration"
    );
    Ok(Accepted {
        hello,
        version,
        vcpus,
        prepared,
    })
}

/// Frames until Complete: memory (copy mode), memory and TAP fds (local mode), state.
fn receive_precopy<R: Read, W: std::io::Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    accepted: Accepted,
    mut take_fds: impl FnMut(&mut FrameReader<R>) -> Vec<OwnedFd>,
) -> Result<Received, ReceiveError> {
    let Accepted {
        hello,
        version,
        vcpus,
        prepared,
    } = accepted;
    let layout: MemoryLayout = hello.memory.clone();
    let mut phase = ReceiverPhase::accepted(hello.mode, version);
    let mut got = Received {
        prepared,
        state_bytes: None,
        tap_fds: Vec::new(),
        boost: None,
        timeline: Timeline::default(),
    };
    let proto = |e: protocol::ProtocolError| ReceiveError::Protocol(e.to_string());
    loop {
        let h = r.read_header()?;
        match h.frame_type {
            FrameType::Memory => {
                phase.advance(Incoming::Memory).map_err(proto)?;
                let vm = got.prepared.as_ref().ok_or_else(|| {
                    ReceiveError::Protocol("memory frame before memory exists".into())
                })?;
                r.read_memory(&h, &layout, &mut RamSink(vm))?;
            }
            FrameType::State => {
                phase.advance(Incoming::State).map_err(proto)?;
                // The source is paused: loading and starting must not wait for a core. (From
                // a version-2 sender the boost holds since SwitchOver.)
                got.timeline.start();
                got.timeline.mark("state_header");
                got.boost.get_or_insert_with(Boost::current_thread);
                got.state_bytes = Some(r.read_state(&h)?);
                got.timeline.mark("state_read");
            }
            FrameType::Control => {
                let msg: SenderMessage = r.read_control(&h)?;
                phase.advance(Incoming::of(&msg)).map_err(proto)?;
                match msg {
                    SenderMessage::MemoryFds { regions } => {
                        protocol::check_memory_fds(&regions, &layout).map_err(proto)?;
                        let fds = take_fds(r);
                        got.prepared = Some(adopt_memory(w, &regions, fds, vcpus)?);
                        // Only now may the sender pause: the pause pays for registers only.
                        w.write_control(&ReceiverMessage::MemoryMapped)?;
                    }
                    SenderMessage::NetFds { count } => {
                        got.tap_fds = take_fds(r);
                        if got.tap_fds.len() != count as usize {
                            return Err(ReceiveError::Protocol(format!(
                                "NetFds announced {count} TAPs but {} file descriptors arrived",
                                got.tap_fds.len()
                            )));
                        }
                    }
                    SenderMessage::IterationDone { .. } => {}
                    // The source pauses once we answer: the last pages and the state must
                    // not wait for a core behind other VMs' vCPUs.
                    SenderMessage::SwitchOver => {
                        got.timeline.start();
                        got.boost = Some(Boost::current_thread());
                        got.timeline.mark("boosted");
                        // The source pauses only on this answer, so the wait for a core
                        // to wake this thread up falls before the downtime, not in it.
                        w.write_control(&ReceiverMessage::SwitchOverReady)?;
                    }
                    SenderMessage::Complete => {
                        got.timeline.mark("complete");
                        return Ok(got);
                    }
                    SenderMessage::Cancel { reason } | SenderMessage::Error { reason } => {
                        return Err(ReceiveError::SenderEnded(reason))
                    }
                    other => {
                        return Err(ReceiveError::Protocol(format!(
                            "unexpected {} during pre-copy",
                            other.name()
                        )))
                    }
                }
            }
        }
    }
}

/// Local mode: map the handed-over memfds, fault them in and build the VM shell, all
/// while the source guest still runs.
fn adopt_memory<W: std::io::Write>(
    w: &mut FrameWriter<W>,
    regions: &[protocol::FdRegion],
    fds: Vec<OwnedFd>,
    vcpus: u8,
) -> Result<PreparedVm, ReceiveError> {
    if fds.len() != regions.len() {
        return Err(ReceiveError::Protocol(format!(
            "MemoryFds announced {} regions but {} file descriptors arrived",
            regions.len(),
            fds.len()
        )));
    }
    let regs = regions
        .iter()
        .zip(fds)
        .map(|(m, fd)| RamRegion {
            gpa: m.gpa,
            size: m.size,
            file: File::from(fd),
        })
        .collect();
    let adopted = GuestRam::from_regions(regs)
        .map_err(|e| refuse(w, RefuseReason::LoadFailed(e.to_string())))?;
    adopted.prefault();
    Vm::prepare(adopted, vcpus).map_err(|e| refuse(w, RefuseReason::LoadFailed(e.to_string())))
}

/// Decode and check the state, attach the network, restore the VM (paused) and say Ready.
fn load<W: std::io::Write>(
    w: &mut FrameWriter<W>,
    hello: &Hello,
    received: &mut Received,
    serial: SerialOut,
    opts: &ReceiveOptions,
) -> Result<Vm, ReceiveError> {
    let t_complete = Instant::now();
    let (prepared, state_bytes, tap_fds) = (
        received.prepared.take(),
        received.state_bytes.take(),
        std::mem::take(&mut received.tap_fds),
    );
    let timeline = &mut received.timeline;
    let state_bytes = state_bytes.ok_or_else(|| ReceiveError::Protocol("no state frame".into()))?;
    let prepared =
        prepared.ok_or_else(|| ReceiveError::Protocol("no guest memory arrived".into()))?;
    let mut state = VmState::from_bytes(&state_bytes)
        .map_err(|e| refuse(w, RefuseReason::LoadFailed(e.to_string())))?;
    timeline.mark("decoded");
    if hello.mode == MigrationMode::Local && tap_fds.len() != state.config.nets.len() {
        return Err(refuse(
            w,
            RefuseReason::InvalidConfig(format!(
                "the VM has {} network interfaces but {} TAP fds were handed over",
                state.config.nets.len(),
                tap_fds.len()
            )),
        ));
    }
    vmm::devices::virtio::netcfg::attach_incoming(&mut state.config.nets, tap_fds, &opts.nets)
        .map_err(|e| refuse(w, RefuseReason::LoadFailed(e)))?;
    if state.config.machine_type != hello.machine_type
        || state.config.memory_bytes != hello.memory.total_bytes()
        || u32::from(state.config.vcpus) != hello.vcpus
    {
        return Err(refuse(
            w,
            RefuseReason::InvalidConfig("the state does not match the Hello".into()),
        ));
    }
    let vm = prepared
        .restore(state, serial)
        .map_err(|e| refuse(w, RefuseReason::LoadFailed(e.to_string())))?;
    timeline.mark("restored");
    w.write_control(&ReceiverMessage::Ready)?;
    timeline.mark("ready_sent");
    tracing::info!(
        restore_us = t_complete.elapsed().as_micros() as u64,
        switch_over_us = %timeline.describe(),
        "state loaded; waiting for Go"
    );
    Ok(vm)
}

/// Wait for Go, start the VM and say Started; returns microseconds from Go to running.
fn handover<R: Read, W: std::io::Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    vm: &Vm,
) -> Result<u64, ReceiveError> {
    match r.read_control_frame::<SenderMessage>()? {
        SenderMessage::Go => {}
        SenderMessage::Cancel { reason } | SenderMessage::Error { reason } => {
            return Err(ReceiveError::SenderEnded(reason))
        }
        other => {
            return Err(ReceiveError::Protocol(format!(
                "expected Go, got {}",
                other.name()
            )))
        }
    }
    let go = Instant::now();
    if let Err(e) = vm.start_restored() {
        let _ = w.write_control(&ReceiverMessage::Abort {
            reason: e.to_string(),
        });
        return Err(ReceiveError::Protocol(format!("cannot start the VM: {e}")));
    }
    let resumed_realtime_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let go_to_resume_us = go.elapsed().as_micros() as u64;
    // The VM runs now; a failure to say so must not stop it (the sender stays paused
    // and its driver asks us).
    let _ = w.write_control(&ReceiverMessage::Started {
        resumed_realtime_ns,
        go_to_resume_us,
    });
    Ok(go_to_resume_us)
}

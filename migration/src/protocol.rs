//! The migration wire protocol, specified in one place.
//!
//! A migration is one duplex byte stream (`unix:PATH` or `tcp:HOST:PORT`, see
//! [`crate::transport`]) between a *sender* (the launcher that runs the VM,
//! "S") and a *receiver* (a launcher started with `--incoming`, "D"). The
//! stream carries frames (see [`crate::frame`]); the direction S→D carries
//! [`SenderMessage`]s, memory frames and the state frame; the direction D→S
//! (the *return path*) carries [`ReceiverMessage`]s only.
//!
//! # Stream start
//!
//! Each side first writes a 12-byte preamble: [`STREAM_MAGIC`]
//! (`b"LVMIGR\0\0"`) followed by its [`PROTOCOL_VERSION`] as a little-endian
//! `u32`. A peer whose first 8 bytes are not the magic is refused at once,
//! before anything else is read, so a stray HTTP client or a corrupted stream
//! never reaches the frame parser. The version in the preamble lets a refusal
//! name the peer's version even when the peer's `Hello` cannot be decoded.
//!
//! The preamble, the frame header, the `Hello`, `Accept`, `Refuse` and `Error`
//! messages are frozen across protocol versions: they are what version
//! negotiation relies on. Everything after `Accept` may change with the
//! negotiated version.
//!
//! # Two-phase handover
//!
//! ```text
//! sender (S)                                        receiver (D)
//!  preamble ───────────────────────────────────────▶ check magic
//!                                          ◀──────── preamble
//!  Hello{versions, machine_type, memory layout,
//!        vcpus, mode, launcher_version} ───────────▶ check version, machine
//!                                                    type, layout, resources
//!                                          ◀──────── Accept{version} | Refuse{reason}
//!  copy mode:  Memory frames, IterationDone{0}, Memory frames,
//!              IterationDone{1}, ...  ─────────────▶ write into guest memory
//!  local mode: MemoryFds{regions} + SCM_RIGHTS ───▶ map and pre-fault the fds,
//!                                          ◀──────── MemoryMapped   create the VM shell
//!              NetFds{count} + SCM_RIGHTS ────────▶ keep the TAP fds (only if the VM
//!                                                    has network interfaces)
//!  SwitchOver (version 2 on) ─────────────────────▶ raise this thread's priority
//!                                          ◀──────── SwitchOverReady (version 2 on)
//!  pause vCPUs                       (downtime starts)
//!  copy mode: last Memory frames ──────────────────▶
//!  State{bytes} (a State frame), Complete ─────────▶ load memory and state
//!                                          ◀──────── Ready | Refuse{reason}
//!  -- from here the source must never resume on its own --
//!  Go ─────────────────────────────────────────────▶ resume vCPUs
//!                                          ◀──────── Started{resume time} | Abort{reason}
//!  exit (status 64)                                  run the VM
//! ```
//!
//! `Cancel{reason}` may be sent by S at any time before `Go`; `Error{reason}`
//! may be sent by either side at any time and ends the migration.
//!
//! # Versions
//!
//! - **1**: the exchange above without `SwitchOver`. (`NetFds` was appended to it later
//!   without a bump: only a local migration of a VM with network interfaces sends it, and
//!   a receiver that predates it refuses it before `Go`. The state frame is opaque to the
//!   protocol and versioned by the VMM section by section, so the sectioned state of
//!   `vmm::state`, which replaced the unsectioned one, did not change the protocol: a
//!   version-1 stream carries either, and this receiver loads both.)
//! - **2**: `SwitchOver`, sent by S when it has decided to switch over, so that D raises
//!   its thread's priority for the final memory frames (which it cannot otherwise tell
//!   from pre-copy frames) rather than only from the state frame on. D answers
//!   `SwitchOverReady` once raised, and S pauses the VM only then: on a host whose cores
//!   are busy with other VMs' vCPUs, D's thread waits for a core to wake up, and that
//!   wait now falls while the guest still runs instead of inside the downtime. In
//!   version 2 both are required: `SwitchOver` exactly once, after the last
//!   `IterationDone`, before the state frame; `SwitchOverReady` before S pauses.
//!
//! A receiver accepts its own version and the previous one; a version-1 stream (an
//! older sender, or this sender when the receiver chose 1) never carries `SwitchOver`,
//! and a `SwitchOver` in it is refused as out of order.
//!
//! ## Sender states ([`SenderPhase`])
//!
//! ```text
//! AwaitAccept --Accept--> Precopy --(S sends Complete; version 1)--> AwaitReady
//! Precopy --(S sends SwitchOver; version 2)--> AwaitSwitchOverReady
//! AwaitSwitchOverReady --SwitchOverReady--> SwitchingOver (S pauses the VM)
//! SwitchingOver --(S sends Complete)--> AwaitReady
//! AwaitReady --Ready--> ReadyToGo --(S sends Go)--> AwaitStarted
//! AwaitStarted --Started--> Done
//! Refuse | Error | Abort | EOF | any error before Go  => resume the source VM
//! EOF or error in AwaitStarted                         => stay paused,
//!                                                         "handover outcome unknown"
//! ```
//!
//! ## Receiver states ([`ReceiverPhase`])
//!
//! ```text
//! AwaitHello --Hello (accepted)--> Precopy
//! Precopy: Memory (copy mode) | MemoryFds (local mode, exactly once)
//!          | NetFds (local mode, at most once, after MemoryFds, before State)
//!          | IterationDone{n} (n = 0, 1, 2, ... in order, before SwitchOver)
//!          | SwitchOver (version 2: once, required before State; version 1: refused)
//!          | State (once)
//! Precopy --Complete (state and, in local mode, fds received)--> AwaitGo
//! AwaitGo --Go--> Started (D resumes the guest, sends Started)
//! Cancel | Error | EOF | any invalid frame before Go => discard everything,
//!                                                      exit non-zero
//! ```
//!
//! Before `Go` any failure on either side means: D discards everything and
//! exits, S resumes with its memory intact. After `Go`, S never resumes on its
//! own: if the connection breaks before `Started` or `Abort`, S stays paused
//! and reports that the outcome is unknown; whoever drives the migration asks
//! D whether it runs and then tells S to resume or to exit.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The protocol version this build speaks (the history is in the module comment).
pub const PROTOCOL_VERSION: u32 = 2;

/// The first version with [`SenderMessage::SwitchOver`].
pub const SWITCH_OVER_VERSION: u32 = 2;

/// The oldest version a receiver of this build accepts: its own and the
/// previous one, so that a launcher always takes the VM of the launcher before it.
pub const MIN_ACCEPTED_VERSION: u32 = if PROTOCOL_VERSION > 1 {
    PROTOCOL_VERSION - 1
} else {
    PROTOCOL_VERSION
};

/// The first 8 bytes each side writes on the stream.
pub const STREAM_MAGIC: [u8; 8] = *b"LVMIGR\0\0";

/// Length of the preamble: the magic and a little-endian `u32` version.
pub const PREAMBLE_LEN: usize = 12;

/// Guest page size assumed by the protocol and the dirty bitmaps.
pub const PAGE_SIZE: u64 = 4096;

/// Upper bound on the number of memory regions in a layout.
pub const MAX_MEMORY_REGIONS: usize = 64;

/// Upper bound on the length of strings in control messages (machine type,
/// launcher version, reasons).
pub const MAX_STRING_LEN: usize = 4096;

/// Errors of the protocol layer: preamble, handshake and message order.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("not a migration stream: expected magic {expected:?}, got {found:?}")]
    BadMagic { expected: [u8; 8], found: [u8; 8] },
    #[error("{0}")]
    Refused(RefuseReason),
    #[error("invalid memory layout: {0}")]
    InvalidLayout(String),
    #[error("invalid {what}: {detail}")]
    InvalidMessage { what: &'static str, detail: String },
    #[error("unexpected {got} while {phase}")]
    UnexpectedMessage { phase: String, got: &'static str },
    #[error("migration cancelled by the sender: {0}")]
    Cancelled(String),
    #[error("peer reported an error: {0}")]
    PeerError(String),
    #[error("receiver aborted after go: {0}")]
    Aborted(String),
}

/// A range of protocol versions, both ends inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    pub min: u32,
    pub max: u32,
}

impl VersionRange {
    /// The versions this build offers as a sender and accepts as a receiver.
    pub const fn ours() -> Self {
        VersionRange {
            min: MIN_ACCEPTED_VERSION,
            max: PROTOCOL_VERSION,
        }
    }

    pub fn contains(&self, v: u32) -> bool {
        self.min <= v && v <= self.max
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..={}", self.min, self.max)
        }
    }
}

/// How guest memory travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMode {
    /// Pages are copied in memory frames.
    Copy,
    /// The memory fds are handed over with `SCM_RIGHTS`; no page is copied.
    Local,
}

impl fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationMode::Copy => "copy",
            MigrationMode::Local => "local",
        })
    }
}

/// One guest RAM region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The guest RAM layout: page-aligned, non-empty, sorted, non-overlapping regions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub regions: Vec<MemoryRegion>,
}

impl MemoryLayout {
    pub fn new(regions: Vec<MemoryRegion>) -> Result<Self, ProtocolError> {
        let layout = MemoryLayout { regions };
        layout.validate()?;
        Ok(layout)
    }

    /// Checks the invariants listed on the type.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |s: String| Err(ProtocolError::InvalidLayout(s));
        if self.regions.is_empty() {
            return bad("no memory region".into());
        }
        if self.regions.len() > MAX_MEMORY_REGIONS {
            return bad(format!(
                "{} regions, at most {MAX_MEMORY_REGIONS} allowed",
                self.regions.len()
            ));
        }
        let mut prev_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.size == 0 {
                return bad(format!("region {i} is empty"));
            }
            if (r.gpa | r.size) & (PAGE_SIZE - 1) != 0 {
                return bad(format!(
                    "region {i} ({:#x}, {:#x} bytes) is not page-aligned",
                    r.gpa, r.size
                ));
            }
            let Some(end) = r.gpa.checked_add(r.size) else {
                return bad(format!("region {i} wraps around the address space"));
            };
            if i > 0 && r.gpa < prev_end {
                return bad(format!(
                    "region {i} at {:#x} overlaps or precedes the previous one ending at {prev_end:#x}",
                    r.gpa
                ));
            }
            prev_end = end;
        }
        Ok(())
    }

    /// Total guest RAM in bytes (saturating).
    pub fn total_bytes(&self) -> u64 {
        self.regions
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.size))
    }

    /// The index of the region that holds all of `[gpa, gpa + len)`, if any.
    /// An empty range is held by no region.
    pub fn region_containing(&self, gpa: u64, len: u64) -> Option<usize> {
        let end = gpa.checked_add(len)?;
        if len == 0 {
            return None;
        }
        self.regions
            .iter()
            .position(|r| gpa >= r.gpa && end <= r.gpa + r.size)
    }
}

/// The first message of the sender. Its encoding is frozen across versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol versions the sender can speak.
    pub versions: VersionRange,
    /// Machine type, e.g. `q35`; the receiver must offer exactly this one.
    pub machine_type: String,
    pub memory: MemoryLayout,
    pub vcpus: u32,
    pub mode: MigrationMode,
    /// The sender launcher's version string, for messages and logs.
    pub launcher_version: String,
}

/// One memory fd handed over in local mode: the fd maps `[gpa, gpa + size)`
/// from `file_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRegion {
    pub gpa: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Messages from sender to receiver (control frames). Memory and state
/// travel in frames of their own types, see [`crate::frame::FrameType`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SenderMessage {
    Hello(Hello),
    /// Local mode: one fd per entry, in this order, as `SCM_RIGHTS` data
    /// sent with this frame's bytes.
    MemoryFds {
        regions: Vec<FdRegion>,
    },
    /// All memory frames of iteration `iteration` (0, 1, 2, ...) were sent.
    IterationDone {
        iteration: u64,
    },
    /// The sender is paused, has sent the last pages and the state frame.
    Complete,
    /// Start the VM; the sender will not resume.
    Go,
    Cancel {
        reason: String,
    },
    Error {
        reason: String,
    },
    /// Local mode: the VM's TAP fds, one per network interface in `VmConfig::nets`
    /// order, as `SCM_RIGHTS` data sent with this frame's bytes. Frames that arrive
    /// during the pause wait in the TAPs' queues for the receiver. (Appended last so
    /// that the encodings of the other messages stay as they were.)
    NetFds {
        count: u32,
    },
    /// Version 2 on: the sender switches over; it pauses the VM once the receiver answers
    /// `SwitchOverReady`, and what follows is the switch-over (the last memory frames in
    /// copy mode, then the state frame and `Complete`). The receiver raises its thread's
    /// priority here: the final pages are read while the guest is down, and without this
    /// message they look like pre-copy frames. Appended last so that the encodings of the
    /// other messages stay as they were.
    SwitchOver,
}

impl SenderMessage {
    pub fn name(&self) -> &'static str {
        match self {
            SenderMessage::Hello(_) => "Hello",
            SenderMessage::MemoryFds { .. } => "MemoryFds",
            SenderMessage::IterationDone { .. } => "IterationDone",
            SenderMessage::Complete => "Complete",
            SenderMessage::Go => "Go",
            SenderMessage::Cancel { .. } => "Cancel",
            SenderMessage::Error { .. } => "Error",
            SenderMessage::NetFds { .. } => "NetFds",
            SenderMessage::SwitchOver => "SwitchOver",
        }
    }
}

/// Why a receiver refused the migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    UnsupportedVersion {
        offered: VersionRange,
        accepted: VersionRange,
    },
    UnknownMachineType {
        requested: String,
        supported: Vec<String>,
    },
    /// Not enough memory, too many vCPUs, local mode over TCP, ...
    Unsupported(String),
    InvalidConfig(String),
    /// Loading memory or state failed.
    LoadFailed(String),
    Other(String),
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefuseReason::UnsupportedVersion { offered, accepted } => write!(
                f,
                "unsupported migration protocol: the sender speaks version {offered}, \
                 this receiver (version {}) accepts {accepted}",
                accepted.max
            ),
            RefuseReason::UnknownMachineType {
                requested,
                supported,
            } => write!(
                f,
                "unknown machine type {requested:?}, this receiver runs {supported:?}"
            ),
            RefuseReason::Unsupported(s) => write!(f, "unsupported: {s}"),
            RefuseReason::InvalidConfig(s) => write!(f, "invalid configuration: {s}"),
            RefuseReason::LoadFailed(s) => write!(f, "loading failed: {s}"),
            // A peer's empty reason still reads as a refusal (found by the fuzzer).
            RefuseReason::Other(s) if s.trim().is_empty() => {
                f.write_str("refused by the receiver, which gave no reason")
            }
            RefuseReason::Other(s) => f.write_str(s),
        }
    }
}

/// Messages from receiver to sender (the return path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiverMessage {
    Accept {
        version: u32,
    },
    Refuse {
        reason: RefuseReason,
    },
    /// Memory and state are loaded; the receiver waits for `Go`.
    Ready,
    /// The destination runs the guest.
    Started {
        /// `CLOCK_REALTIME` of the destination, in ns since the epoch, when the
        /// vCPUs were resumed (comparable with the sender's pause time on the
        /// same host).
        resumed_realtime_ns: u64,
        /// Time from receiving `Go` to resuming, measured by the destination,
        /// in microseconds (for cross-host downtime estimates).
        go_to_resume_us: u64,
    },
    /// The receiver failed to start the guest after `Go`; it does not run it.
    Abort {
        reason: String,
    },
    Error {
        reason: String,
    },
    /// Local mode: the receiver mapped and pre-faulted the handed-over memory and
    /// prepared the VM shell; the sender may pause now (appended last so that the
    /// encodings of the frozen messages stay as they were).
    MemoryMapped,
    /// Version 2 on: the answer to `SwitchOver`, written once the receiver's thread runs
    /// at its raised priority; the sender pauses the VM only after it (appended last).
    SwitchOverReady,
}

impl ReceiverMessage {
    pub fn name(&self) -> &'static str {
        match self {
            ReceiverMessage::Accept { .. } => "Accept",
            ReceiverMessage::Refuse { .. } => "Refuse",
            ReceiverMessage::Ready => "Ready",
            ReceiverMessage::Started { .. } => "Started",
            ReceiverMessage::Abort { .. } => "Abort",
            ReceiverMessage::Error { .. } => "Error",
            ReceiverMessage::MemoryMapped => "MemoryMapped",
            ReceiverMessage::SwitchOverReady => "SwitchOverReady",
        }
    }
}

/// The preamble bytes for `version`.
pub fn encode_preamble(version: u32) -> [u8; PREAMBLE_LEN] {
    let mut b = [0u8; PREAMBLE_LEN];
    b[..8].copy_from_slice(&STREAM_MAGIC);
    b[8..].copy_from_slice(&version.to_le_bytes());
    b
}

/// Checks the magic and returns the peer's version.
pub fn decode_preamble(b: &[u8; PREAMBLE_LEN]) -> Result<u32, ProtocolError> {
    let mut found = [0u8; 8];
    found.copy_from_slice(&b[..8]);
    if found != STREAM_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: STREAM_MAGIC,
            found,
        });
    }
    Ok(u32::from_le_bytes([b[8], b[9], b[10], b[11]]))
}

/// Picks the highest version in both ranges, or refuses naming both.
pub fn negotiate_version(
    offered: VersionRange,
    accepted: VersionRange,
) -> Result<u32, RefuseReason> {
    let lo = offered.min.max(accepted.min);
    let hi = offered.max.min(accepted.max);
    if offered.min <= offered.max && lo <= hi {
        Ok(hi)
    } else {
        Err(RefuseReason::UnsupportedVersion { offered, accepted })
    }
}

/// What a receiver can run, to check a [`Hello`] against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverCapabilities {
    pub accepted_versions: VersionRange,
    pub machine_types: Vec<String>,
    /// Largest guest memory this receiver will take, in bytes.
    pub max_memory_bytes: u64,
    pub max_vcpus: u32,
    /// Whether local mode is possible on this transport (a Unix socket).
    pub local_mode: bool,
}

/// The receiver's whole handshake decision: the chosen version or the refusal.
pub fn check_hello(hello: &Hello, caps: &ReceiverCapabilities) -> Result<u32, RefuseReason> {
    let version = negotiate_version(hello.versions, caps.accepted_versions)?;
    if !caps.machine_types.contains(&hello.machine_type) {
        return Err(RefuseReason::UnknownMachineType {
            requested: hello.machine_type.clone(),
            supported: caps.machine_types.clone(),
        });
    }
    hello
        .memory
        .validate()
        .map_err(|e| RefuseReason::InvalidConfig(e.to_string()))?;
    let mem = hello.memory.total_bytes();
    if mem > caps.max_memory_bytes {
        return Err(RefuseReason::Unsupported(format!(
            "guest memory of {mem} bytes exceeds the {} bytes available",
            caps.max_memory_bytes
        )));
    }
    if hello.vcpus == 0 || hello.vcpus > caps.max_vcpus {
        return Err(RefuseReason::Unsupported(format!(
            "{} vCPUs requested, 1..={} supported",
            hello.vcpus, caps.max_vcpus
        )));
    }
    if hello.mode == MigrationMode::Local && !caps.local_mode {
        return Err(RefuseReason::Unsupported(
            "local mode needs a Unix socket on the same host".into(),
        ));
    }
    for (what, s) in [
        ("machine type", &hello.machine_type),
        ("launcher version", &hello.launcher_version),
    ] {
        if s.len() > MAX_STRING_LEN {
            return Err(RefuseReason::InvalidConfig(format!("{what} too long")));
        }
    }
    Ok(version)
}

/// Checks that a `MemoryFds` message describes exactly the layout announced
/// in `Hello`, one fd per region.
pub fn check_memory_fds(regions: &[FdRegion], layout: &MemoryLayout) -> Result<(), ProtocolError> {
    let bad = |detail: String| ProtocolError::InvalidMessage {
        what: "MemoryFds",
        detail,
    };
    if regions.len() != layout.regions.len() {
        return Err(bad(format!(
            "{} fd regions for a layout of {} regions",
            regions.len(),
            layout.regions.len()
        )));
    }
    for (i, (f, r)) in regions.iter().zip(&layout.regions).enumerate() {
        if f.gpa != r.gpa || f.size != r.size {
            return Err(bad(format!(
                "fd region {i} is ({:#x}, {:#x}), the layout says ({:#x}, {:#x})",
                f.gpa, f.size, r.gpa, r.size
            )));
        }
        if f.file_offset & (PAGE_SIZE - 1) != 0 {
            return Err(bad(format!("fd region {i} has an unaligned file offset")));
        }
    }
    Ok(())
}

/// What arrived on the sender→receiver direction, as seen by [`ReceiverPhase`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    Hello,
    MemoryFds,
    Memory,
    IterationDone(u64),
    State,
    Complete,
    Go,
    Cancel,
    Error,
    NetFds,
    SwitchOver,
}

impl Incoming {
    pub fn of(msg: &SenderMessage) -> Self {
        match msg {
            SenderMessage::Hello(_) => Incoming::Hello,
            SenderMessage::MemoryFds { .. } => Incoming::MemoryFds,
            SenderMessage::IterationDone { iteration } => Incoming::IterationDone(*iteration),
            SenderMessage::Complete => Incoming::Complete,
            SenderMessage::Go => Incoming::Go,
            SenderMessage::Cancel { .. } => Incoming::Cancel,
            SenderMessage::Error { .. } => Incoming::Error,
            SenderMessage::NetFds { .. } => Incoming::NetFds,
            SenderMessage::SwitchOver => Incoming::SwitchOver,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Incoming::Hello => "Hello",
            Incoming::MemoryFds => "MemoryFds",
            Incoming::Memory => "memory frame",
            Incoming::IterationDone(_) => "IterationDone",
            Incoming::State => "state frame",
            Incoming::Complete => "Complete",
            Incoming::Go => "Go",
            Incoming::Cancel => "Cancel",
            Incoming::Error => "Error",
            Incoming::NetFds => "NetFds",
            Incoming::SwitchOver => "SwitchOver",
        }
    }
}

/// The receiver's state machine: checks the order of what the sender sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverPhase {
    AwaitHello,
    Precopy {
        mode: MigrationMode,
        /// The negotiated protocol version (which messages may arrive).
        version: u32,
        next_iteration: u64,
        fds_received: bool,
        state_received: bool,
        /// Local mode: the TAP fds arrived (`NetFds`).
        net_fds_received: bool,
        /// Version 2 on: `SwitchOver` arrived (the source is pausing).
        switched_over: bool,
    },
    AwaitGo,
    Started,
    /// Cancelled or failed: nothing more is accepted.
    Failed,
}

impl ReceiverPhase {
    /// After the receiver accepted a `Hello` with `mode` and chose `version`.
    pub fn accepted(mode: MigrationMode, version: u32) -> Self {
        ReceiverPhase::Precopy {
            mode,
            version,
            next_iteration: 0,
            fds_received: false,
            state_received: false,
            net_fds_received: false,
            switched_over: false,
        }
    }

    /// Applies `what`; errors when it is out of order. `Hello` is handled by
    /// [`ReceiverPhase::accepted`], so it is always out of order here. `Cancel`
    /// and `Error` are accepted before `Go` and move to `Failed` with an error
    /// telling the caller to discard everything.
    pub fn advance(&mut self, what: Incoming) -> Result<(), ProtocolError> {
        let unexpected = |phase: &ReceiverPhase| ProtocolError::UnexpectedMessage {
            phase: phase.describe(),
            got: what.name(),
        };
        match (&mut *self, what) {
            (ReceiverPhase::Precopy { .. } | ReceiverPhase::AwaitGo, Incoming::Cancel) => {
                *self = ReceiverPhase::Failed;
                Err(ProtocolError::Cancelled("sender cancelled".into()))
            }
            (_, Incoming::Error) => {
                *self = ReceiverPhase::Failed;
                Err(ProtocolError::PeerError("sender reported an error".into()))
            }
            (
                ReceiverPhase::Precopy {
                    mode: MigrationMode::Copy,
                    state_received: false,
                    ..
                },
                Incoming::Memory,
            ) => Ok(()),
            (
                ReceiverPhase::Precopy {
                    mode: MigrationMode::Local,
                    fds_received: fds @ false,
                    ..
                },
                Incoming::MemoryFds,
            ) => {
                *fds = true;
                Ok(())
            }
            (
                ReceiverPhase::Precopy {
                    mode: MigrationMode::Local,
                    fds_received: true,
                    state_received: false,
                    net_fds_received: net @ false,
                    ..
                },
                Incoming::NetFds,
            ) => {
                *net = true;
                Ok(())
            }
            (
                ReceiverPhase::Precopy {
                    next_iteration,
                    state_received: false,
                    switched_over: false,
                    ..
                },
                Incoming::IterationDone(n),
            ) if n == *next_iteration => {
                *next_iteration += 1;
                Ok(())
            }
            (
                ReceiverPhase::Precopy {
                    version,
                    state_received: false,
                    switched_over: sw @ false,
                    ..
                },
                Incoming::SwitchOver,
            ) if *version >= SWITCH_OVER_VERSION => {
                *sw = true;
                Ok(())
            }
            (
                ReceiverPhase::Precopy {
                    state_received: st @ false,
                    mode,
                    version,
                    fds_received,
                    switched_over,
                    ..
                },
                Incoming::State,
            ) if (*mode == MigrationMode::Copy || *fds_received)
                && (*switched_over || *version < SWITCH_OVER_VERSION) =>
            {
                *st = true;
                Ok(())
            }
            (
                ReceiverPhase::Precopy {
                    state_received: true,
                    ..
                },
                Incoming::Complete,
            ) => {
                *self = ReceiverPhase::AwaitGo;
                Ok(())
            }
            (ReceiverPhase::AwaitGo, Incoming::Go) => {
                *self = ReceiverPhase::Started;
                Ok(())
            }
            (phase, _) => {
                let e = unexpected(phase);
                *self = ReceiverPhase::Failed;
                Err(e)
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            ReceiverPhase::AwaitHello => "awaiting Hello".into(),
            ReceiverPhase::Precopy {
                mode,
                version,
                next_iteration,
                fds_received,
                state_received,
                net_fds_received,
                switched_over,
            } => format!(
                "in pre-copy (version {version}, {mode} mode, next iteration {next_iteration}, \
                 fds received: {fds_received}, state received: {state_received}, TAP fds \
                 received: {net_fds_received}, switch-over announced: {switched_over})"
            ),
            ReceiverPhase::AwaitGo => "awaiting Go".into(),
            ReceiverPhase::Started => "running".into(),
            ReceiverPhase::Failed => "failed".into(),
        }
    }
}

/// The sender's state machine over the return path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderPhase {
    AwaitAccept,
    Precopy,
    /// Version 2: `SwitchOver` was sent; the VM still runs until `SwitchOverReady`.
    AwaitSwitchOverReady,
    /// Version 2: the receiver is raised; the sender pauses and sends the rest.
    SwitchingOver,
    AwaitReady,
    ReadyToGo,
    /// `Go` was sent: the source must never resume on its own.
    AwaitStarted,
    Done,
    Failed,
}

impl SenderPhase {
    /// Whether the source VM may (and must) resume if the migration fails now.
    pub fn source_may_resume(self) -> bool {
        !matches!(self, SenderPhase::AwaitStarted | SenderPhase::Done)
    }

    /// The sender sent `SwitchOver` (version 2; the VM still runs).
    pub fn sent_switch_over(&mut self) -> Result<(), ProtocolError> {
        self.sent(
            SenderPhase::Precopy,
            SenderPhase::AwaitSwitchOverReady,
            "SwitchOver",
        )
    }

    /// The sender sent `Complete` (after pausing): from `Precopy` in version 1, from
    /// `SwitchingOver` in version 2.
    pub fn sent_complete(&mut self) -> Result<(), ProtocolError> {
        let from = if *self == SenderPhase::SwitchingOver {
            SenderPhase::SwitchingOver
        } else {
            SenderPhase::Precopy
        };
        self.sent(from, SenderPhase::AwaitReady, "Complete")
    }

    /// The sender sent `Go`.
    pub fn sent_go(&mut self) -> Result<(), ProtocolError> {
        self.sent(SenderPhase::ReadyToGo, SenderPhase::AwaitStarted, "Go")
    }

    fn sent(
        &mut self,
        from: SenderPhase,
        to: SenderPhase,
        what: &'static str,
    ) -> Result<(), ProtocolError> {
        if *self == from {
            *self = to;
            Ok(())
        } else {
            Err(ProtocolError::UnexpectedMessage {
                phase: format!("{self:?}"),
                got: what,
            })
        }
    }

    /// Applies a message from the receiver. Refusals, errors and aborts move
    /// to `Failed` (the source resumes) and come back as the matching error,
    /// except after `Go`: there only `Abort` moves to `Failed`.
    pub fn advance(&mut self, msg: &ReceiverMessage) -> Result<(), ProtocolError> {
        let phase = *self;
        let result = match (phase, msg) {
            (SenderPhase::AwaitAccept, ReceiverMessage::Accept { version }) => {
                if VersionRange::ours().contains(*version) {
                    *self = SenderPhase::Precopy;
                    return Ok(());
                }
                Err(ProtocolError::InvalidMessage {
                    what: "Accept",
                    detail: format!(
                        "receiver chose version {version}, this sender offered {}",
                        VersionRange::ours()
                    ),
                })
            }
            (SenderPhase::Precopy, ReceiverMessage::MemoryMapped) => return Ok(()),
            (SenderPhase::AwaitSwitchOverReady, ReceiverMessage::SwitchOverReady) => {
                *self = SenderPhase::SwitchingOver;
                return Ok(());
            }
            (SenderPhase::AwaitReady, ReceiverMessage::Ready) => {
                *self = SenderPhase::ReadyToGo;
                return Ok(());
            }
            (SenderPhase::AwaitStarted, ReceiverMessage::Started { .. }) => {
                *self = SenderPhase::Done;
                return Ok(());
            }
            (
                SenderPhase::AwaitAccept | SenderPhase::AwaitReady,
                ReceiverMessage::Refuse { reason },
            ) => Err(ProtocolError::Refused(reason.clone())),
            (SenderPhase::AwaitStarted, ReceiverMessage::Abort { reason }) => {
                Err(ProtocolError::Aborted(reason.clone()))
            }
            (p, ReceiverMessage::Error { reason }) if p != SenderPhase::Done => {
                Err(ProtocolError::PeerError(reason.clone()))
            }
            (p, m) => Err(ProtocolError::UnexpectedMessage {
                phase: format!("{p:?}"),
                got: m.name(),
            }),
        };
        // After Go only an explicit Abort proves that D does not run the
        // guest; any other failure leaves the outcome unknown and the source
        // paused (the phase stays AwaitStarted, `source_may_resume` false).
        if phase != SenderPhase::AwaitStarted || matches!(result, Err(ProtocolError::Aborted(_))) {
            *self = SenderPhase::Failed;
        }
        result
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;

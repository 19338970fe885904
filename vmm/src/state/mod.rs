//! `VmState`: everything needed to continue a VM elsewhere, except guest memory, and its
//! encoding as versioned sections.
//!
//! # The encoding
//!
//! ```text
//! magic "LVMSTATE" (8 bytes) | envelope version u32 LE (1) | bincode Vec<Section>
//! Section { name: String, instance: u32, version: u32, data: bincode of the section's struct }
//! ```
//!
//! As in QEMU's VMState sections, each concept carries its own version, so that a change
//! to one device does not change the format of the others:
//!
//! | section      | instance            | struct                | version |
//! |--------------|---------------------|-----------------------|---------|
//! | `config`     | 0                   | [`VmConfig`]          | 1       |
//! | `vcpu`       | vCPU index          | [`VcpuState`]         | 1       |
//! | `kvm-vm`     | 0                   | [`VmKvmState`]        | 1       |
//! | `serial`     | 0                   | `SerialState` (COM1)  | 1       |
//! | `acpi-pm`    | 0                   | `AcpiPmState`         | 1       |
//! | `pci-host`   | 0                   | `PciState`            | 1       |
//! | `virtio-blk` | index in `disks`    | `VirtioPciState`      | 1       |
//! | `virtio-net` | index in `nets`     | `VirtioPciState`      | 1       |
//! | `virtio-msix`| disks, then nets    | `TransportMsixState` (optional) | 1 |
//! | `virtio-net-offload` | index in `nets` | `NetOffloadState` (only when a driver negotiated an offload) | 1 |
//!
//! Loading dispatches on the version each section names ([`Versioned`]): the current one
//! decodes directly, an older one in the accepted window goes through that struct's
//! [`Versioned::upgrade`], and a newer one, an unknown section name, a duplicate or a
//! missing section is refused with a reason naming the section ([`StateError`]). Nothing
//! is ever decoded "to see if it fits" — except the frozen unsectioned format of earlier
//! launchers (see below).
//!
//! # Adding a section or bumping a version (for device authors)
//!
//! - **New device**: give its state struct (serde, no fds, no pointers) an
//!   `impl Versioned` with `VERSION = 1` in `sections.rs`, add a name to [`names`] and to
//!   `KNOWN`, write it in `to_sections` and read it in `from_sections`. An older launcher
//!   refuses a state with the new section (unknown name), which is right: it could not
//!   run the device. If the section is optional for older states, let `from_sections`
//!   default it when absent.
//! - **Changed struct** (for example `VirtioPciState` gaining the negotiated features,
//!   queue indices or an MSI-X table): first copy the struct as it is now into
//!   `sections.rs` as a frozen `FooV<n>` (private, `Deserialize` only, never edited
//!   again), then change the live struct, raise its `VERSION` to n+1 and implement
//!   `upgrade(n, data)` as "decode `FooV<n>`, convert". `legacy.rs` decodes the
//!   unsectioned format into the live structs too: point its shapes at `FooV1` (and
//!   convert) when `Foo` first changes. Keep `MIN_VERSION` at the oldest version that a
//!   launcher still in the migration window (`migration::protocol`: own and previous
//!   protocol version) or an accepted snapshot format can write; raise it only when that
//!   launcher leaves the window. The fixtures in `vmm/tests/fixtures/` (states written by
//!   earlier launchers) must keep loading: `cargo test -p vmm state` fails if a live
//!   struct that an old format still decodes into was changed without freezing it first.
//!
//! # The unsectioned format of earlier launchers
//!
//! Launchers before sections wrote the bare bincode of `VmState` in three shapes (without
//! disks, with disks, with disks and network interfaces), all under snapshot format 1
//! and migration protocol 1, with no version field. Bytes that do not start with the
//! magic are that format (no such state can start with it: it would name a guest of
//! about 5 EiB); `legacy.rs` recognises the three frozen shapes, newest first. The set
//! is closed: no launcher writes it any more.

mod legacy;
mod sections;
#[cfg(test)]
mod tests;

use crate::config::VmConfig;
use crate::devices::platform::PlatformState;
use crate::devices::virtio::VirtioDevicesState;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmKvmState;

pub use sections::{names, payload, Versioned, ENVELOPE_VERSION, MAGIC};

/// The whole state of a paused VM, memory aside. Encoded as versioned sections into
/// snapshots and migration streams; the machine type inside `config` decides whether a
/// receiver can run it at all.
#[derive(Debug)]
pub struct VmState {
    /// The configuration, machine type included.
    pub config: VmConfig,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Irqchips, PIT, clock.
    pub kvm: VmKvmState,
    /// Emulated devices.
    pub platform: PlatformState,
    /// virtio-pci devices, in `config.disks` and `config.nets` order. No request is ever
    /// in flight in a saved state: the pause waits for the device workers to complete
    /// the request they are on, and they take no new one.
    pub devices: VirtioDevicesState,
}

/// Upper bound on a serialised `VmState`, checked before allocating on load.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// Errors encoding or decoding a `VmState`.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// bincode refused the bytes.
    #[error("VM state does not decode: {0}")]
    Decode(String),
    /// bincode could not encode.
    #[error("VM state does not encode: {0}")]
    Encode(String),
    /// The envelope was written by a newer launcher.
    #[error("VM state envelope version {found} is newer than this launcher reads ({ENVELOPE_VERSION}); load it with a launcher at least as new as the one that wrote it")]
    NewerEnvelope {
        /// The version found.
        found: u32,
    },
    /// A section in a version newer than this build knows.
    #[error("VM state section {name:?} #{instance} has version {found}, newer than this launcher reads (up to {max}); load it with a launcher at least as new as the one that wrote it")]
    NewerSection {
        /// Section name.
        name: String,
        /// Instance number.
        instance: u32,
        /// The version found.
        found: u32,
        /// The newest version this build reads.
        max: u32,
    },
    /// A section in a version older than this build still converts.
    #[error("VM state section {name:?} #{instance} has version {found}, older than this launcher reads ({min}..={max}); load it with an intermediate launcher first")]
    OlderSection {
        /// Section name.
        name: String,
        /// Instance number.
        instance: u32,
        /// The version found.
        found: u32,
        /// The oldest version this build reads.
        min: u32,
        /// The newest version this build reads.
        max: u32,
    },
    /// A section this build does not know (a device added by a newer launcher).
    #[error("VM state has a section {name:?} (version {version}) that this launcher does not know: it was written by a newer launcher with a device this one cannot run")]
    UnknownSection {
        /// Section name.
        name: String,
        /// Its version.
        version: u32,
    },
    /// Sections missing, repeated or numbered with gaps.
    #[error("VM state is malformed: {0}")]
    Malformed(String),
}

impl VmState {
    /// Encode as versioned sections, with the size limit.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        sections::encode(self)
    }

    /// Decode, refusing anything over the limit, with trailing bytes, or with a section
    /// this build does not read. The unsectioned format of earlier launchers loads too.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.starts_with(MAGIC) {
            sections::decode(bytes)
        } else {
            legacy::decode(bytes)
        }
    }
}

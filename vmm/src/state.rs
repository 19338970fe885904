//! `VmState`: everything needed to continue a VM elsewhere, except guest memory.

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::platform::PlatformState;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmKvmState;

/// The whole state of a paused VM, memory aside. Serialised with bincode into
/// snapshots and migration streams; the machine type inside `config` decides
/// whether a receiver can run it at all.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The configuration, machine type included.
    pub config: VmConfig,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Irqchips, PIT, clock.
    pub kvm: VmKvmState,
    /// Emulated devices.
    pub platform: PlatformState,
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
}

fn options() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_limit(MAX_STATE_BYTES)
        .with_fixint_encoding()
        .reject_trailing_bytes()
}

impl VmState {
    /// Serialise with the size limit.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        use bincode::Options;
        options()
            .serialize(self)
            .map_err(|e| StateError::Encode(e.to_string()))
    }

    /// Deserialise, refusing anything over the limit or with trailing bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        use bincode::Options;
        options()
            .deserialize(bytes)
            .map_err(|e| StateError::Decode(e.to_string()))
    }
}

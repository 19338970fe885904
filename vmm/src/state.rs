//! `VmState`: everything needed to continue a VM elsewhere, except guest memory.

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::platform::PlatformState;
use crate::devices::virtio::VirtioDevicesState;
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
    /// virtio-pci devices (data disks), in `config.disks` order. No request is ever in
    /// flight in a saved state: requests complete on the vCPU thread that notified them.
    #[serde(default)]
    pub devices: VirtioDevicesState,
}

/// `VmState` as launchers without disk support wrote it (no `config.disks`, no `devices`):
/// bincode has no field names, so an older stream decodes only through this shape.
#[derive(Deserialize)]
struct LegacyVmState {
    config: LegacyVmConfig,
    vcpus: Vec<VcpuState>,
    kvm: VmKvmState,
    platform: PlatformState,
}

#[derive(Deserialize)]
struct LegacyVmConfig {
    memory_bytes: u64,
    vcpus: u8,
    machine_type: String,
    kernel: String,
    initrd: Option<String>,
    cmdline: String,
}

impl From<LegacyVmState> for VmState {
    fn from(s: LegacyVmState) -> Self {
        let c = s.config;
        VmState {
            config: VmConfig {
                memory_bytes: c.memory_bytes,
                vcpus: c.vcpus,
                machine_type: c.machine_type,
                kernel: c.kernel,
                initrd: c.initrd,
                cmdline: c.cmdline,
                disks: Vec::new(),
                nets: Vec::new(),
            },
            vcpus: s.vcpus,
            kvm: s.kvm,
            platform: s.platform,
            devices: VirtioDevicesState::default(),
        }
    }
}

/// `VmState` as launchers with disks but without network interfaces wrote it (no
/// `config.nets`, no `devices.net`).
#[derive(Deserialize)]
struct DisksVmState {
    config: DisksVmConfig,
    vcpus: Vec<VcpuState>,
    kvm: VmKvmState,
    platform: PlatformState,
    devices: DisksDevicesState,
}

#[derive(Deserialize)]
struct DisksVmConfig {
    memory_bytes: u64,
    vcpus: u8,
    machine_type: String,
    kernel: String,
    initrd: Option<String>,
    cmdline: String,
    disks: Vec<crate::config::DiskConfig>,
}

#[derive(Deserialize)]
struct DisksDevicesState {
    block: Vec<crate::devices::virtio::VirtioPciState>,
}

impl From<DisksVmState> for VmState {
    fn from(s: DisksVmState) -> Self {
        let c = s.config;
        VmState {
            config: VmConfig {
                memory_bytes: c.memory_bytes,
                vcpus: c.vcpus,
                machine_type: c.machine_type,
                kernel: c.kernel,
                initrd: c.initrd,
                cmdline: c.cmdline,
                disks: c.disks,
                nets: Vec::new(),
            },
            vcpus: s.vcpus,
            kvm: s.kvm,
            platform: s.platform,
            devices: VirtioDevicesState {
                block: s.devices.block,
                net: Vec::new(),
            },
        }
    }
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

    /// Deserialise, refusing anything over the limit or with trailing bytes. A state
    /// written before network interfaces existed decodes too (as a VM without them), and
    /// one written before disks existed (as a VM without disks).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        use bincode::Options;
        options().deserialize(bytes).or_else(|e| {
            options()
                .deserialize::<DisksVmState>(bytes)
                .map(VmState::from)
                .or_else(|_| {
                    options()
                        .deserialize::<LegacyVmState>(bytes)
                        .map(VmState::from)
                })
                .map_err(|_| StateError::Decode(e.to_string()))
        })
    }
}

//! The unsectioned state of launchers before sections (frozen: nothing writes it now).
//!
//! Those launchers wrote the bare bincode of their `VmState`, in three shapes over time,
//! all under snapshot format 1 and migration protocol 1, without any version field. The
//! bytes therefore cannot say which shape they are: the three are recognised here, the
//! newest first, each decoded completely (no trailing byte allowed). The list is closed
//! and never grows, since every launcher from sections on writes explicit versions.
//!
//! The newest shape decodes into today's structs (they have not changed since); when one
//! of them changes, its old form must be frozen here first (see the module above), which
//! the fixtures in `vmm/tests/fixtures/` enforce.

use serde::Deserialize;

use super::sections::options;
use super::{StateError, VmState};
use crate::config::{DiskConfig, VmConfig};
use crate::devices::platform::PlatformState;
use crate::devices::virtio::{VirtioDevicesState, VirtioPciState};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmKvmState;

/// The last unsectioned shape: disks and network interfaces.
#[derive(Deserialize)]
struct NetsShape {
    config: VmConfig,
    vcpus: Vec<VcpuState>,
    kvm: VmKvmState,
    platform: PlatformState,
    devices: VirtioDevicesState,
}

/// Launchers with disks but without network interfaces.
#[derive(Deserialize)]
struct DisksShape {
    config: DisksConfig,
    vcpus: Vec<VcpuState>,
    kvm: VmKvmState,
    platform: PlatformState,
    devices: DisksDevices,
}

/// The fields of `PlainConfig`, then the disks (bincode is positional: a nested struct
/// encodes exactly as its fields in line).
#[derive(Deserialize)]
struct DisksConfig {
    base: PlainConfig,
    disks: Vec<DiskConfig>,
}

#[derive(Deserialize)]
struct DisksDevices {
    block: Vec<VirtioPciState>,
}

/// Launchers without disk support.
#[derive(Deserialize)]
struct PlainShape {
    config: PlainConfig,
    vcpus: Vec<VcpuState>,
    kvm: VmKvmState,
    platform: PlatformState,
}

#[derive(Deserialize)]
struct PlainConfig {
    memory_bytes: u64,
    vcpus: u8,
    machine_type: String,
    kernel: String,
    initrd: Option<String>,
    cmdline: String,
}

impl From<NetsShape> for VmState {
    fn from(s: NetsShape) -> Self {
        VmState {
            config: s.config,
            vcpus: s.vcpus,
            kvm: s.kvm,
            platform: s.platform,
            devices: s.devices,
        }
    }
}

impl PlainConfig {
    fn with_disks(self, disks: Vec<DiskConfig>) -> VmConfig {
        VmConfig {
            memory_bytes: self.memory_bytes,
            vcpus: self.vcpus,
            machine_type: self.machine_type,
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            disks,
            nets: Vec::new(),
        }
    }
}

impl From<DisksShape> for VmState {
    fn from(s: DisksShape) -> Self {
        VmState {
            config: s.config.base.with_disks(s.config.disks),
            vcpus: s.vcpus,
            kvm: s.kvm,
            platform: s.platform,
            devices: VirtioDevicesState {
                block: s.devices.block,
                ..Default::default()
            },
        }
    }
}

impl From<PlainShape> for VmState {
    fn from(s: PlainShape) -> Self {
        VmState {
            config: s.config.with_disks(Vec::new()),
            vcpus: s.vcpus,
            kvm: s.kvm,
            platform: s.platform,
            devices: VirtioDevicesState::default(),
        }
    }
}

/// Decode an unsectioned state (see the module comment for why this is the one place
/// that recognises shapes instead of reading a version).
pub(super) fn decode(bytes: &[u8]) -> Result<VmState, StateError> {
    use bincode::Options;
    options()
        .deserialize::<NetsShape>(bytes)
        .map(VmState::from)
        .or_else(|e| {
            options()
                .deserialize::<DisksShape>(bytes)
                .map(VmState::from)
                .or_else(|_| options().deserialize::<PlainShape>(bytes).map(VmState::from))
                .map_err(|_| {
                    StateError::Decode(format!(
                        "neither a sectioned state (no LVMSTATE magic) nor one of an earlier launcher: {e}"
                    ))
                })
        })
}

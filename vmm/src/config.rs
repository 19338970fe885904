//! What a VM is made of: memory size, vCPUs, kernel, machine type.

use serde::{Deserialize, Serialize};

/// The machine types this build can run, newest first. A machine type names a
/// guest-visible platform (memory map, devices, ACPI tables); a VM keeps the one
/// it was created with for its whole life, across every update and migration.
pub const MACHINE_TYPES: &[&str] = &["q35-1.0"];

/// The unversioned alias and what it resolves to today.
pub const MACHINE_TYPE_ALIAS: (&str, &str) = ("q35", "q35-1.0");

/// Most vCPUs a VM may have (the MADT and our CPUID topology fit 255 APIC ids); shared
/// with noded through `contracts::limits`.
pub const MAX_VCPUS: u8 = contracts::limits::MAX_VCPUS;

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A machine type this launcher does not implement.
    #[error("unknown machine type {0:?}; this launcher supports {known}", known = MACHINE_TYPES.join(", "))]
    UnknownMachineType(String),
    /// vCPU count out of range.
    #[error("vCPU count {0} is invalid: use 1 to {MAX_VCPUS}")]
    Vcpus(u32),
    /// A size string that does not parse.
    #[error("invalid size {0:?}: use a number with an optional suffix, like 128M, 1G or 512Mi")]
    Size(String),
    /// A disk list that cannot be built.
    #[error("invalid disk {0}")]
    Disk(String),
    /// A network interface list that is invalid.
    #[error("invalid network interface {0}")]
    Net(String),
}

/// Resolve a machine type name (or the `q35` alias) to a supported versioned name.
pub fn resolve_machine_type(name: &str) -> Result<&'static str, ConfigError> {
    if name == MACHINE_TYPE_ALIAS.0 {
        return Ok(MACHINE_TYPE_ALIAS.1);
    }
    MACHINE_TYPES
        .iter()
        .find(|m| **m == name)
        .copied()
        .ok_or_else(|| ConfigError::UnknownMachineType(name.to_string()))
}

/// Parse `128M`, `1G`, `512Mi`, `4096` (bytes), `2GiB`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "ki" | "kib" | "kb" => 10,
        "m" | "mi" | "mib" | "mb" => 20,
        "g" | "gi" | "gib" | "gb" => 30,
        "t" | "ti" | "tib" | "tb" => 40,
        _ => return Err(err()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// The configuration a VM was created with. Travels in snapshots and migration
/// streams, so that a restored VM is the same machine.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Versioned machine type (for example `q35-1.0`).
    pub machine_type: String,
    /// Kernel path, as given (informational after boot).
    pub kernel: String,
    /// Initrd path, as given.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// Data disks (virtio-blk), in PCI slot order. See [`DiskConfig`].
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Network interfaces (virtio-net on a TAP), in PCI slot order. See [`NetConfig`].
    #[serde(default)]
    pub nets: Vec<NetConfig>,
}

pub use crate::devices::virtio::netcfg::{NetConfig, MAX_NETS};

/// Most data disks per VM (one PCI slot and one IOAPIC pin each).
pub const MAX_DISKS: usize = contracts::limits::MAX_DISKS;

/// One data disk: a raw image file, shown to the guest as a virtio-blk device.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskConfig {
    /// Absolute path of the image file (its size must be a multiple of 512 bytes).
    pub path: String,
    /// Shown to the guest as read-only (VIRTIO_BLK_F_RO); the file is opened read-only.
    #[serde(default)]
    pub readonly: bool,
    /// The file lives on storage that other hosts reach too (informational for the VMM:
    /// the coordinator allows cross-host migration only when every disk is shared).
    #[serde(default)]
    pub shared: bool,
}

impl VmConfig {
    /// Check the parts that do not need the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        resolve_machine_type(&self.machine_type)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus as u32));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::Disk(format!(
                "list: {} disks, at most {MAX_DISKS} are supported",
                self.disks.len()
            )));
        }
        if let Some(d) = self.disks.iter().find(|d| d.path.is_empty()) {
            return Err(ConfigError::Disk(format!("{d:?}: the path is empty")));
        }
        crate::devices::virtio::netcfg::validate(&self.nets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_users_write_them() {
        assert_eq!(parse_size("128M").unwrap(), 128 << 20);
        assert_eq!(parse_size("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn machine_types_resolve_and_unknown_ones_are_refused() {
        assert_eq!(resolve_machine_type("q35").unwrap(), "q35-1.0");
        assert_eq!(resolve_machine_type("q35-1.0").unwrap(), "q35-1.0");
        let e = resolve_machine_type("pc-i440fx-9.0").unwrap_err();
        assert!(e.to_string().contains("q35-1.0"));
    }
}

//! The sectioned encoding of [`VmState`]: the envelope, one [`Versioned`] impl per
//! section struct, and the table of section names (see the module above for the rules).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{StateError, VmState, MAX_STATE_BYTES};
use crate::config::VmConfig;
use crate::devices::acpi_pm::AcpiPmState;
use crate::devices::pci::PciState;
use crate::devices::platform::PlatformState;
use crate::devices::serial::SerialState;
use crate::devices::virtio::net::NetOffloadState;
use crate::devices::virtio::pci::TransportMsixState;
use crate::devices::virtio::{VirtioDevicesState, VirtioPciState};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmKvmState;

/// First bytes of a sectioned state. As the unsectioned format's first field (the guest
/// memory size, u64 LE) it would mean about 5 EiB, which no launcher could ever create.
pub const MAGIC: &[u8; 8] = b"LVMSTATE";

/// Version of the envelope (magic, this number, the section list), not of any section.
pub const ENVELOPE_VERSION: u32 = 1;

/// Section names, as written on the wire.
pub mod names {
    /// [`crate::config::VmConfig`].
    pub const CONFIG: &str = "config";
    /// One [`crate::vstate::vcpu::VcpuState`] per vCPU.
    pub const VCPU: &str = "vcpu";
    /// [`crate::vstate::vm::VmKvmState`]: irqchips, PIT, clock.
    pub const KVM_VM: &str = "kvm-vm";
    /// COM1.
    pub const SERIAL: &str = "serial";
    /// The ACPI PM I/O block.
    pub const ACPI_PM: &str = "acpi-pm";
    /// PCI host bridge, CONFIG_ADDRESS and RST_CNT.
    pub const PCI_HOST: &str = "pci-host";
    /// One virtio-blk transport per data disk.
    pub const VIRTIO_BLK: &str = "virtio-blk";
    /// One virtio-net transport per network interface.
    pub const VIRTIO_NET: &str = "virtio-net";
    /// The MSI-X side of every virtio transport (table, pending bits, queue vectors):
    /// instance `i` is disk `i`, then the interfaces follow the disks. Absent in states
    /// of launchers without MSI-X: the devices then continue on INTx.
    pub const VIRTIO_MSIX: &str = "virtio-msix";
    /// The offloads negotiated by each virtio-net driver (instance = index in `nets`),
    /// only when one negotiated any: a launcher without offloads must refuse such a
    /// state. Absent: no offload.
    pub const VIRTIO_NET_OFFLOAD: &str = "virtio-net-offload";
}

/// Every section name this build reads; anything else is refused as unknown.
const KNOWN: &[&str] = &[
    names::CONFIG,
    names::VCPU,
    names::KVM_VM,
    names::SERIAL,
    names::ACPI_PM,
    names::PCI_HOST,
    names::VIRTIO_BLK,
    names::VIRTIO_NET,
    names::VIRTIO_MSIX,
    names::VIRTIO_NET_OFFLOAD,
];

/// A state struct that travels as a section: its version, and how older versions become
/// the current struct.
pub trait Versioned: Serialize + DeserializeOwned {
    /// The version this build writes.
    const VERSION: u32;
    /// The oldest version this build loads. Older ones are refused.
    const MIN_VERSION: u32 = Self::VERSION;

    /// Decode `data`, written as `version` (`MIN_VERSION <= version < VERSION`), into
    /// the current struct: decode the frozen struct of that version ([`payload`]) and
    /// convert it. Called only for such versions.
    fn upgrade(version: u32, data: &[u8]) -> Result<Self, StateError> {
        let _ = data;
        Err(StateError::Malformed(format!(
            "no conversion from version {version} (a bug: MIN_VERSION allows it)"
        )))
    }
}

impl Versioned for VmConfig {
    const VERSION: u32 = 1;
}
impl Versioned for VcpuState {
    const VERSION: u32 = 1;
}
impl Versioned for VmKvmState {
    const VERSION: u32 = 1;
}
impl Versioned for SerialState {
    const VERSION: u32 = 1;
}
impl Versioned for AcpiPmState {
    const VERSION: u32 = 1;
}
impl Versioned for PciState {
    const VERSION: u32 = 1;
}
impl Versioned for VirtioPciState {
    const VERSION: u32 = 1;
}
impl Versioned for TransportMsixState {
    const VERSION: u32 = 1;
}
impl Versioned for NetOffloadState {
    const VERSION: u32 = 1;
}

/// One section on the wire.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct Section {
    pub(crate) name: String,
    pub(crate) instance: u32,
    pub(crate) version: u32,
    pub(crate) data: Vec<u8>,
}

pub(super) fn options() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_limit(MAX_STATE_BYTES)
        .with_fixint_encoding()
        .reject_trailing_bytes()
}

/// Decode one frozen or current struct with the state's bincode options (for
/// [`Versioned::upgrade`] implementations).
pub fn payload<T: DeserializeOwned>(data: &[u8]) -> Result<T, StateError> {
    use bincode::Options;
    options()
        .deserialize(data)
        .map_err(|e| StateError::Decode(e.to_string()))
}

fn section<T: Versioned>(name: &str, instance: usize, s: &T) -> Result<Section, StateError> {
    use bincode::Options;
    Ok(Section {
        name: name.to_string(),
        instance: instance as u32,
        version: T::VERSION,
        data: options()
            .serialize(s)
            .map_err(|e| StateError::Encode(format!("section {name:?}: {e}")))?,
    })
}

/// Load one section, dispatching on its version.
pub(crate) fn load<T: Versioned>(s: &Section) -> Result<T, StateError> {
    let in_section = |e: StateError| {
        StateError::Decode(format!(
            "section {:?} #{} (version {}): {e}",
            s.name, s.instance, s.version
        ))
    };
    if s.version > T::VERSION {
        return Err(StateError::NewerSection {
            name: s.name.clone(),
            instance: s.instance,
            found: s.version,
            max: T::VERSION,
        });
    }
    if s.version < T::MIN_VERSION {
        return Err(StateError::OlderSection {
            name: s.name.clone(),
            instance: s.instance,
            found: s.version,
            min: T::MIN_VERSION,
            max: T::VERSION,
        });
    }
    if s.version == T::VERSION {
        payload(&s.data).map_err(in_section)
    } else {
        T::upgrade(s.version, &s.data).map_err(in_section)
    }
}

fn to_sections(st: &VmState) -> Result<Vec<Section>, StateError> {
    let mut out = vec![section(names::CONFIG, 0, &st.config)?];
    for (i, v) in st.vcpus.iter().enumerate() {
        out.push(section(names::VCPU, i, v)?);
    }
    out.push(section(names::KVM_VM, 0, &st.kvm)?);
    out.push(section(names::SERIAL, 0, &st.platform.serial)?);
    out.push(section(names::ACPI_PM, 0, &st.platform.acpi_pm)?);
    out.push(section(names::PCI_HOST, 0, &st.platform.pci)?);
    for (i, d) in st.devices.block.iter().enumerate() {
        out.push(section(names::VIRTIO_BLK, i, d)?);
    }
    for (i, d) in st.devices.net.iter().enumerate() {
        out.push(section(names::VIRTIO_NET, i, d)?);
    }
    for (i, m) in st.devices.msix.iter().enumerate() {
        out.push(section(names::VIRTIO_MSIX, i, m)?);
    }
    for (i, o) in st.devices.net_offload.iter().enumerate() {
        out.push(section(names::VIRTIO_NET_OFFLOAD, i, o)?);
    }
    Ok(out)
}

/// Sections grouped by name, each group in instance order 0..n.
struct Table(BTreeMap<String, Vec<Section>>);

impl Table {
    fn new(sections: Vec<Section>) -> Result<Self, StateError> {
        let mut map: BTreeMap<String, Vec<Section>> = BTreeMap::new();
        for s in sections {
            if !KNOWN.contains(&s.name.as_str()) {
                return Err(StateError::UnknownSection {
                    name: s.name,
                    version: s.version,
                });
            }
            map.entry(s.name.clone()).or_default().push(s);
        }
        for (name, group) in &mut map {
            group.sort_by_key(|s| s.instance);
            for (i, s) in group.iter().enumerate() {
                if s.instance as usize != i {
                    return Err(StateError::Malformed(format!(
                        "section {name:?} instances are not 0..{} (found #{} at position {i})",
                        group.len(),
                        s.instance
                    )));
                }
            }
        }
        Ok(Self(map))
    }

    /// Every instance of `name` (none if absent).
    fn all<T: Versioned>(&self, name: &str) -> Result<Vec<T>, StateError> {
        self.0
            .get(name)
            .map(|g| g.iter().map(load).collect())
            .unwrap_or(Ok(Vec::new()))
    }

    /// The one instance of `name`, which must be present.
    fn one<T: Versioned>(&self, name: &'static str) -> Result<T, StateError> {
        match self.0.get(name).map(Vec::as_slice) {
            Some([s]) => load(s),
            None => Err(StateError::Malformed(format!("no {name:?} section"))),
            Some(g) => Err(StateError::Malformed(format!(
                "{} {name:?} sections where one is expected",
                g.len()
            ))),
        }
    }
}

fn from_sections(sections: Vec<Section>) -> Result<VmState, StateError> {
    let t = Table::new(sections)?;
    let vcpus: Vec<VcpuState> = t.all(names::VCPU)?;
    if vcpus.is_empty() {
        return Err(StateError::Malformed("no \"vcpu\" section".into()));
    }
    Ok(VmState {
        config: t.one(names::CONFIG)?,
        vcpus,
        kvm: t.one(names::KVM_VM)?,
        platform: PlatformState {
            serial: t.one(names::SERIAL)?,
            acpi_pm: t.one(names::ACPI_PM)?,
            pci: t.one(names::PCI_HOST)?,
        },
        devices: VirtioDevicesState {
            block: t.all(names::VIRTIO_BLK)?,
            net: t.all(names::VIRTIO_NET)?,
            msix: t.all(names::VIRTIO_MSIX)?,
            net_offload: t.all(names::VIRTIO_NET_OFFLOAD)?,
        },
    })
}

pub(super) fn encode(st: &VmState) -> Result<Vec<u8>, StateError> {
    use bincode::Options;
    let sections = to_sections(st)?;
    let mut out = Vec::with_capacity(MAGIC.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&ENVELOPE_VERSION.to_le_bytes());
    options()
        .serialize_into(&mut out, &sections)
        .map_err(|e| StateError::Encode(e.to_string()))?;
    if out.len() as u64 > MAX_STATE_BYTES {
        return Err(StateError::Encode(format!(
            "{} bytes, more than the {MAX_STATE_BYTES} allowed",
            out.len()
        )));
    }
    Ok(out)
}

pub(super) fn decode(bytes: &[u8]) -> Result<VmState, StateError> {
    let rest = bytes.strip_prefix(MAGIC.as_slice()).unwrap_or(bytes);
    let Some((version, rest)) = rest.split_first_chunk::<4>() else {
        return Err(StateError::Malformed("the envelope ends early".into()));
    };
    let version = u32::from_le_bytes(*version);
    if version > ENVELOPE_VERSION {
        return Err(StateError::NewerEnvelope { found: version });
    }
    if version == 0 {
        return Err(StateError::Malformed(
            "envelope version 0 does not exist".into(),
        ));
    }
    from_sections(payload(rest)?)
}

/// The raw sections of an encoded state (tests build unusual states from them).
#[cfg(test)]
pub(crate) fn split(bytes: &[u8]) -> Vec<Section> {
    payload(&bytes[MAGIC.len() + 4..]).expect("sectioned state")
}

/// Encode raw sections into an envelope (tests).
#[cfg(test)]
pub(crate) fn join(sections: &[Section]) -> Vec<u8> {
    use bincode::Options;
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&ENVELOPE_VERSION.to_le_bytes());
    options().serialize_into(&mut out, sections).unwrap();
    out
}

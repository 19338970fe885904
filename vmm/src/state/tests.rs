use serde::{Deserialize, Serialize};

use super::sections::{join, load as load_section, payload, split, Section};
use super::*;

/// States written by earlier launchers and by this format's first version; see
/// `vmm/tests/fixtures/README.md` for how each was made.
fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What every fixture describes: the `pattern` guest, 32 MiB, 2 vCPUs.
fn check_common(s: &VmState) {
    assert_eq!(s.config.memory_bytes, 32 << 20);
    assert_eq!(s.config.vcpus, 2);
    assert_eq!(s.config.machine_type, "q35-1.0");
    assert_eq!(s.config.kernel, "pattern.elf");
    assert_eq!(s.config.cmdline, "mib=1 every=50");
    assert_eq!(s.vcpus.len(), 2);
    assert_eq!(s.vcpus[1].id, 1);
    assert_ne!(s.vcpus[0].regs.rip, 0, "the BSP was running guest code");
    assert_eq!(s.kvm.irqchips.len(), 3);
    s.config.validate().expect("a valid configuration");
}

#[test]
fn every_unsectioned_shape_of_earlier_launchers_loads() {
    let nets = VmState::from_bytes(&fixture("state-v0.bin")).expect("disks and nets");
    check_common(&nets);
    assert_eq!(nets.config.disks.len(), 1);
    assert_eq!(nets.devices.block.len(), 1);
    assert_eq!(nets.devices.block[0].backend_size, 1 << 20);
    assert_eq!(nets.config.nets.len(), 1);
    assert_eq!(nets.config.nets[0].mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(nets.devices.net.len(), 1);

    let disks = VmState::from_bytes(&fixture("state-v0-disks.bin")).expect("disks only");
    check_common(&disks);
    assert_eq!(disks.config.disks, nets.config.disks);
    assert_eq!(disks.devices.block, nets.devices.block);
    assert!(disks.config.nets.is_empty() && disks.devices.net.is_empty());

    let plain = VmState::from_bytes(&fixture("state-v0-nodisks.bin")).expect("no devices");
    check_common(&plain);
    assert!(plain.config.disks.is_empty() && plain.devices.block.is_empty());
    assert!(plain.config.nets.is_empty() && plain.devices.net.is_empty());
}

#[test]
fn an_old_state_is_written_back_as_sections_and_loads_unchanged() {
    let old = VmState::from_bytes(&fixture("state-v0.bin")).unwrap();
    let bytes = old.to_bytes().unwrap();
    assert!(bytes.starts_with(MAGIC));
    let names: Vec<(String, u32)> = split(&bytes)
        .into_iter()
        .map(|s| (s.name, s.instance))
        .collect();
    let n = |s: &str, i| (s.to_string(), i);
    assert_eq!(
        names,
        [
            n(names::CONFIG, 0),
            n(names::VCPU, 0),
            n(names::VCPU, 1),
            n(names::KVM_VM, 0),
            n(names::SERIAL, 0),
            n(names::ACPI_PM, 0),
            n(names::PCI_HOST, 0),
            n(names::VIRTIO_BLK, 0),
            n(names::VIRTIO_NET, 0),
        ]
    );
    let back = VmState::from_bytes(&bytes).unwrap();
    check_common(&back);
    assert_eq!(back.config, old.config);
    assert_eq!(back.platform, old.platform);
    assert_eq!(back.devices, old.devices);
    assert_eq!(back.to_bytes().unwrap(), bytes);
}

#[test]
fn the_first_sectioned_format_keeps_loading() {
    // Written by this format's first build; if a live struct changed without being
    // frozen and given a new version, this stops decoding.
    let bytes = fixture("state-v1-sections.bin");
    let s = VmState::from_bytes(&bytes).expect("sections of version 1");
    check_common(&s);
    assert_eq!(s.config.nets.len(), 1);
    assert_eq!(
        s.to_bytes().unwrap(),
        bytes,
        "version 1 is still what we write"
    );
}

#[test]
fn a_snapshot_of_an_earlier_launcher_loads() {
    // Snapshot format 1 as the previous launcher wrote it (memory records removed).
    let file = fixture("snapshot-v1-nomem.snap");
    let (state, ram) = crate::snapshot::read(&mut file.as_slice()).expect("format 1 loads");
    check_common(&state);
    assert_eq!(ram.size(), 32 << 20);
}

fn sectioned() -> Vec<Section> {
    split(&fixture("state-v1-sections.bin"))
}

fn refusal(sections: &[Section]) -> String {
    match VmState::from_bytes(&join(sections)) {
        Ok(_) => panic!("loaded a state that must be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_newer_section_version_is_refused_naming_the_section() {
    let mut s = sectioned();
    let blk = s.iter_mut().find(|s| s.name == names::VIRTIO_BLK).unwrap();
    blk.version = 2;
    let e = refusal(&s);
    assert!(
        e.contains("\"virtio-blk\" #0 has version 2, newer than this launcher reads (up to 1)"),
        "{e}"
    );
}

#[test]
fn an_unknown_section_is_refused() {
    let mut s = sectioned();
    s.push(Section {
        name: "virtio-gpu".into(),
        instance: 0,
        version: 1,
        data: vec![],
    });
    let e = refusal(&s);
    assert!(
        e.contains("section \"virtio-gpu\" (version 1) that this launcher does not know"),
        "{e}"
    );
}

#[test]
fn missing_repeated_or_gapped_sections_are_refused() {
    let without = |name: &str| -> Vec<Section> {
        sectioned().into_iter().filter(|s| s.name != name).collect()
    };
    assert!(refusal(&without(names::KVM_VM)).contains("no \"kvm-vm\" section"));
    assert!(refusal(&without(names::VCPU)).contains("no \"vcpu\" section"));

    let mut twice = sectioned();
    twice.push(twice[0].clone());
    let e = refusal(&twice);
    assert!(e.contains("\"config\" instances are not 0..2"), "{e}");

    let mut gap = sectioned();
    gap.retain(|s| !(s.name == names::VCPU && s.instance == 0));
    let e = refusal(&gap);
    assert!(e.contains("\"vcpu\" instances are not 0..1"), "{e}");
}

#[test]
fn a_newer_envelope_and_damaged_bytes_are_refused() {
    let mut bytes = fixture("state-v1-sections.bin");
    bytes[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&7u32.to_le_bytes());
    let e = VmState::from_bytes(&bytes).unwrap_err().to_string();
    assert!(e.contains("envelope version 7 is newer"), "{e}");

    let bytes = fixture("state-v1-sections.bin");
    for cut in [0, 4, MAGIC.len() + 2, bytes.len() / 2, bytes.len() - 1] {
        assert!(VmState::from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(VmState::from_bytes(&trailing).is_err());
}

/// A device state in its second version, as a device author would write it.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Widget {
    enabled: bool,
    queue_index: u16,
}

/// `Widget` as version 1 wrote it, frozen.
#[derive(Deserialize)]
struct WidgetV1 {
    enabled: bool,
}

impl Versioned for Widget {
    const VERSION: u32 = 2;
    const MIN_VERSION: u32 = 1;

    fn upgrade(version: u32, data: &[u8]) -> Result<Self, StateError> {
        debug_assert_eq!(version, 1);
        let old: WidgetV1 = payload(data)?;
        Ok(Widget {
            enabled: old.enabled,
            queue_index: 0,
        })
    }
}

fn widget(version: u32, data: Vec<u8>) -> Section {
    Section {
        name: "widget".into(),
        instance: 0,
        version,
        data,
    }
}

#[test]
fn loading_dispatches_on_the_section_version() {
    let v2 = bincode::serialize(&Widget {
        enabled: true,
        queue_index: 9,
    })
    .unwrap();
    let w: Widget = load_section(&widget(2, v2)).unwrap();
    assert_eq!(w.queue_index, 9);

    let v1 = bincode::serialize(&true).unwrap();
    let w: Widget = load_section(&widget(1, v1.clone())).unwrap();
    assert_eq!(
        w,
        Widget {
            enabled: true,
            queue_index: 0
        }
    );

    let e = load_section::<Widget>(&widget(0, v1.clone())).unwrap_err();
    assert!(
        e.to_string()
            .contains("older than this launcher reads (1..=2)"),
        "{e}"
    );
    let e = load_section::<Widget>(&widget(3, v1)).unwrap_err();
    assert!(
        matches!(
            e,
            StateError::NewerSection {
                found: 3,
                max: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn msix_travels_as_optional_sections_one_per_device() {
    use crate::devices::virtio::msix::{MsixEntry, MsixState};
    use crate::devices::virtio::pci::TransportMsixState;
    // A state of a launcher without MSI-X (the v0 fixture: one disk, one interface) has
    // no virtio-msix section: its devices continue on INTx.
    let mut st = VmState::from_bytes(&fixture("state-v0.bin")).unwrap();
    assert!(st.devices.msix.is_empty());
    let entry = MsixEntry {
        address: 0xfee0_0000,
        data: 0x41,
        control: 0,
    };
    let msix = |vectors: usize| TransportMsixState {
        msix: Some(MsixState {
            table: vec![entry; vectors],
            pba: 0b10,
        }),
        config_vector: 0xffff,
        queue_vectors: (0..vectors as u16 - 1).collect(),
    };
    st.devices.msix = vec![msix(2), msix(3)];
    let bytes = st.to_bytes().unwrap();
    let names: Vec<(String, u32)> = split(&bytes)
        .into_iter()
        .filter(|s| s.name == names::VIRTIO_MSIX)
        .map(|s| (s.name, s.instance))
        .collect();
    assert_eq!(
        names,
        [
            (names::VIRTIO_MSIX.to_string(), 0),
            (names::VIRTIO_MSIX.to_string(), 1)
        ]
    );
    let back = VmState::from_bytes(&bytes).unwrap();
    assert_eq!(back.devices.msix, st.devices.msix);
}

#[test]
fn net_offloads_travel_as_optional_sections_that_older_launchers_refuse() {
    use crate::devices::virtio::net::NetOffloadState;
    // The state of a launcher without offloads (the v1 fixture has an interface) has no
    // virtio-net-offload section: the interface continues without offloads.
    let mut st = VmState::from_bytes(&join(&sectioned())).unwrap();
    assert_eq!(st.devices.net.len(), 1);
    assert!(st.devices.net_offload.is_empty());
    st.devices.net_offload = vec![NetOffloadState {
        features: 0b11,
        tun_offload: 1,
    }];
    let bytes = st.to_bytes().unwrap();
    let back = VmState::from_bytes(&bytes).unwrap();
    assert_eq!(back.devices.net_offload, st.devices.net_offload);
    // A launcher that does not know the section (it would zero the guest's headers) refuses
    // the state naming it: here, this build with the section renamed to an unknown one.
    let mut sections = split(&bytes);
    let s = sections
        .iter_mut()
        .find(|s| s.name == names::VIRTIO_NET_OFFLOAD)
        .expect("the section is written");
    s.name = "virtio-net-offload-x".into();
    assert!(refusal(&sections).contains("virtio-net-offload-x"));
}

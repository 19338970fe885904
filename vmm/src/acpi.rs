//! ACPI tables (RSDP, XSDT, FADT, FACS, MADT, MCFG, DSDT) built with `acpi_tables`.
//!
//! The tables describe exactly the platform of [`crate::devices::platform`]
//! at the addresses of [`crate::layout`], the way QEMU's q35 machine does, so
//! that one guest kernel boots on both:
//!
//! * FADT: not hardware-reduced; the ICH9 PM block at `0x600` (PM1a_EVT,
//!   PM1a_CNT, PM_TMR, GPE0), SCI on IRQ 9, no SMI command port (always in
//!   ACPI mode), reset register = port `0xcf9` value 6.
//! * MADT: local APIC per vCPU (APIC id = index), IOAPIC 0 at GSI 0, ISA IRQ 0
//!   routed to GSI 2 and the SCI (IRQ 9) level-triggered active-high.
//! * MCFG: the ECAM window, segment 0, buses 0-255.
//! * DSDT: `\_S5_` (SLP_TYP 0, which the PM device turns into power-off), the
//!   PCIe root `\_SB_.PCI0`, `\_SB_.COM1`, a PNP0C02 reservation of the ECAM
//!   window (Linux refuses MMCONFIG that is not reserved) and a processor
//!   device per vCPU.
//!
//! Everything is written between [`layout::ACPI_TABLES_START`] and
//! [`layout::HIMEM_START`], RSDP first (16-byte aligned, so the BIOS-area scan
//! finds it; the PVH start info also points at it).

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::devices::acpi_pm::{
    GPE0_BLK, GPE0_BLK_LEN, PM1_CNT_LEN, PM1_EVT_LEN, PM_TMR, PM_TMR_LEN,
};
use crate::devices::i8042::{RESET_CONTROL_PORT, RESET_VALUE};
use crate::layout;

/// OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"RVMVMM";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// Start of the 32-bit PCI MMIO window: right after ECAM.
pub const PCI_MMIO32_START: u64 = layout::PCIE_ECAM_START + layout::PCIE_ECAM_SIZE;
/// Last byte of the 32-bit PCI MMIO window: just below the IOAPIC.
pub const PCI_MMIO32_END: u64 = layout::IOAPIC_START - 1;

/// IA-PC boot architecture flags of the FADT: no VGA (nothing at `0xa0000`),
/// no CMOS RTC (none is emulated), and no 8042 bit, so Linux does not probe
/// the minimal i8042 (whose reset command still works).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel irqchip).
const MADT_PCAT_COMPAT: u32 = 1;
/// C2/C3 latencies above these values mean "not supported".
const P_LVL2_LAT_NONE: u16 = 101;
const P_LVL3_LAT_NONE: u16 = 1001;

/// Errors while building the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The machine has no vCPU.
    #[error("cannot build ACPI tables for zero vCPUs")]
    NoVcpus,
    /// APIC id 255 is the xAPIC broadcast id, so at most 255 vCPUs (ids 0..=254).
    #[error("{0} vCPUs is more than the MADT can describe (at most 254)")]
    TooManyVcpus(u8),
    /// The tables overflow the BIOS area.
    #[error("ACPI tables need {0:#x} bytes, more than the BIOS area holds")]
    TooLarge(u64),
    /// Writing guest memory failed (the area is not RAM).
    #[error("cannot write ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Raw AML bytes as an [`Aml`] object, so separately built pieces can be
/// children of a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn to_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// Bytes of an 8-byte OEM table id such as `b"VMMDSDT "`.
fn table_id(sig: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"RVMM    ";
    id[4..].copy_from_slice(sig);
    id
}

/// The DSDT's AML body (without the table header).
fn dsdt_body(vcpus: u8) -> Vec<u8> {
    let mut body = Vec::new();

    // \_S5_: SLP_TYPa, SLP_TYPb, reserved, reserved. SLP_TYP 0 is what the PM
    // device treats as soft-off.
    aml::Name::new(
        "\\_S5_".into(),
        &aml::Package::new(vec![&aml::ZERO, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);

    // The PCI Express root complex: bus range, the config mechanism #1 ports,
    // the I/O space around them and the 32-bit MMIO window. (Each device is
    // serialised in one statement: the AML builders borrow their children.)
    // _PRT: INTx of every slot and pin straight to an IOAPIC GSI (no link devices), as
    // the virtio-pci devices wire their irqfds.
    let prt_entries: Vec<RawAml> = (1u8..32)
        .flat_map(|slot| (0u8..4).map(move |pin| (slot, pin)))
        .map(|(slot, pin)| {
            let addr = (u32::from(slot) << 16) | 0xffff;
            let gsi = crate::devices::virtio::intx_gsi(slot, pin);
            RawAml(to_bytes(&aml::Package::new(vec![
                &addr,
                &pin,
                &aml::ZERO,
                &gsi,
            ])))
        })
        .collect();
    let prt = aml::Package::new(prt_entries.iter().map(|e| e as &dyn Aml).collect());
    let pci0 = RawAml(to_bytes(&aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_PRT".into(), &prt),
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::AddressSpace::<u16>::new_bus_number(0, 0xff),
                    &aml::IO::new(layout::PCI_CONFIG_ADDRESS, layout::PCI_CONFIG_ADDRESS, 1, 8),
                    &aml::AddressSpace::<u16>::new_io(0, layout::PCI_CONFIG_ADDRESS - 1, None),
                    &aml::AddressSpace::<u16>::new_io(layout::PCI_CONFIG_ADDRESS + 8, 0xffff, None),
                    &aml::AddressSpace::<u32>::new_memory(
                        aml::AddressSpaceCacheable::NotCacheable,
                        true,
                        PCI_MMIO32_START as u32,
                        PCI_MMIO32_END as u32,
                        None,
                    ),
                ]),
            ),
        ],
    )));

    // COM1.
    let com1 = RawAml(to_bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 0, 8),
                    &aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ),
                ]),
            ),
        ],
    )));

    // Motherboard resources: the ECAM window. Linux only trusts the MCFG
    // region when it is reserved here (or in the E820 map).
    let mres = RawAml(to_bytes(&aml::Device::new(
        "MRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    false,
                    layout::PCIE_ECAM_START as u32,
                    layout::PCIE_ECAM_SIZE as u32,
                )]),
            ),
        ],
    )));

    // One processor device per vCPU; _UID matches the MADT processor UID.
    let cpus: Vec<RawAml> = (0..vcpus)
        .map(|i| {
            let name = format!("C{i:03X}");
            let uid = u32::from(i);
            RawAml(to_bytes(&aml::Device::new(
                name.as_str().into(),
                vec![
                    &aml::Name::new("_HID".into(), &"ACPI0007"),
                    &aml::Name::new("_UID".into(), &uid),
                ],
            )))
        })
        .collect();

    let mut sb_children: Vec<&dyn Aml> = vec![&pci0, &com1, &mres];
    sb_children.extend(cpus.iter().map(|c| c as &dyn Aml));
    aml::Scope::new("\\_SB_".into(), sb_children).to_aml_bytes(&mut body);
    body
}

/// The MADT, built on the generic `Sdt` because the crate's MADT type has
/// neither interrupt source overrides nor a way to set PCAT_COMPAT.
fn madt(vcpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 3, OEM_ID, table_id(b"APIC"), OEM_REVISION);
    madt.write_u32(36, layout::LAPIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for i in 0..vcpus {
        madt.append_slice(&to_bytes(&ProcessorLocalApic::new(
            i,
            i,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&to_bytes(&IoApic::new(0, layout::IOAPIC_START as u32, 0)));
    // Interrupt source overrides (type 2): bus 0 (ISA), source IRQ, GSI, flags.
    let iso = |irq: u8, gsi: u32, flags: u16| {
        let mut e = vec![2u8, 10, 0, irq];
        e.extend_from_slice(&gsi.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e
    };
    // The PIT (IRQ 0) is wired to IOAPIC pin 2; flags 0 = bus default (edge, high).
    madt.append_slice(&iso(0, 2, 0));
    // The SCI: polarity active-high (01), trigger level (11 << 2).
    madt.append_slice(&iso(
        layout::ACPI_SCI_IRQ as u8,
        layout::ACPI_SCI_IRQ,
        0x1 | (0x3 << 2),
    ));
    // Local APIC NMI (type 4): all processors (UID 0xff), default flags, LINT1.
    madt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt
}

/// The FADT.
fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let pm = |off: u64| u32::from(layout::ACPI_PM_BASE) + off as u32;
    let mut f = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .flag(Flags::UsePlatformClock);
    // Both the 32- and 64-bit pointers, with the same value: old and new
    // parsers agree, and ACPICA does not warn about a mismatch.
    f.dsdt = (dsdt as u32).into();
    f.x_dsdt = dsdt.into();
    f.firmware_ctrl = (facs as u32).into();
    f.x_firmware_ctrl = facs.into();
    f.sci_int = (layout::ACPI_SCI_IRQ as u16).into();
    // SMI_CMD = 0: no SMM, the machine is always in ACPI mode (SCI_EN set).
    f.smi_cmd = 0u32.into();
    f.pm1a_evt_blk = u32::from(layout::ACPI_PM_BASE).into();
    f.pm1a_cnt_blk = u32::from(layout::ACPI_PM1A_CNT).into();
    f.pm_tmr_blk = pm(PM_TMR).into();
    f.gpe0_blk = pm(GPE0_BLK).into();
    f.pm1_evt_len = PM1_EVT_LEN;
    f.pm1_cnt_len = PM1_CNT_LEN;
    f.pm_tmr_len = PM_TMR_LEN;
    f.gpe0_blk_len = GPE0_BLK_LEN as u8;
    f.p_lvl2_lat = P_LVL2_LAT_NONE.into();
    f.p_lvl3_lat = P_LVL3_LAT_NONE.into();
    f.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    f.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        RESET_CONTROL_PORT.into(),
    );
    f.reset_value = RESET_VALUE;
    // The X_ register blocks stay zero: OSPM then uses the 32-bit fields
    // above, which describe the same ports.
    to_bytes(&f.finalize())
}

/// Where the next table goes: `addr` rounded up to `align` (a power of two).
fn align_up(addr: u64, align: u64) -> u64 {
    (addr + align - 1) & !(align - 1)
}

/// Build the ACPI tables for a machine with `vcpus` vCPUs and write them into
/// `mem` between [`layout::ACPI_TABLES_START`] and [`layout::HIMEM_START`].
/// Returns the address of the RSDP (for `hvm_start_info.rsdp_paddr`).
pub fn create_acpi_tables<M: GuestMemory>(mem: &M, vcpus: u8) -> Result<GuestAddress, AcpiError> {
    if vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }
    if vcpus == u8::MAX {
        return Err(AcpiError::TooManyVcpus(vcpus));
    }

    let rsdp_addr = layout::ACPI_TABLES_START;
    // The FACS must be 64-byte aligned.
    let facs_addr = align_up(rsdp_addr + Rsdp::len() as u64, 64);
    let facs = to_bytes(&FACS::new());

    let dsdt_addr = align_up(facs_addr + facs.len() as u64, 16);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, table_id(b"DSDT"), OEM_REVISION);
    dsdt.append_slice(&dsdt_body(vcpus));
    let dsdt = dsdt.as_slice().to_vec();

    let fadt_addr = align_up(dsdt_addr + dsdt.len() as u64, 16);
    let fadt = fadt(dsdt_addr, facs_addr);

    let madt_addr = align_up(fadt_addr + fadt.len() as u64, 16);
    let madt = madt(vcpus).as_slice().to_vec();

    let mcfg_addr = align_up(madt_addr + madt.len() as u64, 16);
    let mut mcfg = MCFG::new(OEM_ID, table_id(b"MCFG"), OEM_REVISION);
    mcfg.add_ecam(layout::PCIE_ECAM_START, 0, 0, 255);
    let mcfg = to_bytes(&mcfg);

    let xsdt_addr = align_up(mcfg_addr + mcfg.len() as u64, 16);
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt = to_bytes(&xsdt);

    let end = xsdt_addr + xsdt.len() as u64;
    if end > layout::HIMEM_START {
        return Err(AcpiError::TooLarge(end - layout::ACPI_TABLES_START));
    }

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (facs_addr, &facs),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (mcfg_addr, &mcfg),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Read a whole table at `addr`, check its signature and checksum.
    fn table(mem: &GuestMemoryMmap<()>, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let hdr = read(mem, addr, 36);
        assert_eq!(&hdr[0..4], sig);
        let len = u32_at(&hdr, 4) as usize;
        assert!(len >= 36);
        let t = read(mem, addr, len);
        assert_eq!(sum(&t), 0, "checksum of {}", String::from_utf8_lossy(sig));
        t
    }

    #[test]
    fn tables_are_consistent() {
        for vcpus in [1u8, 4, 254] {
            let mem = mem();
            let rsdp_addr = create_acpi_tables(&mem, vcpus).unwrap();
            assert_eq!(rsdp_addr.0, layout::ACPI_TABLES_START);
            assert_eq!(rsdp_addr.0 & 0xf, 0);

            let rsdp = read(&mem, rsdp_addr.0, 36);
            assert_eq!(&rsdp[0..8], b"RSD PTR ");
            assert_eq!(rsdp[15], 2, "revision");
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(sum(&rsdp), 0);
            assert_eq!(u32_at(&rsdp, 20), 36);

            let xsdt_addr = u64_at(&rsdp, 24);
            let xsdt = table(&mem, xsdt_addr, b"XSDT");
            let entries: Vec<u64> = (36..xsdt.len())
                .step_by(8)
                .map(|o| u64_at(&xsdt, o))
                .collect();
            let sigs: Vec<Vec<u8>> = entries.iter().map(|a| read(&mem, *a, 4)).collect();
            assert_eq!(
                sigs,
                vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
            );

            // FADT.
            let fadt = table(&mem, entries[0], b"FACP");
            assert_eq!(fadt[8], 6, "FADT revision");
            assert_eq!(fadt.len(), 276);
            let dsdt32 = u32_at(&fadt, 40);
            let x_dsdt = u64_at(&fadt, 140);
            assert_eq!(u64::from(dsdt32), x_dsdt);
            let facs = u32_at(&fadt, 36);
            assert_eq!(facs & 0x3f, 0);
            assert_eq!(read(&mem, facs.into(), 4), b"FACS");
            assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI_INT");
            assert_eq!(u32_at(&fadt, 48), 0, "SMI_CMD");
            assert_eq!(u32_at(&fadt, 56), 0x600, "PM1a_EVT_BLK");
            assert_eq!(u32_at(&fadt, 64), 0x604, "PM1a_CNT_BLK");
            assert_eq!(u32_at(&fadt, 76), 0x608, "PM_TMR_BLK");
            assert_eq!(u32_at(&fadt, 80), 0x620, "GPE0_BLK");
            assert_eq!(&fadt[88..93], &[4, 2, 0, 4, 16], "block lengths");
            let flags = u32_at(&fadt, 112);
            assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
            assert_eq!(flags & (1 << 20), 0, "not HW_REDUCED");
            // Reset register: system I/O, 8 bits, port 0xcf9, value 6.
            assert_eq!(fadt[116], 1);
            assert_eq!(fadt[117], 8);
            assert_eq!(u64_at(&fadt, 120), 0xcf9);
            assert_eq!(fadt[128], 6);

            // DSDT.
            let dsdt = table(&mem, x_dsdt, b"DSDT");
            let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
            assert!(has(b"_S5_"));
            assert!(has(b"PCI0"));
            assert!(has(b"COM1"));
            assert!(has(b"_CRS"));
            // EisaId("PNP0A08") = 0x080ad041 little-endian after a DWordPrefix.
            assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]));

            // MADT.
            let madt = table(&mem, entries[1], b"APIC");
            assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
            let mut off = 44;
            let (mut lapics, mut ioapics, mut isos) = (Vec::new(), 0, Vec::new());
            while off < madt.len() {
                let (ty, len) = (madt[off], madt[off + 1] as usize);
                assert!(len >= 2 && off + len <= madt.len());
                match ty {
                    0 => {
                        assert_eq!(u32_at(&madt, off + 4) & 1, 1, "enabled");
                        lapics.push((madt[off + 2], madt[off + 3]));
                    }
                    1 => {
                        ioapics += 1;
                        assert_eq!(madt[off + 2], 0);
                        assert_eq!(u32_at(&madt, off + 4), 0xfec0_0000);
                        assert_eq!(u32_at(&madt, off + 8), 0);
                    }
                    2 => isos.push((
                        madt[off + 3],
                        u32_at(&madt, off + 4),
                        u16::from_le_bytes([madt[off + 8], madt[off + 9]]),
                    )),
                    _ => {}
                }
                off += len;
            }
            assert_eq!(lapics.len(), usize::from(vcpus));
            assert!(lapics
                .iter()
                .enumerate()
                .all(|(i, (uid, id))| *uid as usize == i && *id as usize == i));
            assert_eq!(ioapics, 1);
            assert_eq!(isos, vec![(0, 2, 0), (9, 9, 0xd)]);

            // MCFG.
            let mcfg = table(&mem, entries[2], b"MCFG");
            assert_eq!(mcfg.len(), 36 + 8 + 16);
            assert_eq!(u64_at(&mcfg, 44), 0xb000_0000);
            assert_eq!(&mcfg[52..56], &[0, 0, 0, 255]);

            // Everything inside the BIOS area.
            for a in entries.iter().chain([&xsdt_addr, &x_dsdt]) {
                assert!(*a >= layout::ACPI_TABLES_START && *a < layout::HIMEM_START);
            }
        }
    }

    #[test]
    fn bad_vcpu_counts_are_refused() {
        let mem = mem();
        assert!(matches!(
            create_acpi_tables(&mem, 0),
            Err(AcpiError::NoVcpus)
        ));
        assert!(matches!(
            create_acpi_tables(&mem, 255),
            Err(AcpiError::TooManyVcpus(255))
        ));
    }

    #[test]
    fn memory_without_the_bios_area_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            create_acpi_tables(&mem, 1),
            Err(AcpiError::GuestMemory(_))
        ));
    }
}

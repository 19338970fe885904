//! The q35-style guest-physical memory map. Every constant that a guest, the
//! ACPI tables or the boot code relies on lives here, so that the pieces agree.

/// Start of the 32-bit PCI hole: RAM below it, MMIO above it (q35 puts the hole at 3 GiB
/// when the guest has more than that).
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// RAM beyond the 32-bit gap continues here.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// PCI Express ECAM (MMCONFIG) window, as on QEMU q35.
pub const PCIE_ECAM_START: u64 = 0xb000_0000;
/// ECAM size: 256 buses × 32 devices × 8 functions × 4 KiB.
pub const PCIE_ECAM_SIZE: u64 = 0x1000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// The legacy VGA/BIOS hole, reported reserved in the E820 map.
pub const LEGACY_HOLE_START: u64 = 0xa_0000;
/// End of the legacy hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// ACPI tables are written in the BIOS area so that a scan for the RSDP finds them.
pub const ACPI_TABLES_START: u64 = 0xe_0000;
/// Where the PVH `hvm_start_info` structure and its memory map are written.
pub const PVH_INFO_START: u64 = 0x6000;
/// Where the PVH memory map entries are written.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Where the kernel command line is written.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line accepted (bytes, without the terminating NUL).
pub const CMDLINE_MAX_SIZE: usize = 4095;
/// Linux `boot_params` (zero page) for bzImage boot.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity page tables for a 64-bit (bzImage) entry: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
/// GDT for the boot CPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot stack pointer for 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// ICH9 ACPI power-management I/O base (PM1a event block).
pub const ACPI_PM_BASE: u16 = 0x600;
/// PM1a control register (write `SLP_EN | SLP_TYP` to enter a sleep state).
pub const ACPI_PM1A_CNT: u16 = ACPI_PM_BASE + 4;
/// COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line (ISA IRQ and IOAPIC pin).
pub const COM1_IRQ: u32 = 4;
/// Debug-exit port: the byte written becomes the launcher's exit status.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command port (`0xfe` pulses the reset line).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// PCI configuration mechanism #1 address port.
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
/// PCI configuration mechanism #1 data port (4 bytes).
pub const PCI_CONFIG_DATA: u16 = 0xcfc;
/// The ACPI SCI interrupt (as on QEMU q35).
pub const ACPI_SCI_IRQ: u32 = 9;

/// The guest RAM regions for `memory` bytes of RAM: `(guest physical start, size)`.
pub fn ram_regions(memory: u64) -> Vec<(u64, u64)> {
    if memory <= MEM_32BIT_GAP_START {
        vec![(0, memory)]
    } else {
        vec![
            (0, MEM_32BIT_GAP_START),
            (RAM_64BIT_START, memory - MEM_32BIT_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn large_guest_splits_around_the_pci_hole() {
        let r = ram_regions(4 << 30);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 4 << 30);
    }
}

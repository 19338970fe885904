//! Boot-CPU register setup for each boot protocol.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::{BootEntry, BootError};
use crate::layout;
use crate::vstate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT entry from its flags, base and limit (the hardware format).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The `kvm_segment` KVM wants for a GDT entry.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn setup_err(e: impl std::fmt::Display) -> BootError {
    BootError::Setup(e.to_string())
}

/// Put the boot CPU in the state its boot protocol defines.
pub fn setup_boot_cpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), BootError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(setup_err)?;
    let (gdt, rip, rsi, rbx) = match entry {
        BootEntry::Pvh { entry } => (
            [
                gdt_entry(0, 0, 0),
                gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x008b, 0, 0x67),    // TSS
            ],
            entry,
            0,
            layout::PVH_INFO_START,
        ),
        BootEntry::Linux64 { entry } => (
            [
                gdt_entry(0, 0, 0),
                gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x808b, 0, 0xfffff), // TSS
            ],
            entry,
            layout::ZERO_PAGE_START,
            0,
        ),
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(setup_err)?;
    }
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    match entry {
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            // Identity-map the first 1 GiB with 2 MiB pages.
            let pml4 = layout::PML4_START;
            let pdpt = pml4 + 0x1000;
            let pd = pml4 + 0x2000;
            mem.write_obj(pdpt | 0x03, GuestAddress(pml4))
                .map_err(setup_err)?;
            mem.write_obj(pd | 0x03, GuestAddress(pdpt))
                .map_err(setup_err)?;
            for i in 0..512u64 {
                mem.write_obj((i << 21) | 0x83, GuestAddress(pd + i * 8))
                    .map_err(setup_err)?;
            }
            sregs.cr3 = pml4;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(setup_err)?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip,
        rsi,
        rbx,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(setup_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_the_segments_kvm_expects() {
        let code = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.type_, code.present, code.db, code.s, code.l, code.g),
            (0xb, 1, 1, 1, 0, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.selector, 8);
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code64.l, code64.db), (1, 0));
        let tss = segment(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.type_, tss.s, tss.limit), (0xb, 0, 0x67));
    }
}

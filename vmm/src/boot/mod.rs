//! Loading a kernel and preparing the boot CPU: PVH ELF (32- or 64-bit) and
//! Linux bzImage direct boot, with an optional initrd and command line.

pub mod elf32;
pub mod regs;

use std::io::Cursor;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout;
use crate::vstate::memory::GuestMemoryMmap;

/// Errors while loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel {
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is neither a PVH ELF nor a bzImage, or it is malformed.
    #[error("invalid kernel image: {0}")]
    InvalidKernel(String),
    /// The kernel (or initrd) does not fit the guest's RAM.
    #[error("kernel does not fit in guest memory: {0}; give the VM more memory")]
    KernelTooBig(String),
    /// The command line is too long or has a NUL byte.
    #[error("invalid command line: {0}")]
    Cmdline(String),
    /// Writing boot structures failed.
    #[error("cannot write boot structures: {0}")]
    Setup(String),
}

/// How the boot CPU must start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode at `entry`, `%ebx` = `hvm_start_info`.
    Pvh {
        /// Physical entry address.
        entry: u64,
    },
    /// Linux 64-bit boot protocol: long mode at `entry`, `%rsi` = zero page.
    Linux64 {
        /// Physical entry address (startup_64).
        entry: u64,
    },
}

/// What to boot.
#[derive(Clone, Debug, Default)]
pub struct BootSource<'a> {
    /// Kernel image bytes.
    pub kernel: &'a [u8],
    /// Initial ramdisk bytes.
    pub initrd: Option<&'a [u8]>,
    /// Kernel command line.
    pub cmdline: &'a str,
}

fn memmap(mem_size: u64) -> Vec<(u64, u64, u32)> {
    // (start, size, type): 1 = RAM, 2 = reserved.
    let mut map = vec![
        (0, layout::LEGACY_HOLE_START, 1),
        (
            layout::LEGACY_HOLE_START,
            layout::HIMEM_START - layout::LEGACY_HOLE_START,
            2,
        ),
    ];
    for (start, size) in layout::ram_regions(mem_size) {
        let start = start.max(layout::HIMEM_START);
        let end = if start == layout::HIMEM_START {
            size
        } else {
            start + size
        };
        if end > start {
            map.push((start, end - start, 1));
        }
    }
    map.push((layout::PCIE_ECAM_START, layout::PCIE_ECAM_SIZE, 2));
    map
}

fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() > layout::CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "{} bytes, at most {} allowed",
            cmdline.len(),
            layout::CMDLINE_MAX_SIZE
        )));
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|e| BootError::Setup(e.to_string()))
}

/// Highest address (exclusive) an initrd may end at: the top of low RAM.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .next()
        .map(|r| {
            use vm_memory::GuestMemoryRegion;
            r.start_addr().raw_value() + r.len()
        })
        .unwrap_or(0)
}

fn place_initrd(
    mem: &GuestMemoryMmap,
    initrd: &[u8],
    kernel_end: u64,
    limit: u64,
) -> Result<u64, BootError> {
    let top = low_ram_end(mem).min(limit);
    let addr = top
        .checked_sub(initrd.len() as u64)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or_else(|| {
            BootError::KernelTooBig(format!(
                "initrd of {} bytes does not fit between the kernel and {top:#x}",
                initrd.len()
            ))
        })?;
    mem.write_slice(initrd, GuestAddress(addr))
        .map_err(|e| BootError::Setup(e.to_string()))?;
    Ok(addr)
}

/// Load `src` into `mem` and write the boot structures; `rsdp` is the ACPI RSDP address.
pub fn load(
    mem: &GuestMemoryMmap,
    src: &BootSource<'_>,
    rsdp: u64,
) -> Result<BootEntry, BootError> {
    let k = src.kernel;
    let is_elf = k.len() >= 4 && k[..4] == *b"\x7fELF";
    if is_elf && elf32::is_elf32(k) {
        let (entry, end) = elf32::load(mem, k)?;
        write_pvh(mem, src, rsdp, end)?;
        return Ok(BootEntry::Pvh { entry });
    }
    if is_elf {
        let r = Elf::load(
            mem,
            None,
            &mut Cursor::new(k),
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(|e| map_loader_error(e, "ELF"))?;
        let PvhBootCapability::PvhEntryPresent(entry) = r.pvh_boot_cap else {
            return Err(BootError::InvalidKernel(
                "64-bit ELF without a PVH entry note (Xen ELF note 18); boot a bzImage instead"
                    .into(),
            ));
        };
        write_pvh(mem, src, rsdp, r.kernel_end)?;
        return Ok(BootEntry::Pvh {
            entry: entry.raw_value(),
        });
    }
    if k.len() > 0x206 && k[0x202..0x206] == *b"HdrS" {
        return load_bzimage(mem, src);
    }
    Err(BootError::InvalidKernel(
        "not an ELF file with a PVH note and not a Linux bzImage".into(),
    ))
}

fn map_loader_error(e: linux_loader::loader::Error, what: &str) -> BootError {
    let text = e.to_string();
    if text.contains("past") || text.contains("memory") || text.contains("Memory") {
        BootError::KernelTooBig(format!("{what}: {text}"))
    } else {
        BootError::InvalidKernel(format!("{what}: {text}"))
    }
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    src: &BootSource<'_>,
    rsdp: u64,
    kernel_end: u64,
) -> Result<(), BootError> {
    load_cmdline(mem, src.cmdline)?;
    let mem_size: u64 = mem
        .iter()
        .map(|r| {
            use vm_memory::GuestMemoryRegion;
            r.len()
        })
        .sum();
    let entries: Vec<hvm_memmap_table_entry> = memmap(mem_size)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: entries.len() as u32,
        ..Default::default()
    };
    let mut module = None;
    if let Some(initrd) = src.initrd {
        let addr = place_initrd(mem, initrd, kernel_end, u64::MAX)?;
        module = Some(hvm_modlist_entry {
            paddr: addr,
            size: initrd.len() as u64,
            ..Default::default()
        });
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MEMMAP_START + 0x800;
    }
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&entries, GuestAddress(layout::PVH_MEMMAP_START));
    if let Some(m) = module {
        params.set_modules(&[m], GuestAddress(layout::PVH_MEMMAP_START + 0x800));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|e| BootError::Setup(e.to_string()))
}

fn load_bzimage(mem: &GuestMemoryMmap, src: &BootSource<'_>) -> Result<BootEntry, BootError> {
    let r = BzImage::load(
        mem,
        None,
        &mut Cursor::new(src.kernel),
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|e| map_loader_error(e, "bzImage"))?;
    let mut hdr = r
        .setup_header
        .ok_or_else(|| BootError::InvalidKernel("bzImage without a setup header".into()))?;
    load_cmdline(mem, src.cmdline)?;
    // boot_params field values per Documentation/x86/boot.rst.
    hdr.type_of_loader = 0xff;
    hdr.boot_flag = 0xaa55;
    hdr.header = 0x5372_6448; // "HdrS"
    hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    hdr.cmdline_size = src.cmdline.len() as u32 + 1;
    hdr.kernel_alignment = 0x0100_0000;
    if let Some(initrd) = src.initrd {
        let limit = if hdr.initrd_addr_max != 0 {
            hdr.initrd_addr_max as u64 + 1
        } else {
            0x3800_0000
        };
        let addr = place_initrd(mem, initrd, r.kernel_end, limit)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = initrd.len() as u32;
    }
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let mem_size: u64 = mem
        .iter()
        .map(|r| {
            use vm_memory::GuestMemoryRegion;
            r.len()
        })
        .sum();
    let map = memmap(mem_size);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|e| BootError::Setup(e.to_string()))?;
    Ok(BootEntry::Linux64 {
        entry: r.kernel_load.raw_value() + 0x200,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memmap_reserves_the_legacy_hole_and_ecam() {
        let m = memmap(256 << 20);
        assert_eq!(m[0], (0, 0xa_0000, 1));
        assert_eq!(m[1].2, 2);
        assert_eq!(m[2], (0x10_0000, (256 << 20) - 0x10_0000, 1));
        assert!(m.contains(&(layout::PCIE_ECAM_START, layout::PCIE_ECAM_SIZE, 2)));
    }

    #[test]
    fn memmap_splits_around_the_pci_hole() {
        let m = memmap(5 << 30);
        assert!(m.contains(&(layout::HIMEM_START, (3 << 30) - layout::HIMEM_START, 1)));
        assert!(m.contains(&(4 << 30, 2 << 30, 1)));
    }

    #[test]
    fn refuses_unknown_images() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let src = BootSource {
            kernel: b"MZ this is not a kernel at all",
            ..Default::default()
        };
        assert!(matches!(
            load(&mem, &src, 0),
            Err(BootError::InvalidKernel(_))
        ));
    }
}

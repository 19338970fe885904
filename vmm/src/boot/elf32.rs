//! A small loader for 32-bit ELF kernels with a PVH entry note.
//!
//! linux-loader loads 64-bit ELF (vmlinux) only; tiny freestanding guests and
//! many hobby kernels are 32-bit ELF with a PVH note, as QEMU's `-kernel`
//! accepts. Every field read from the file is bounds-checked: a malformed file
//! gets an error, never a panic or a write outside guest RAM.

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::vstate::memory::GuestMemoryMmap;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// Xen ELF note type carrying the 32-bit PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// True when `image` is a 32-bit little-endian ELF.
pub fn is_elf32(image: &[u8]) -> bool {
    image.len() >= 52 && image[..4] == *b"\x7fELF" && image[4] == 1 && image[5] == 1
}

/// Find the PVH entry in a buffer of ELF notes.
pub fn find_pvh_note(notes: &[u8]) -> Option<u64> {
    let mut off = 0usize;
    while off + 12 <= notes.len() {
        let namesz = u32_at(notes, off)? as usize;
        let descsz = u32_at(notes, off + 4)? as usize;
        let kind = u32_at(notes, off + 8)?;
        let name_off = off + 12;
        let desc_off = name_off.checked_add(namesz.checked_add(3)? & !3)?;
        let next = desc_off.checked_add(descsz.checked_add(3)? & !3)?;
        if next > notes.len() {
            return None;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && notes.get(name_off..name_off + 3) == Some(b"Xen") {
            return match descsz {
                4 => u32_at(notes, desc_off).map(u64::from),
                8 => notes
                    .get(desc_off..desc_off + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes),
                _ => None,
            };
        }
        off = next;
    }
    None
}

/// Load the PT_LOAD segments of a 32-bit ELF into guest memory; return the PVH entry and
/// the end of the highest segment (where an initrd may start).
pub fn load(mem: &GuestMemoryMmap, image: &[u8]) -> Result<(u64, u64), BootError> {
    let bad = |why: &str| BootError::InvalidKernel(format!("32-bit ELF: {why}"));
    if !is_elf32(image) {
        return Err(bad("not a 32-bit little-endian ELF file"));
    }
    let machine = u16_at(image, 18).ok_or_else(|| bad("truncated header"))?;
    if machine != 3 && machine != 62 {
        return Err(bad("not an x86 executable"));
    }
    let phoff = u32_at(image, 28).ok_or_else(|| bad("truncated header"))? as usize;
    let phentsize = u16_at(image, 42).ok_or_else(|| bad("truncated header"))? as usize;
    let phnum = u16_at(image, 44).ok_or_else(|| bad("truncated header"))? as usize;
    if phentsize < 32 {
        return Err(bad("program header entries are too small"));
    }
    let mut entry = None;
    let mut end = 0u64;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(
                i.checked_mul(phentsize)
                    .ok_or_else(|| bad("header overflow"))?,
            )
            .ok_or_else(|| bad("header overflow"))?;
        let field =
            |o: usize| u32_at(image, ph + o).ok_or_else(|| bad("program header past end of file"));
        let p_type = field(0)?;
        let p_offset = field(4)? as usize;
        let p_paddr = field(12)? as u64;
        let p_filesz = field(16)? as usize;
        let p_memsz = field(20)? as u64;
        let data = image
            .get(
                p_offset
                    ..p_offset
                        .checked_add(p_filesz)
                        .ok_or_else(|| bad("segment overflow"))?,
            )
            .ok_or_else(|| bad("segment extends past end of file"))?;
        match p_type {
            PT_LOAD => {
                if p_memsz < p_filesz as u64 {
                    return Err(bad("segment memory size smaller than file size"));
                }
                end = end.max(p_paddr.saturating_add(p_memsz));
                mem.write_slice(data, GuestAddress(p_paddr)).map_err(|_| {
                    BootError::KernelTooBig(format!(
                        "segment at {p_paddr:#x} (+{p_memsz:#x}) is outside guest RAM"
                    ))
                })?;
                let bss = (p_memsz - p_filesz as u64) as usize;
                if bss > 0 {
                    mem.write_slice(&vec![0u8; bss], GuestAddress(p_paddr + p_filesz as u64))
                        .map_err(|_| {
                            BootError::KernelTooBig(format!(
                                "segment at {p_paddr:#x} (+{p_memsz:#x}) is outside guest RAM"
                            ))
                        })?;
                }
            }
            PT_NOTE => {
                if let Some(e) = find_pvh_note(data) {
                    entry = Some(e);
                }
            }
            _ => {}
        }
    }
    let entry = entry.ok_or_else(|| {
        bad("no PVH entry note (Xen ELF note 18); only PVH 32-bit kernels can be booted")
    })?;
    Ok((entry, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_xen_note_among_others() {
        let mut notes = Vec::new();
        // A GNU note first.
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&3u32.to_le_bytes());
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[1, 2, 3, 4]);
        // The Xen PVH note.
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&18u32.to_le_bytes());
        notes.extend_from_slice(b"Xen\0");
        notes.extend_from_slice(&0x10_0040u32.to_le_bytes());
        assert_eq!(find_pvh_note(&notes), Some(0x10_0040));
    }

    #[test]
    fn malformed_notes_do_not_panic() {
        for len in 0..40 {
            let notes = vec![0xffu8; len];
            assert_eq!(find_pvh_note(&notes), None);
        }
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        assert!(load(&mem, b"not an elf").is_err());
        let mut hdr = vec![0u8; 64];
        hdr[..4].copy_from_slice(b"\x7fELF");
        hdr[4] = 1;
        hdr[5] = 1;
        hdr[18] = 3;
        hdr[28] = 0xf0; // program headers past the end
        hdr[42] = 32;
        hdr[44] = 3;
        assert!(load(&mem, &hdr).is_err());
    }
}

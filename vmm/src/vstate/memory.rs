//! Guest memory: one memfd per RAM region, mapped shared into this process.
//!
//! Backing guest RAM with memfds (instead of anonymous memory) is what lets a
//! same-host live update hand the memory to the next launcher as file
//! descriptors, without copying a byte. The mapping carries a dirty bitmap
//! ([`SwitchedBitmap`]), so that every write the VMM itself makes into guest memory
//! (device emulation) is recorded for migration while one tracks them, next to KVM's
//! own dirty log of the guest's writes.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap};

use super::vmm_dirty::SwitchedBitmap;
use crate::layout;

/// Guest memory as the whole crate sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<SwitchedBitmap>;

/// The page size KVM's dirty log and our bitmaps count in.
pub const PAGE_SIZE: u64 = 4096;

/// Errors while creating or adopting guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is not usable.
    #[error("guest memory size {size} bytes is invalid: {why}")]
    InvalidSize {
        /// The requested size.
        size: u64,
        /// Why it is refused.
        why: &'static str,
    },
    /// memfd_create or ftruncate failed.
    #[error("cannot create guest memory ({size} bytes): {source}")]
    Create {
        /// Size of the region that failed.
        size: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// A memory fd handed to us does not match the announced layout.
    #[error("guest memory fd for region at {gpa:#x} is {actual} bytes, expected {expected}")]
    FdSize {
        /// Guest-physical start of the region.
        gpa: u64,
        /// Size announced.
        expected: u64,
        /// Size of the file.
        actual: u64,
    },
    /// mmap failed.
    #[error("cannot map guest memory: {0}")]
    Map(String),
    /// A range outside guest RAM.
    #[error("guest memory range {gpa:#x}+{len:#x} cannot be accessed: {why}")]
    Access {
        /// Guest-physical start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
        /// vm-memory's reason.
        why: String,
    },
}

/// One RAM region: where it sits in guest-physical space and the memfd behind it.
#[derive(Debug)]
pub struct RamRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The memfd backing this region (offset 0).
    pub file: File,
}

impl RamRegion {
    /// Data ranges `[start, end)` of this region's memfd (never-written ranges are holes).
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        let size = self.size;
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos: i64 = 0;
        while (pos as u64) < size {
            // SAFETY: lseek on a valid fd with SEEK_DATA/SEEK_HOLE touches no memory. It moves
            // the file offset, which a local handover shares with the other process; nobody
            // reads the memfd through that offset (all access is through the mapping).
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no data after pos
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 {
                size as i64
            } else {
                hole.min(size as i64)
            };
            if end <= data {
                break;
            }
            out.push((data as u64, end as u64));
            pos = end;
        }
        if out.is_empty() && size > 0 {
            // A filesystem without SEEK_DATA support reports errors: fall back to everything.
            // SAFETY: lseek with SEEK_DATA at offset 0 on a valid fd.
            let probe = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
            if probe < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                out.push((0, size));
            }
        }
        out
    }
}

/// Guest RAM: the mapping plus the memfds behind it.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    regions: Vec<RamRegion>,
    /// Created by this process and never handed out: nobody else can write it.
    exclusive: bool,
    /// Whether the VMM's own writes are recorded ([`GuestRam::track_vmm_writes`]).
    tracking: Arc<AtomicBool>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("regions", &self.regions)
            .finish()
    }
}

/// Smallest guest we accept: the boot structures, ACPI tables and a kernel need room
/// (shared with noded through `contracts::limits`).
pub const MIN_MEMORY: u64 = contracts::limits::MIN_MEMORY_BYTES;

fn memfd(name: &str, size: u64) -> Result<File, MemoryError> {
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: memfd_create takes a valid NUL-terminated string and flags; it returns a new
    // fd or -1, which we check.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Create {
            size,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Create { size, source })?;
    Ok(file)
}

impl GuestRam {
    /// Fresh, zeroed guest RAM of `size` bytes laid out as q35 does.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < MIN_MEMORY {
            return Err(MemoryError::InvalidSize {
                size,
                why: "at least 2 MiB is needed",
            });
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::InvalidSize {
                size,
                why: "it must be a multiple of 4 KiB",
            });
        }
        let regions = layout::ram_regions(size)
            .into_iter()
            .enumerate()
            .map(|(i, (gpa, len))| {
                Ok(RamRegion {
                    gpa,
                    size: len,
                    file: memfd(&format!("guest-ram-{i}"), len)?,
                })
            })
            .collect::<Result<Vec<_>, MemoryError>>()?;
        let mut ram = Self::from_regions(regions)?;
        ram.exclusive = true;
        Ok(ram)
    }

    /// Adopt memory handed over by another process (local live update).
    pub fn from_regions(regions: Vec<RamRegion>) -> Result<Self, MemoryError> {
        for r in &regions {
            let actual = r
                .file
                .metadata()
                .map_err(|e| MemoryError::Map(e.to_string()))?
                .len();
            if actual < r.size {
                return Err(MemoryError::FdSize {
                    gpa: r.gpa,
                    expected: r.size,
                    actual,
                });
            }
        }
        let tracking = Arc::new(AtomicBool::new(false));
        let mut mapped = Vec::with_capacity(regions.len());
        for r in &regions {
            let dup = r
                .file
                .try_clone()
                .map_err(|e| MemoryError::Map(e.to_string()))?;
            let size = usize::try_from(r.size).map_err(|_| MemoryError::InvalidSize {
                size: r.size,
                why: "larger than the address space",
            })?;
            let mmap: MmapRegion<SwitchedBitmap> = MmapRegionBuilder::new_with_bitmap(
                size,
                SwitchedBitmap::new(size, tracking.clone()),
            )
            .with_file_offset(FileOffset::new(dup, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Map(e.to_string()))?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(r.gpa))
                .ok_or_else(|| MemoryError::Map("region overflows the address space".into()))?;
            mapped.push(region);
        }
        let memory =
            GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(Self {
            memory,
            regions,
            exclusive: false,
            tracking,
        })
    }

    /// The mapping, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The regions and their memfds.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Host virtual address of region `index`, for KVM_SET_USER_MEMORY_REGION.
    pub fn host_address(&self, index: usize) -> Option<u64> {
        use vm_memory::GuestMemoryBackend;
        let r = self.regions.get(index)?;
        let region = self.memory.find_region(GuestAddress(r.gpa))?;
        region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .ok()
            .map(|p| p as u64)
    }

    /// The raw fds of the regions, in order, for handing them to another process (after
    /// which this memory is shared).
    pub fn raw_fds(&self) -> Vec<i32> {
        self.regions.iter().map(|r| r.file.as_raw_fd()).collect()
    }

    /// Record the VMM's own writes into guest memory from now on (`true`), or stop
    /// (`false`). Off outside a migration. Turning it on is complete only once every
    /// device thread has passed its transport's lock ([`crate::Vm::start_dirty_log`]
    /// does both; see `vmm_dirty.rs`).
    pub fn track_vmm_writes(&self, on: bool) {
        self.tracking.store(on, Ordering::SeqCst);
    }

    /// Take the VMM-side dirty bitmap of region `index` (pages the VMM wrote), one bit
    /// per 4 KiB page in 64-bit words like KVM's dirty log, and clear it.
    pub fn take_vmm_dirty(&self, index: usize) -> Vec<u64> {
        use vm_memory::GuestMemoryBackend;
        let Some(r) = self.regions.get(index) else {
            return Vec::new();
        };
        match self.memory.find_region(GuestAddress(r.gpa)) {
            Some(region) => {
                let mmap: &MmapRegion<SwitchedBitmap> = region;
                mmap.bitmap().take()
            }
            None => Vec::new(),
        }
    }

    /// Copy `buf.len()` bytes of guest memory at `gpa` into `buf`, through vm-memory's
    /// volatile accessors: the guest (and the net RX thread) may write these bytes at the
    /// same time, so no `&[u8]` over live guest RAM may exist. The copy is a stable
    /// snapshot of whatever was there; a page the guest changes afterwards is dirty again
    /// and is sent again (the pre-copy contract).
    pub fn read_into(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        use vm_memory::Bytes;
        self.memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| MemoryError::Access {
                gpa,
                len: buf.len() as u64,
                why: e.to_string(),
            })
    }

    /// The region holding `[gpa, gpa+len)` and the offset of `gpa` in its memfd.
    fn locate(&self, gpa: u64, len: u64) -> Result<(&RamRegion, u64), MemoryError> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|e| e <= r.gpa + r.size))
            .map(|r| (r, gpa - r.gpa))
            .ok_or_else(|| MemoryError::Access {
                gpa,
                len,
                why: "not inside one RAM region".into(),
            })
    }

    fn check_exclusive(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if self.exclusive {
            Ok(())
        } else {
            Err(MemoryError::Access {
                gpa,
                len,
                why: "this memory was adopted from another process, whose guest may run on it"
                    .into(),
            })
        }
    }

    /// Store `data` at `gpa` through the memfd (`pwrite`), for loading memory that no VM
    /// runs yet (an incoming migration before `Go`). Writing through the file rather than
    /// the mapping allocates each page once without zeroing it first and takes no page
    /// fault per page (they were 60 % of the receiver's time), and no Rust reference to
    /// guest memory is made. Refused on memory adopted from another process.
    pub fn load(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        use std::os::unix::fs::FileExt;
        let len = data.len() as u64;
        self.check_exclusive(gpa, len)?;
        let (r, off) = self.locate(gpa, len)?;
        r.file
            .write_all_at(data, off)
            .map_err(|e| MemoryError::Access {
                gpa,
                len,
                why: e.to_string(),
            })
    }

    /// Make `[gpa, gpa+len)` read as zeroes by punching a hole in the memfd (which also
    /// frees the pages), under the same rule as [`GuestRam::load`].
    pub fn load_zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.check_exclusive(gpa, len)?;
        let (r, off) = self.locate(gpa, len)?;
        // SAFETY: fallocate on a valid fd owned by `r`; it changes file contents only (no
        // memory of this process is passed).
        let rc = unsafe {
            libc::fallocate(
                r.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            )
        };
        if rc != 0 {
            return Err(MemoryError::Access {
                gpa,
                len,
                why: format!("punching a hole: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(())
    }

    /// Fault in every page of every region now, so that a VM started on this memory
    /// does not take those faults during its first run (local handover: done while
    /// the source guest still runs, outside the downtime).
    pub fn prefault(&self) {
        const MADV_POPULATE_WRITE: i32 = 23;
        for (i, r) in self.regions.iter().enumerate() {
            let Some(addr) = self.host_address(i) else {
                continue;
            };
            let mut rc = 0;
            // Only ranges that hold data: populating holes would allocate the whole guest.
            for (start, end) in r.data_ranges() {
                // SAFETY: madvise on a sub-range of a mapping we own; MADV_POPULATE_WRITE only
                // populates page tables (it changes no byte) and fails harmlessly on kernels
                // that lack it.
                rc |= unsafe {
                    libc::madvise(
                        (addr + start) as *mut libc::c_void,
                        (end - start) as usize,
                        MADV_POPULATE_WRITE,
                    )
                };
            }
            if rc != 0 {
                tracing::debug!("MADV_POPULATE_WRITE unavailable; pages fault in on first use");
            }
        }
    }
}

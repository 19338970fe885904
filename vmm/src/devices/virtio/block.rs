//! virtio-blk (virtio 1.x, section 5.2) on a raw image file.
//!
//! One request queue of [`QUEUE_SIZE`] entries. Requests: `IN` (read), `OUT` (write),
//! `FLUSH` (fdatasync of the file) and `GET_ID` (the file's base name, up to 20 bytes);
//! anything else completes with `UNSUPP`. A request whose sector range leaves the disk,
//! whose data length is not a multiple of 512, a write to a read-only disk, a descriptor
//! chain that points outside guest RAM or lacks a header completes with `IOERR`; a chain
//! without any writable byte (no room for the status) is returned with length 0. No path
//! writes outside `[0, size)` of the file, whatever the guest puts in the ring.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::MS;
use vm_memory::{Bytes, GuestMemoryBackend, VolatileSlice};

use super::disk::{DiskError, DiskFile, SECTOR_SIZE};
use super::VirtioDevice;
use crate::config::DiskConfig;
use crate::vstate::memory::GuestMemoryMmap;

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of `struct virtio_blk_outhdr`: type, reserved (ioprio), sector.
const HEADER_SIZE: usize = 16;
/// Bytes of device configuration we expose (`struct virtio_blk_config` is 60 bytes).
const CONFIG_SIZE: usize = 64;

/// A virtio-blk device.
pub struct Block {
    disk: DiskFile,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block").field("disk", &self.disk).finish()
    }
}

impl Block {
    /// Open the disk of `cfg` (no lock is taken here).
    pub fn open(cfg: &DiskConfig) -> Result<Self, DiskError> {
        let disk = DiskFile::open(cfg)?;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = std::path::Path::new(&cfg.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Block { disk, id })
    }

    /// The backing file.
    pub fn disk(&self) -> &DiskFile {
        &self.disk
    }

    /// The backing file, to lock or unlock it.
    pub fn disk_mut(&mut self) -> &mut DiskFile {
        &mut self.disk
    }

    /// Byte offset of a request of `len` bytes at `sector`, if it lies inside the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(len)?;
        (end <= self.disk.size()).then_some(start)
    }

    /// Serve one request whose readable part is `r` (header, then a write's data) and
    /// whose writable part is `w` (a read's data, then the status byte, already split
    /// off): returns the status and the number of data bytes written into guest memory.
    ///
    /// The data moves between the file and guest memory in one `preadv`/`pwritev` over
    /// the descriptors' volatile slices, without a bounce buffer.
    fn execute(&mut self, r: &mut Vec<Slice<'_>>, w: &[Slice<'_>]) -> (u32, usize) {
        let mut hdr = [0u8; HEADER_SIZE];
        if !take_prefix(r, &mut hdr) {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(s);
        match ty {
            VIRTIO_BLK_T_IN => {
                let len = total_len(w);
                let Some(off) = self.range(sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.disk.read_vectored_at(w, off) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len),
                    // How much landed is unknown: report all of it, as the data is
                    // meaningless after an error anyway.
                    Err(_) => (VIRTIO_BLK_S_IOERR, len),
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.disk.readonly() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = total_len(r);
                let Some(off) = self.range(sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.disk.write_vectored_at(r, off) {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    tracing::warn!(disk = self.disk.path(), "flush failed: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = total_len(w).min(self.id.len());
                if !fill_prefix(w, &self.id[..n]) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, n)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Serve the chain at the head of the queue; returns the used length.
    fn handle(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        // Readable and writable descriptors as slices of guest memory, in chain order (a
        // device reads the readable ones and writes the writable ones whatever their
        // interleaving, as virtio-queue's Reader and Writer do).
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        let mut bad = false;
        for d in chain {
            let to = if d.is_write_only() {
                &mut writable
            } else {
                &mut readable
            };
            for slice in mem.get_slices(d.addr(), d.len() as usize) {
                match slice {
                    Ok(s) => to.push(s),
                    Err(_) => bad = true,
                }
            }
        }
        // The status byte is the last writable byte of the chain.
        let Some(status) = split_last_byte(&mut writable) else {
            return 0;
        };
        let (status_code, written) = if bad {
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            self.execute(&mut readable, &writable)
        };
        if status.write_obj(status_code as u8, 0).is_err() {
            return 0;
        }
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }
}

/// A piece of one descriptor's buffer in guest memory.
type Slice<'a> = VolatileSlice<'a, MS<'a, GuestMemoryMmap>>;

fn total_len(slices: &[Slice<'_>]) -> usize {
    slices.iter().map(|s| s.len()).sum()
}

/// Copy the first `out.len()` bytes of `slices` into `out` and drop them from `slices`;
/// false if there are fewer.
fn take_prefix(slices: &mut Vec<Slice<'_>>, out: &mut [u8]) -> bool {
    let mut done = 0;
    let mut consumed = 0;
    for s in slices.iter() {
        if done == out.len() {
            break;
        }
        let n = s.len().min(out.len() - done);
        // copy_to copies min(slice, buffer) bytes: n here.
        if s.copy_to(&mut out[done..done + n]) != n {
            return false;
        }
        done += n;
        if n == s.len() {
            consumed += 1;
        } else {
            // The rest of this slice is data.
            let Ok(rest) = s.offset(n) else {
                return false;
            };
            slices.drain(..consumed);
            slices[0] = rest;
            return done == out.len();
        }
    }
    slices.drain(..consumed);
    done == out.len()
}

/// Write `data` at the start of `slices`; false if they are shorter.
fn fill_prefix(slices: &[Slice<'_>], data: &[u8]) -> bool {
    let mut done = 0;
    for s in slices {
        if done == data.len() {
            break;
        }
        let n = s.len().min(data.len() - done);
        s.copy_from(&data[done..done + n]);
        done += n;
    }
    done == data.len()
}

/// Split the last byte off the writable slices (the status byte), or None if there is no
/// writable byte.
fn split_last_byte<'a>(slices: &mut Vec<Slice<'a>>) -> Option<Slice<'a>> {
    let last = slices.pop()?;
    let keep = last.len().checked_sub(1)?;
    let (head, tail) = last.split_at(keep).ok()?;
    if keep > 0 {
        slices.push(head);
    }
    Some(tail)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_FLUSH) | (1u64 << VIRTIO_RING_F_INDIRECT_DESC);
        if self.disk.readonly() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; CONFIG_SIZE];
        cfg[..8].copy_from_slice(&(self.disk.size() / SECTOR_SIZE).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        // At most one ring's worth per notify: a guest that keeps adding requests is
        // served at its next notify, and a bogus avail index cannot keep us here.
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = self.handle(chain, mem);
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn backend_size(&self) -> u64 {
        self.disk.size()
    }
}

//! A raw disk image file: opening and size checks, positioned I/O, and the
//! exclusive-ownership lock.
//!
//! Ownership uses open-file-description locks (`F_OFD_SETLK`) on the whole file: a write
//! lock for a writable disk, a read lock for a read-only one (so that nobody writes a file
//! that a VM reads, while any number of VMs may share it read-only). OFD locks belong to
//! the open file, not to the process, so two opens in one process conflict too (the same
//! file given twice is caught), and closing the file releases the lock.
//!
//! Linux does not report who holds an OFD lock (`F_OFD_GETLK` and `/proc/locks` say pid
//! -1), so on a conflict the holder is looked up in `/proc/<pid>/fdinfo/<fd>`, whose
//! `lock:` lines name the file's device and inode.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use crate::config::DiskConfig;

/// Most iovecs one `preadv`/`pwritev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Which way a vectored transfer goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// File to guest memory.
    Read,
    /// Guest memory to file.
    Write,
}

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// Errors opening or locking a disk file.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// open(2) failed.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The size is not usable.
    #[error("disk {path} is {size} bytes: its size must be a non-zero multiple of 512")]
    Size {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Another open file holds a conflicting lock.
    #[error("disk {path} is in use: it is locked by {holder}")]
    Locked {
        /// The file.
        path: String,
        /// Who holds it, as far as we can tell.
        holder: String,
    },
    /// fcntl failed for another reason.
    #[error("cannot lock disk {path}: {source}")]
    Lock {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// An open disk image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: String,
    readonly: bool,
    size: u64,
    locked: bool,
}

impl DiskFile {
    /// Open `cfg.path` (read-only if `cfg.readonly`) and check its size. No lock is taken.
    pub fn open(cfg: &DiskConfig) -> Result<Self, DiskError> {
        let path = cfg.path.clone();
        let open_err = |source| DiskError::Open {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .open(&cfg.path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if meta.is_dir() {
            return Err(open_err(std::io::Error::from_raw_os_error(libc::EISDIR)));
        }
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Size { path, size });
        }
        Ok(DiskFile {
            file,
            path,
            readonly: cfg.readonly,
            size,
            locked: false,
        })
    }

    /// The path as configured.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Size in bytes (fixed at open).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's (device, inode): two disks with the same identity are the same file.
    pub fn identity(&self) -> Option<(u64, u64)> {
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    /// Opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// True while this file holds its lock.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    fn setlk(&self, lock_type: i32) -> std::io::Result<()> {
        // SAFETY: flock is plain old data; all-zero is a valid value (whole file from 0).
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = lock_type as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: F_OFD_SETLK reads the flock we pass by pointer; the fd is open and owned
        // by `self.file`.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Take the ownership lock (write lock, or read lock for a read-only disk). Idempotent.
    pub fn lock(&mut self) -> Result<(), DiskError> {
        if self.locked {
            return Ok(());
        }
        let kind = if self.readonly {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        };
        match self.setlk(kind) {
            Ok(()) => {
                self.locked = true;
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                Err(DiskError::Locked {
                    path: self.path.clone(),
                    holder: self.describe_holder(),
                })
            }
            Err(source) => Err(DiskError::Lock {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Drop the ownership lock (the file stays open). Idempotent.
    pub fn unlock(&mut self) -> Result<(), DiskError> {
        if !self.locked {
            return Ok(());
        }
        self.setlk(libc::F_UNLCK)
            .map_err(|source| DiskError::Lock {
                path: self.path.clone(),
                source,
            })?;
        self.locked = false;
        Ok(())
    }

    /// Who holds a lock on this file, found through `/proc/*/fdinfo`.
    fn describe_holder(&self) -> String {
        let Ok(meta) = self.file.metadata() else {
            return "another process (holder unknown)".into();
        };
        let dev = meta.dev();
        let key = format!(
            "{:02x}:{:02x}:{} ",
            libc::major(dev),
            libc::minor(dev),
            meta.ino()
        );
        let me = std::process::id();
        let mut holders = Vec::new();
        for pid in lock_holders(&key) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let comm = comm.trim();
            if pid == me {
                holders.push(format!(
                    "this launcher (pid {pid}): is the same file given twice?"
                ));
            } else {
                holders.push(format!("{comm} (pid {pid})"));
            }
        }
        if holders.is_empty() {
            "another process (holder pid unknown: OFD locks do not record it and /proc/*/fdinfo did not show it)".into()
        } else {
            holders.join(", ")
        }
    }

    /// Read exactly the total length of `bufs` at byte `offset`, straight into guest memory
    /// (`preadv`, no bounce buffer: a 1 MiB request is one system call instead of a read
    /// and a copy per 128 KiB). The caller checked the range. Every byte that may have
    /// been written is marked dirty in the slices' bitmaps, for migration.
    pub fn read_vectored_at<B: BitmapSlice>(
        &self,
        bufs: &[VolatileSlice<'_, B>],
        offset: u64,
    ) -> std::io::Result<()> {
        self.vectored_at(bufs, offset, Direction::Read)
    }

    /// Write all of `bufs` (guest memory) at byte `offset` (`pwritev`, no bounce buffer).
    /// The caller checked the range and `readonly`.
    pub fn write_vectored_at<B: BitmapSlice>(
        &self,
        bufs: &[VolatileSlice<'_, B>],
        offset: u64,
    ) -> std::io::Result<()> {
        self.vectored_at(bufs, offset, Direction::Write)
    }

    /// The loop of [`Self::read_vectored_at`] and [`Self::write_vectored_at`]: at most
    /// [`IOV_MAX`] slices per call, resumed after a short transfer or EINTR.
    fn vectored_at<B: BitmapSlice>(
        &self,
        bufs: &[VolatileSlice<'_, B>],
        mut offset: u64,
        dir: Direction,
    ) -> std::io::Result<()> {
        // Position: slice index and bytes of that slice already done.
        let (mut i, mut skip) = (0usize, 0usize);
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(bufs.len().min(IOV_MAX));
        while i < bufs.len() {
            if skip >= bufs[i].len() {
                i += 1;
                skip = 0;
                continue;
            }
            iovs.clear();
            // The guards keep each pointer valid for the duration of the system call.
            let guards: Vec<_> = bufs[i..]
                .iter()
                .take(IOV_MAX)
                .map(|b| b.ptr_guard_mut())
                .collect();
            for (k, (g, b)) in guards.iter().zip(&bufs[i..]).enumerate() {
                let from = if k == 0 { skip } else { 0 };
                iovs.push(libc::iovec {
                    // SAFETY: `from <= b.len()` (checked above for the first slice, 0 for
                    // the others), so the pointer stays inside the slice's memory.
                    iov_base: unsafe { g.as_ptr().add(from) }.cast(),
                    iov_len: b.len() - from,
                });
            }
            let off = libc::off_t::try_from(offset)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let n = match dir {
                // SAFETY: every iovec points into a live VolatileSlice of guest memory (its
                // guard held in `guards`) and covers at most the slice's remaining length;
                // the kernel writes only within them. Guest memory is shared with the vCPUs,
                // which is why it is only reached through these raw pointers, as vm-memory's
                // own `read_volatile` does.
                Direction::Read => unsafe {
                    libc::preadv(self.file.as_raw_fd(), iovs.as_ptr(), iovs.len() as i32, off)
                },
                // SAFETY: as above; the kernel only reads the iovecs' memory.
                Direction::Write => unsafe {
                    libc::pwritev(self.file.as_raw_fd(), iovs.as_ptr(), iovs.len() as i32, off)
                },
            };
            drop(guards);
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if dir == Direction::Read {
                    // Part of it may have landed: count all of it as written.
                    for (k, b) in bufs[i..].iter().take(IOV_MAX).enumerate() {
                        let from = if k == 0 { skip } else { 0 };
                        b.bitmap().mark_dirty(from, b.len() - from);
                    }
                }
                return Err(e);
            }
            let mut n = n as usize;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the disk file is shorter than at open",
                ));
            }
            offset += n as u64;
            // Advance over the bytes moved (marking what a read wrote).
            while n > 0 {
                let b = &bufs[i];
                let step = n.min(b.len() - skip);
                if dir == Direction::Read {
                    b.bitmap().mark_dirty(skip, step);
                }
                n -= step;
                skip += step;
                if skip == b.len() {
                    i += 1;
                    skip = 0;
                }
            }
        }
        Ok(())
    }

    /// Make written data durable (fdatasync).
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Pids whose open files hold a lock on the file whose `/proc/locks` key (`MAJ:MIN:INODE `)
/// is `key`. Unreadable processes are skipped.
fn lock_holders(key: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path()).is_ok_and(|info| {
                info.lines()
                    .any(|l| l.starts_with("lock:") && l.contains(key))
            })
        });
        if holds {
            out.push(pid);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, size: u64) -> String {
        let p = std::env::temp_dir().join(format!("vmm-disk-{name}-{}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p.display().to_string()
    }

    fn cfg(path: &str, readonly: bool) -> DiskConfig {
        DiskConfig {
            path: path.into(),
            readonly,
            shared: false,
        }
    }

    #[test]
    fn sizes_and_missing_files_are_refused() {
        let p = tmp("odd", 1000);
        let e = DiskFile::open(&cfg(&p, false)).unwrap_err();
        assert!(e.to_string().contains("multiple of 512"), "{e}");
        let _ = std::fs::remove_file(&p);
        let e = DiskFile::open(&cfg("/nonexistent/disk.img", false)).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
    }

    #[test]
    fn second_owner_is_refused_and_named() {
        let p = tmp("lock", 4096);
        let mut a = DiskFile::open(&cfg(&p, false)).unwrap();
        a.lock().unwrap();
        let mut b = DiskFile::open(&cfg(&p, false)).unwrap();
        let e = b.lock().unwrap_err().to_string();
        assert!(e.contains("this launcher"), "{e}");
        // Readers conflict with the writer too.
        assert!(DiskFile::open(&cfg(&p, true)).unwrap().lock().is_err());
        a.unlock().unwrap();
        b.lock().unwrap();
        b.unlock().unwrap();
        // Any number of readers.
        let mut r1 = DiskFile::open(&cfg(&p, true)).unwrap();
        let mut r2 = DiskFile::open(&cfg(&p, true)).unwrap();
        r1.lock().unwrap();
        r2.lock().unwrap();
        assert!(a.lock().is_err());
        drop((r1, r2));
        a.lock().unwrap();
        let _ = std::fs::remove_file(&p);
    }
}

//! The TAP backend of virtio-net: a `/dev/net/tun` file attached to a TAP interface.
//!
//! The launcher needs no network privilege: it attaches to a TAP that exists already
//! (created persistent by whoever starts it, e.g. `ip tuntap add dev tap0 mode tap user U`),
//! or it is handed an attached descriptor. The file is non-blocking, has `IFF_NO_PI`, and
//! normally `IFF_VNET_HDR` with a 12-byte header (`virtio_net_hdr_v1`, the layout a
//! virtio 1.x driver uses), so frames pass between the TAP and the guest unchanged. A
//! descriptor opened without `IFF_VNET_HDR` works too: the device then adds and strips the
//! header itself, and the device offers no offload (a TAP without the header cannot say
//! that a frame needs its checksum completed or is a GSO super-frame).
//!
//! Offloads start off (`TUNSETOFFLOAD` 0: every frame the TAP delivers is complete and
//! checksummed). Once the driver accepted its features, the device turns on the ones the
//! guest can receive ([`Tap::set_offload`]: `TUN_F_CSUM` for `VIRTIO_NET_F_GUEST_CSUM`,
//! `TUN_F_TSO4/6` and `TUN_F_TSO_ECN` for `GUEST_TSO4/6` and `GUEST_ECN`), as Firecracker
//! and Cloud Hypervisor do: never an offload the guest did not accept, since the kernel
//! would then hand it frames it cannot take.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::PtrGuard;
use vm_memory::VolatileSlice;

/// Size of `virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers).
pub const VNET_HDR_LEN: usize = 12;

/// `TUNSETOFFLOAD` flags (`linux/if_tun.h`): the kernel may deliver frames whose checksum
/// is partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`)...
pub const TUN_F_CSUM: u32 = 0x01;
/// ... TCP/IPv4 GSO super-frames...
pub const TUN_F_TSO4: u32 = 0x02;
/// ... TCP/IPv6 GSO super-frames...
pub const TUN_F_TSO6: u32 = 0x04;
/// ... and GSO super-frames with the ECN CWR bit.
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Errors attaching to a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// No interface of that name in this network namespace.
    #[error("there is no network interface {0:?} in this network namespace: create the TAP first (ip tuntap add dev {0} mode tap user $USER)")]
    NoSuchInterface(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    /// `TUNSETIFF` refused the interface.
    #[error("cannot attach to TAP {name}: {why}")]
    Attach {
        /// The interface.
        name: String,
        /// Why, in words.
        why: String,
    },
    /// The descriptor is not open.
    #[error("--net fd={0}: file descriptor {0} is not open in the launcher")]
    BadFd(RawFd),
    /// The descriptor is open but not an attached TAP.
    #[error("--net fd={fd}: the file descriptor is not a TAP device ({why})")]
    NotTap {
        /// The descriptor.
        fd: RawFd,
        /// What it is instead.
        why: String,
    },
    /// Another ioctl or fcntl failed.
    #[error("TAP {name}: {what}: {source}")]
    Setup {
        /// The interface.
        name: String,
        /// The call.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: name, flags, padding to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> Self {
        IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        }
    }
}

/// An attached TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
    /// The `TUN_F_*` flags last set (0 after attaching).
    offload: u32,
    /// A socket standing in for a TAP in unit tests: `TUNSETOFFLOAD` is only recorded.
    fake: bool,
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::Ioctl, arg: *mut T) -> std::io::Result<()> {
    // SAFETY: the callers pass TUN ioctls with a pointer to a live object of the type the
    // ioctl reads or writes (an IfReq or a c_int/c_uint).
    let rc = unsafe { libc::ioctl(fd, req, arg) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(fd: RawFd, req: libc::Ioctl, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    let rc = unsafe { libc::ioctl(fd, req, arg) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Attach to the existing TAP interface `name` (this process's network namespace).
    pub fn open_named(name: &str) -> Result<Self, TapError> {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| TapError::NoSuchInterface(name.to_string()))?;
        // SAFETY: if_nametoindex reads the NUL-terminated string we own.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            // Checked first: TUNSETIFF with privilege would create a new, unconnected TAP.
            return Err(TapError::NoSuchInterface(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        if let Err(e) = ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF, &mut req) {
            let why = match e.raw_os_error() {
                Some(libc::EINVAL) => format!("{name} is not a TAP device (a TUN, or another kind of interface?)"),
                Some(libc::EBUSY) => format!("{name} is already attached (to another launcher, or given twice)"),
                Some(libc::EPERM) => format!("permission denied: the TAP must be persistent and owned by this user (ip tuntap add dev {name} mode tap user $USER)"),
                _ => e.to_string(),
            };
            return Err(TapError::Attach {
                name: name.to_string(),
                why,
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
            vnet_hdr: true,
            offload: 0,
            fake: false,
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Use the TAP attached to `fd` (which stays open: this takes a duplicate).
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        // SAFETY: F_DUPFD_CLOEXEC duplicates `fd` if it is open; no memory is passed.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(TapError::BadFd(fd));
        }
        // SAFETY: `dup` is a descriptor we just created and own.
        let file = unsafe { File::from_raw_fd(dup) };
        let mut req = IfReq::new();
        if let Err(e) = ioctl_ptr(file.as_raw_fd(), libc::TUNGETIFF, &mut req) {
            let why = match e.raw_os_error() {
                Some(libc::EBADFD) => "a /dev/net/tun file not attached to an interface".into(),
                Some(libc::ENOTTY | libc::EINVAL) => "not a tun/tap file".into(),
                _ => e.to_string(),
            };
            return Err(TapError::NotTap { fd, why });
        }
        let flags = i32::from(req.flags);
        let len = req.name.iter().position(|b| *b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::NotTap {
                fd,
                why: format!("{name} is a TUN (layer 3) device"),
            });
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(TapError::NotTap {
                fd,
                why: format!("{name} was attached without IFF_NO_PI"),
            });
        }
        let tap = Tap {
            file,
            name,
            // A descriptor opened without IFF_VNET_HDR (by whoever started the launcher)
            // keeps working, without offloads: see the module documentation.
            vnet_hdr: flags & libc::IFF_VNET_HDR != 0,
            offload: 0,
            fake: false,
        };
        if !tap.vnet_hdr {
            tracing::info!(
                tap = %tap.name,
                "the TAP descriptor has no IFF_VNET_HDR: virtio-net offers no offloads"
            );
        }
        tap.configure()?;
        Ok(tap)
    }

    /// A datagram socket standing in for a TAP (unit tests), with the vnet header.
    #[cfg(test)]
    pub(crate) fn from_socket(s: std::os::unix::net::UnixDatagram) -> Self {
        s.set_nonblocking(true).expect("nonblocking");
        Tap {
            file: File::from(std::os::fd::OwnedFd::from(s)),
            name: "test".into(),
            vnet_hdr: true,
            offload: 0,
            fake: true,
        }
    }

    /// As [`Tap::from_socket`], for a file opened without `IFF_VNET_HDR` (unit tests).
    #[cfg(test)]
    pub(crate) fn from_socket_without_vnet_hdr(s: std::os::unix::net::UnixDatagram) -> Self {
        Tap {
            vnet_hdr: false,
            ..Self::from_socket(s)
        }
    }

    fn configure(&self) -> Result<(), TapError> {
        let setup = |what, source| TapError::Setup {
            name: self.name.clone(),
            what,
            source,
        };
        let fd = self.file.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on our own descriptor; no memory is passed.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(setup("O_NONBLOCK", std::io::Error::last_os_error()));
        }
        if self.vnet_hdr {
            let mut len = VNET_HDR_LEN as libc::c_int;
            ioctl_ptr(fd, libc::TUNSETVNETHDRSZ, &mut len)
                .map_err(|e| setup("TUNSETVNETHDRSZ", e))?;
        }
        ioctl_val(fd, libc::TUNSETOFFLOAD, 0).map_err(|e| setup("TUNSETOFFLOAD", e))?;
        Ok(())
    }

    /// Let the kernel deliver frames with the `TUN_F_*` offloads in `flags` (0: none).
    /// Only on a TAP with the vnet header: without it no offload can be described, so any
    /// flag is refused (`InvalidInput`) before the kernel sees it.
    pub fn set_offload(&mut self, flags: u32) -> std::io::Result<()> {
        if flags != 0 && !self.vnet_hdr {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "offloads need a TAP with IFF_VNET_HDR",
            ));
        }
        if !self.fake {
            ioctl_val(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, flags.into())?;
        }
        self.offload = flags;
        Ok(())
    }

    /// The `TUN_F_*` flags last set with [`Tap::set_offload`].
    pub fn offload(&self) -> u32 {
        self.offload
    }

    /// Give up the descriptor (it stays attached to the interface).
    pub fn into_fd(self) -> std::os::fd::OwnedFd {
        self.file.into()
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor (for poll and for handing over to the next launcher).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Frames carry a `virtio_net_hdr_v1` on this file.
    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Read one frame (with its vnet header if [`Tap::has_vnet_hdr`]); `WouldBlock` when
    /// the queue is empty.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Write one frame (with its vnet header if [`Tap::has_vnet_hdr`]).
    pub fn write_frame(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    /// Write one frame made of `hdr` (its vnet header, or nothing) and `data` (guest
    /// memory) in one `writev`, so the frame is not copied on its way: the kernel takes the
    /// whole vector as one frame. At most [`GATHER_MAX`] slices of data.
    pub fn write_gather<B: BitmapSlice>(
        &mut self,
        hdr: &[u8],
        data: &[VolatileSlice<'_, B>],
    ) -> std::io::Result<usize> {
        if data.len() >= GATHER_MAX {
            return Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        // The guards keep each pointer valid for the duration of the system call (on the
        // stack: this runs once per frame, and a heap allocation per frame showed).
        let mut guards: [Option<PtrGuard>; GATHER_MAX] = std::array::from_fn(|_| None);
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; GATHER_MAX];
        let mut n = 0;
        if !hdr.is_empty() {
            iovs[0] = libc::iovec {
                iov_base: hdr.as_ptr().cast_mut().cast(),
                iov_len: hdr.len(),
            };
            n = 1;
        }
        for (slot, d) in guards.iter_mut().zip(data) {
            let g = d.ptr_guard();
            iovs[n] = libc::iovec {
                iov_base: g.as_ptr().cast_mut().cast(),
                iov_len: d.len(),
            };
            *slot = Some(g);
            n += 1;
        }
        // SAFETY: the first `n` iovecs point into `hdr` or into live VolatileSlices of
        // guest memory (their guards held in `guards`) and cover at most their lengths;
        // the kernel only reads them. Guest memory is shared with the vCPUs, which is why
        // it is only reached through these raw pointers.
        let r = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), n as i32) };
        // `guards` lives to the end of this function, past the system call.
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

/// Most iovecs of one [`Tap::write_gather`], header included.
pub const GATHER_MAX: usize = 16;

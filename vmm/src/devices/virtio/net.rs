//! virtio-net (virtio 1.x, section 5.1) on a TAP ([`super::tap::Tap`]).
//!
//! Two queues of [`QUEUE_SIZE`] entries: receive (0) and transmit (1). Features offered:
//! `VIRTIO_NET_F_MAC` (the MAC in the configuration space), `VIRTIO_NET_F_STATUS` (link
//! up) and, when the TAP carries the vnet header, the offloads ([`OFFLOADS`]):
//! `CSUM`, `HOST_TSO4/6`, `HOST_ECN` (the guest may send frames with a partial checksum
//! and TCP super-frames up to 64 KiB, which the host kernel completes or segments) and
//! `GUEST_CSUM`, `GUEST_TSO4/6`, `GUEST_ECN` (the guest takes them). No mergeable buffers,
//! no control queue.
//!
//! * **Header**: the TAP is opened with `IFF_VNET_HDR` and a 12-byte header
//!   (`virtio_net_hdr_v1`), so the guest's header goes to the kernel and the kernel's to
//!   the guest unchanged, except that the device never lets through what the driver did not
//!   negotiate: a TX header's checksum request without `CSUM` is cleared, a GSO type
//!   without the matching `HOST_TSO*` drops the frame, an RX header's flags are cleared
//!   without `GUEST_CSUM` (the kernel marks checksummed frames `DATA_VALID` even with no
//!   offload on) and `num_buffers` is always 1.
//! * **Offloads on the TAP** ([`Net::activate`], at `DRIVER_OK` and when a restored VM's
//!   driver had reached it): `TUNSETOFFLOAD` with exactly what the guest accepted to
//!   receive, as Firecracker and Cloud Hypervisor do; 0 again at a device reset. A
//!   restored device re-applies them from the negotiated features in its state (a TAP
//!   handed over by the previous launcher, or a new one after a copy migration), and a
//!   restore onto a TAP without the vnet header whose guest negotiated offloads is
//!   refused: the guest would send partial checksums that nothing completes.
//! * **TX** runs on the device's worker thread ([`super::worker`]) when the guest notifies
//!   the TX queue (an ioeventfd), or while the worker polls that queue after traffic
//!   ([`POLL_MAX`]): each chain is header + frame, written to the TAP in one `writev`
//!   straight from guest memory (only the header is copied, to be checked; chains of more
//!   than 8 descriptors, or whose first descriptor is shorter than the header, go through
//!   a bounce buffer). A chain that is malformed, shorter than a header plus an Ethernet header,
//!   longer than [`MAX_FRAME`], with a GSO type the driver did not negotiate, or that the
//!   TAP refuses is dropped (counted) and returned to the guest. TX never blocks.
//! * **RX**: the same worker watches the TAP (edge-triggered) and, when a frame is waiting
//!   and the driver posted buffers, fills them through the transport (under its lock),
//!   through vm-memory, so the VMM dirty bitmap sees every byte, then raises the interrupt.
//!   A guest notify on the RX queue (new buffers) drains the TAP again. A frame is read
//!   from the TAP only once a buffer chain is at hand; a frame that does not fit the chain
//!   is dropped (counted) and the chain kept for the next one, so a guest whose buffers are
//!   too small for the GSO super-frames it asked for (`GUEST_TSO*` without mergeable
//!   buffers needs 64 KiB chains, which Linux posts in its "big packets" mode) loses those
//!   frames but never its queue. Firecracker does the same (it drops the frame; it
//!   returns the chain with length 0).
//! * **Pause**: the transport's pause takes its lock, so it waits for an RX or TX pass in
//!   progress to complete; afterwards nothing is read from the TAP until resume. So at a
//!   pause no frame is in flight inside the VMM: frames are either in guest memory (used
//!   ring written) or still queued in the TAP. A local migration hands the TAP itself to
//!   the next launcher, which reads the waiting frames after its resume.
//! * **Announce**: after a restored VM starts, the device sends three RARP frames from the
//!   guest's MAC (as QEMU's `announce-self`: five, 50 to 350 ms apart) so that bridges and switches learn where the
//!   guest is now.

use std::time::{Duration, Instant};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};

use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_LEN};
use super::VirtioDevice;
use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestMemoryBackend};

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Largest frame (Ethernet header included, no FCS) either way: a GSO super-frame of the
/// most Linux builds (64 KiB, `GSO_LEGACY_MAX_SIZE`, counted from the network header) plus
/// an Ethernet header with a VLAN tag, rounded up. Without offloads frames stay below
/// 64 KiB anyway.
pub const MAX_FRAME: usize = 65536 + 64;
const ETH_HLEN: usize = 14;
/// Longest poll window of the device's worker (see [`super::worker`]): after a frame either
/// way it keeps looking at the TX ring and the TAP this long before it sleeps, when
/// traffic has come that soon before.
pub const POLL_MAX: Duration = Duration::from_micros(50);
/// Most descriptors of a TX chain sent without the bounce buffer (see `Net::transmit`).
const TX_MAX_SEGS: usize = 8;
/// Bytes of device configuration: mac[6], status u16 (then zeros).
const CONFIG_SIZE: usize = 8;
/// RARP frames sent after a restore, and the gaps between them (QEMU's announce-self
/// defaults: 5 rounds, 50 ms then 100 ms more each time).
const ANNOUNCE_ROUNDS: u8 = 5;
const ANNOUNCE_FIRST_GAP: Duration = Duration::from_millis(50);
const ANNOUNCE_STEP: Duration = Duration::from_millis(100);

const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// The offload features offered when the TAP carries the vnet header.
pub const OFFLOADS: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN);

/// The `TUN_F_*` flags for what a driver that accepted `features` can receive. The kernel
/// takes TSO only with the checksum offload, as virtio requires `GUEST_CSUM` for
/// `GUEST_TSO*`: without it, nothing.
pub fn tun_offload(features: u64) -> u32 {
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    let mut f = TUN_F_CSUM;
    if features & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
        f |= TUN_F_TSO4;
    }
    if features & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
        f |= TUN_F_TSO6;
    }
    if f & (TUN_F_TSO4 | TUN_F_TSO6) != 0 && features & bit(VIRTIO_NET_F_GUEST_ECN) != 0 {
        f |= TUN_F_TSO_ECN;
    }
    f
}

/// The offloads a virtio-net driver negotiated, saved as the `virtio-net-offload` section
/// (one per interface) only when some driver accepted one. The negotiated features are in
/// the transport's state already; this section exists so that a launcher without
/// offloads, which would send the guest's partial checksums and super-frames to the host
/// with a zeroed header, refuses such a state (unknown section) instead of corrupting
/// frames. Its absence (an older launcher's state, or no offload negotiated) means none.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetOffloadState {
    /// The [`OFFLOADS`] bits the driver accepted.
    pub features: u64,
    /// The `TUN_F_*` flags the TAP had: what [`tun_offload`] makes of `features` once the
    /// driver set `DRIVER_OK`, 0 before. Informational: a restore derives them again.
    pub tun_offload: u32,
}

/// Errors activating the device's offloads.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The driver negotiated offloads (a restored VM) but this TAP has no vnet header.
    #[error("the guest negotiated offloads ({features:#x}) but TAP {tap} has no vnet header (IFF_VNET_HDR): attach the VM to a TAP opened with it")]
    NoVnetHdr {
        /// The TAP.
        tap: String,
        /// The offload features the driver accepted.
        features: u64,
    },
    /// `TUNSETOFFLOAD` failed.
    #[error("TAP {tap}: TUNSETOFFLOAD {flags:#x}: {source}")]
    SetOffload {
        /// The TAP.
        tap: String,
        /// The flags.
        flags: u32,
        /// The error.
        source: std::io::Error,
    },
}

/// Frame counters of one device (for logs and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames read from the TAP and dropped (no room in the guest's buffer).
    pub rx_dropped: u64,
    /// Frames sent to the TAP.
    pub tx_frames: u64,
    /// Chains from the guest dropped (malformed, too short, too long, refused).
    pub tx_dropped: u64,
    /// RARP announcements sent.
    pub announces: u64,
    /// Frames read from the TAP that did not fit the guest's buffer chain (a subset of
    /// `rx_dropped`: GSO super-frames for a guest whose buffers are too small, say).
    pub rx_too_big: u64,
}

/// A virtio-net device.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    paused: bool,
    buf: Vec<u8>,
    counters: NetCounters,
    announce_left: u8,
    next_announce: Instant,
    /// The features the driver accepted, from `DRIVER_OK` ([`Net::activate`]) until a
    /// reset; 0 before.
    acked: u64,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("mac", &super::netcfg::format_mac(&self.mac))
            .field("counters", &self.counters)
            .finish()
    }
}

impl Net {
    /// A device on `tap` with `mac`; `paused` for a restored VM that has not started.
    pub fn new(tap: Tap, mac: [u8; 6], paused: bool) -> std::io::Result<Self> {
        Ok(Net {
            tap,
            mac,
            paused,
            buf: vec![0; VNET_HDR_LEN + MAX_FRAME],
            counters: NetCounters::default(),
            announce_left: 0,
            next_announce: Instant::now(),
            acked: 0,
        })
    }

    /// The driver accepted `features` and set `DRIVER_OK`, or a restored VM's driver had:
    /// turn on the TAP offloads it can receive. Fails when it negotiated offloads this
    /// TAP cannot carry (a restore onto a TAP without the vnet header) or when the kernel
    /// refuses them.
    pub fn activate(&mut self, features: u64) -> Result<(), NetError> {
        if features & OFFLOADS != 0 && !self.tap.has_vnet_hdr() {
            return Err(NetError::NoVnetHdr {
                tap: self.tap.name().to_string(),
                features: features & OFFLOADS,
            });
        }
        let flags = tun_offload(features);
        self.tap
            .set_offload(flags)
            .map_err(|source| NetError::SetOffload {
                tap: self.tap.name().to_string(),
                flags,
                source,
            })?;
        self.acked = features;
        Ok(())
    }

    /// The features the driver accepted (0 before `DRIVER_OK` and after a reset).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// The offloads of a driver that negotiated `features` (the transport's: it may not
    /// have set `DRIVER_OK` yet), for the `virtio-net-offload` section.
    pub fn offload_state(&self, features: u64) -> NetOffloadState {
        NetOffloadState {
            features: features & OFFLOADS,
            tun_offload: self.tap.offload(),
        }
    }

    fn acked(&self, b: u32) -> bool {
        self.acked & bit(b) != 0
    }

    /// The TAP.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The counters so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Send RARP announcements for the guest's MAC (now, then after 50, 150, 250, 350 ms),
    /// from the worker (kick it after this call).
    pub fn announce(&mut self) {
        self.announce_left = ANNOUNCE_ROUNDS;
        self.next_announce = Instant::now();
    }

    /// The RARP frame QEMU sends for a MAC: broadcast, ethertype 0x8035, "request reverse".
    fn rarp_frame(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(VNET_HDR_LEN + 60);
        if self.tap.has_vnet_hdr() {
            f.extend_from_slice(&[0; VNET_HDR_LEN]);
        }
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&self.mac);
        f.extend_from_slice(&[0x80, 0x35, 0, 1, 0x08, 0x00, 6, 4, 0, 3]);
        f.extend_from_slice(&self.mac);
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&self.mac);
        f.extend_from_slice(&[0; 4]);
        f.resize(f.len() + 18, 0); // pad the 42-byte frame to the 60-byte minimum
        f
    }

    /// Send a due announcement; returns how long until the next one.
    fn announce_step(&mut self) -> Option<Duration> {
        if self.announce_left == 0 || self.paused {
            return None;
        }
        let now = Instant::now();
        if now >= self.next_announce {
            let f = self.rarp_frame();
            match self.tap.write_frame(&f) {
                Ok(_) => self.counters.announces += 1,
                Err(e) => tracing::warn!(tap = self.tap.name(), "RARP announce: {e}"),
            }
            let done = u32::from(ANNOUNCE_ROUNDS - self.announce_left);
            self.announce_left -= 1;
            self.next_announce = now + ANNOUNCE_FIRST_GAP + ANNOUNCE_STEP * done;
        }
        (self.announce_left > 0).then(|| self.next_announce.saturating_duration_since(now))
    }

    fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if self.paused {
            return false;
        }
        let mut used = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let unpop = |q: &mut Queue| q.set_next_avail(q.next_avail().wrapping_sub(1));
            let mut w = match chain
                .clone()
                .writer(mem)
                .ok()
                .filter(|_| well_formed(&chain))
            {
                Some(w) => w,
                None => {
                    // Malformed chain: give it back empty, frames stay in the TAP.
                    if queue.add_used(mem, head, 0).is_err() {
                        break;
                    }
                    used = true;
                    continue;
                }
            };
            let hdr_in_frame = self.tap.has_vnet_hdr();
            let start = if hdr_in_frame { 0 } else { VNET_HDR_LEN };
            let n = match self.tap.read_frame(&mut self.buf[start..]) {
                Ok(n) => n,
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::warn!(tap = self.tap.name(), "TAP read: {e}");
                    }
                    unpop(queue);
                    break;
                }
            };
            if !hdr_in_frame {
                self.buf[..VNET_HDR_LEN].fill(0);
            }
            let total = start + n;
            if total < VNET_HDR_LEN + ETH_HLEN || !self.rx_header_allowed() {
                unpop(queue);
                self.counters.rx_dropped += 1;
                continue;
            }
            // num_buffers: 1 (no mergeable buffers).
            self.buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            if w.available_bytes() < total {
                // Does not fit this chain: drop the frame, keep the chain for the next.
                unpop(queue);
                self.counters.rx_dropped += 1;
                self.counters.rx_too_big += 1;
                continue;
            }
            if std::io::Write::write_all(&mut w, &self.buf[..total]).is_err() {
                self.counters.rx_dropped += 1;
                if queue.add_used(mem, head, 0).is_err() {
                    break;
                }
                used = true;
                continue;
            }
            if queue.add_used(mem, head, total as u32).is_err() {
                break;
            }
            self.counters.rx_frames += 1;
            used = true;
        }
        used
    }

    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            if !self.transmit(chain, mem) {
                self.counters.tx_dropped += 1;
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// Send one chain to the TAP; false if it was dropped.
    ///
    /// The frame goes from guest memory to the TAP in one `writev` ([`Tap::write_gather`]):
    /// only the 12-byte header is copied (it is checked and may be cleared), the frame is
    /// not. Chains with more than [`TX_MAX_SEGS`] segments, or whose header does not sit
    /// in the first one, take the bounce buffer instead.
    fn transmit(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> bool {
        let mut segs = [None; TX_MAX_SEGS];
        let (mut n, mut len, mut ends, mut gather) = (0usize, 0usize, false, true);
        for d in chain.clone() {
            if d.is_write_only() {
                return false;
            }
            ends = !d.has_next();
            len = len.saturating_add(d.len() as usize);
            match segs.get_mut(n) {
                Some(s) if gather => *s = Some((d.addr(), d.len() as usize)),
                _ => gather = false,
            }
            n += 1;
        }
        // A chain that does not end is a loop or points out of the table: malformed.
        if !ends || !(VNET_HDR_LEN + ETH_HLEN..=VNET_HDR_LEN + MAX_FRAME).contains(&len) {
            return false;
        }
        let first = segs[0].filter(|(_, l)| gather && *l >= VNET_HDR_LEN);
        let Some((addr0, len0)) = first else {
            return self.transmit_copy(chain, mem, len);
        };
        // On the stack (once per frame). Outside guest memory, or across two regions: let
        // the reader sort it out.
        let Ok(s0) = mem.get_slice(addr0, len0) else {
            return self.transmit_copy(chain, mem, len);
        };
        let mut slices = [s0; TX_MAX_SEGS];
        for (slot, (a, l)) in slices.iter_mut().zip(segs[..n].iter().flatten()).skip(1) {
            match mem.get_slice(*a, *l) {
                Ok(s) => *slot = s,
                Err(_) => return self.transmit_copy(chain, mem, len),
            }
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        if mem.read_slice(&mut hdr, addr0).is_err() {
            return false;
        }
        if !tx_header_allowed(self.acked, &mut hdr) {
            return false;
        }
        let Ok(rest) = slices[0].offset(VNET_HDR_LEN) else {
            return false;
        };
        slices[0] = rest;
        let hdr: &[u8] = if self.tap.has_vnet_hdr() { &hdr } else { &[] };
        let r = self.tap.write_gather(hdr, &slices[..n]);
        self.sent(r)
    }

    /// [`Self::transmit`] through the bounce buffer, for a chain of `len` bytes that ends.
    fn transmit_copy(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        len: usize,
    ) -> bool {
        let Ok(mut r) = chain.reader(mem) else {
            return false;
        };
        if r.available_bytes() != len
            || std::io::Read::read_exact(&mut r, &mut self.buf[..len]).is_err()
        {
            return false;
        }
        if !tx_header_allowed(self.acked, &mut self.buf[..VNET_HDR_LEN]) {
            return false;
        }
        let out = if self.tap.has_vnet_hdr() {
            &self.buf[..len]
        } else {
            &self.buf[VNET_HDR_LEN..len]
        };
        let r = self.tap.write_frame(out);
        self.sent(r)
    }

    fn sent(&mut self, r: std::io::Result<usize>) -> bool {
        match r {
            Ok(_) => {
                self.counters.tx_frames += 1;
                true
            }
            Err(e) => {
                tracing::debug!(tap = self.tap.name(), "TAP write: {e}");
                false
            }
        }
    }
}

impl Net {
    /// Make the kernel's header in `buf` one the driver may see; false to drop the frame.
    /// Flags (`DATA_VALID`, `NEEDS_CSUM`) only with `GUEST_CSUM`; a GSO frame only of a
    /// type the driver accepted (the TAP delivers none unless told to, see
    /// [`tun_offload`]). `num_buffers` is set by the caller.
    fn rx_header_allowed(&mut self) -> bool {
        let csum = self.acked(VIRTIO_NET_F_GUEST_CSUM);
        let (tso4, tso6, ecn) = (
            self.acked(VIRTIO_NET_F_GUEST_TSO4),
            self.acked(VIRTIO_NET_F_GUEST_TSO6),
            self.acked(VIRTIO_NET_F_GUEST_ECN),
        );
        let h = &mut self.buf[..VNET_HDR_LEN];
        if !csum {
            h[0] = 0;
            h[6..10].fill(0); // csum_start, csum_offset
        }
        gso_allowed(h[1], tso4, tso6, ecn)
    }
}

/// Check the guest's header `h` (12 bytes) against the features the driver accepted
/// (`acked`), clearing what it may not ask for; false to drop the frame. A checksum request
/// counts only with `CSUM`; a GSO type must be one of `HOST_TSO4/6` (with `HOST_ECN` for
/// the ECN bit), and the kernel is never asked to segment what the driver did not
/// announce.
fn tx_header_allowed(acked: u64, h: &mut [u8]) -> bool {
    let on = |b: u32| acked & bit(b) != 0;
    let csum = on(VIRTIO_NET_F_CSUM);
    let (tso4, tso6, ecn) = (
        on(VIRTIO_NET_F_HOST_TSO4),
        on(VIRTIO_NET_F_HOST_TSO6),
        on(VIRTIO_NET_F_HOST_ECN),
    );
    h[10..12].fill(0); // num_buffers: RX only
    if !csum {
        // No offload was negotiated: the host gets a zero header whatever the guest
        // wrote.
        h.fill(0);
        return true;
    }
    h[0] &= VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    gso_allowed(h[1], tso4, tso6, ecn)
}

/// A header's `gso_type` is one the driver negotiated (`tso4`, `tso6`, `ecn`: the TSO and
/// ECN features of that direction).
fn gso_allowed(gso_type: u8, tso4: bool, tso6: bool, ecn: bool) -> bool {
    let gso = u32::from(gso_type);
    let kind = match gso & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => tso4,
        VIRTIO_NET_HDR_GSO_TCPV6 => tso6,
        _ => false,
    };
    kind && (gso & VIRTIO_NET_HDR_GSO_ECN == 0 || ecn)
}

/// A chain that ends: virtio-queue stops following `next` after a queue's worth of
/// descriptors (a loop) or at an out-of-range index, silently; such a chain is malformed.
fn well_formed(chain: &virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> bool {
    chain.clone().last().is_some_and(|d| !d.has_next())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let base = bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS);
        if self.tap.has_vnet_hdr() {
            base | OFFLOADS
        } else {
            base
        }
    }

    fn activate(&mut self, features: u64) -> Result<(), String> {
        Net::activate(self, features).map_err(|e| e.to_string())
    }

    fn reset(&mut self) {
        self.acked = 0;
        if let Err(e) = self.tap.set_offload(0) {
            tracing::warn!(tap = self.tap.name(), "TUNSETOFFLOAD 0 at reset: {e}");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; CONFIG_SIZE];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
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

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            RX_QUEUE => self.process_rx(queue, mem),
            TX_QUEUE => self.process_tx(queue, mem),
            _ => false,
        }
    }

    fn backend_size(&self) -> u64 {
        0
    }

    fn drains_queue(&self, index: usize) -> bool {
        index == TX_QUEUE
    }

    fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    fn timer_step(&mut self) -> Option<Duration> {
        self.announce_step()
    }

    fn backend_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        Some((self.tap.raw_fd(), RX_QUEUE))
    }

    fn poll_queue(&self) -> Option<(usize, Duration)> {
        Some((TX_QUEUE, POLL_MAX))
    }
}

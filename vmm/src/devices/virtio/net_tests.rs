//! virtio-net driven as a guest driver would (BAR0 writes, rings in guest memory), with a
//! Unix datagram socket standing in for the TAP. Malformed chains and oversized frames
//! from the guest must be dropped, never crash the device.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::net::{Net, MAX_FRAME, OFFLOADS, RX_QUEUE, TX_QUEUE};
use super::pci::VirtioPciDevice;
use super::tap::{Tap, VNET_HDR_LEN};
use crate::devices::bus::lock;
use crate::devices::BusDevice;
use crate::vstate::memory::GuestRam;

const QSIZE: u16 = 8;
/// Per queue q: descriptors, avail, used at these bases + q * 0x10000.
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUF: u64 = 0x40000;
const WRITE: u16 = 2;
const NEXT: u16 = 1;
const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

struct Rig {
    ram: GuestRam,
    dev: VirtioPciDevice,
    net: Arc<Mutex<Net>>,
    host: UnixDatagram,
    avail: [u16; 2],
    /// The low 32 feature bits the driver accepts.
    features: u32,
}

/// The features of the old rigs: MAC and STATUS.
const BASIC: u32 = (1 << 5) | (1 << 16);

impl Rig {
    fn new() -> Rig {
        Rig::with(BASIC, Tap::from_socket)
    }

    /// A rig whose driver accepts `features` (low word) on a TAP made by `tap`.
    fn with(features: u32, tap: fn(UnixDatagram) -> Tap) -> Rig {
        let (host, guest) = UnixDatagram::pair().unwrap();
        let ram = GuestRam::new(4 << 20).unwrap();
        // As during a migration: the device's writes are recorded.
        ram.track_vmm_writes(true);
        let net = Arc::new(Mutex::new(Net::new(tap(guest), MAC, false).unwrap()));
        let dev = VirtioPciDevice::new(
            16,
            net.clone(),
            ram.memory().clone(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        let mut rig = Rig {
            ram,
            dev,
            net,
            host,
            avail: [0; 2],
            features,
        };
        rig.init();
        rig
    }

    fn w(&mut self, off: u64, v: u64, len: usize) {
        self.dev.write(off, &v.to_le_bytes()[..len]);
    }

    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn init(&mut self) {
        self.w(0x14, 0, 1);
        self.w(0x14, 1 | 2, 1);
        self.w(0x08, 0, 4);
        self.w(0x0c, u64::from(self.features), 4);
        self.w(0x08, 1, 4);
        self.w(0x0c, 1, 4);
        self.w(0x14, 1 | 2 | 8, 1);
        assert_ne!(self.r(0x14, 1) & 8, 0, "features refused");
        for q in 0..2u64 {
            self.w(0x16, q, 2);
            self.w(0x18, u64::from(QSIZE), 2);
            self.w(0x20, DESC + q * 0x10000, 8);
            self.w(0x28, AVAIL + q * 0x10000, 8);
            self.w(0x30, USED + q * 0x10000, 8);
            self.w(0x1c, 1, 2);
        }
        self.w(0x14, 1 | 2 | 8 | 4, 1);
        assert_eq!(self.r(0x14, 1) & 0x40, 0, "device needs reset");
    }

    fn mem(&self) -> &crate::vstate::memory::GuestMemoryMmap {
        self.ram.memory()
    }

    /// Post a chain of (addr, len, flags) on queue `q` (descriptors from `first`), notify,
    /// and return the used index afterwards.
    fn post(&mut self, q: usize, first: u16, descs: &[(u64, u32, u16)], notify: bool) -> u16 {
        let base = q as u64 * 0x10000;
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let n = first + i as u16;
            let mut flags = *flags;
            if i + 1 < descs.len() {
                flags |= NEXT;
            }
            let d = DESC + base + 16 * u64::from(n);
            let m = self.mem();
            m.write_obj(*addr, GuestAddress(d)).unwrap();
            m.write_obj(*len, GuestAddress(d + 8)).unwrap();
            m.write_obj(flags, GuestAddress(d + 12)).unwrap();
            m.write_obj(n + 1, GuestAddress(d + 14)).unwrap();
        }
        let slot = AVAIL + base + 4 + 2 * u64::from(self.avail[q] % QSIZE);
        self.mem().write_obj(first, GuestAddress(slot)).unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem()
            .write_obj(self.avail[q], GuestAddress(AVAIL + base + 2))
            .unwrap();
        if notify {
            self.w(0x3000 + 4 * q as u64, q as u64, 2);
        }
        self.used_idx(q)
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem()
            .read_obj(GuestAddress(USED + q as u64 * 0x10000 + 2))
            .unwrap()
    }

    fn used_len(&self, q: usize, i: u16) -> u32 {
        let e = USED + q as u64 * 0x10000 + 4 + 8 * u64::from(i % QSIZE);
        self.mem().read_obj(GuestAddress(e + 4)).unwrap()
    }

    fn host_recv(&self) -> Option<Vec<u8>> {
        self.host.set_nonblocking(true).unwrap();
        let mut b = vec![0u8; 70000];
        self.host.recv(&mut b).ok().map(|n| b[..n].to_vec())
    }
}

fn frame(len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| i as u8).collect();
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&MAC);
    f
}

#[test]
fn config_space_has_mac_and_link_up() {
    let mut rig = Rig::new();
    let mac: Vec<u8> = (0..6).map(|i| rig.r(0x2000 + i, 1) as u8).collect();
    assert_eq!(mac, MAC);
    assert_eq!(rig.r(0x2006, 2), 1);
    assert_eq!(rig.r(0x2000 + 64, 4), 0, "past the end reads zero");
}

#[test]
fn tx_sends_frames_with_a_zero_header() {
    let mut rig = Rig::new();
    let f = frame(100);
    // A header full of offload requests the device never offered.
    rig.mem()
        .write_slice(&[0xab; VNET_HDR_LEN], GuestAddress(BUF))
        .unwrap();
    rig.mem()
        .write_slice(&f, GuestAddress(BUF + VNET_HDR_LEN as u64))
        .unwrap();
    // Header and frame in two descriptors.
    let used = rig.post(
        TX_QUEUE,
        0,
        &[
            (BUF, VNET_HDR_LEN as u32, 0),
            (BUF + VNET_HDR_LEN as u64, 100, 0),
        ],
        true,
    );
    assert_eq!(used, 1);
    let got = rig.host_recv().expect("frame on the TAP");
    assert_eq!(&got[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
    assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
    assert_eq!(lock(&rig.net).counters().tx_frames, 1);
}

#[test]
fn malformed_and_oversized_tx_chains_are_dropped() {
    let mut rig = Rig::new();
    let mut expect_used = 0;
    // Outside guest RAM.
    expect_used += 1;
    assert_eq!(
        rig.post(TX_QUEUE, 0, &[(0xfff0_0000, 200, 0)], true),
        expect_used
    );
    // Too short for a header and an Ethernet header.
    expect_used += 1;
    assert_eq!(rig.post(TX_QUEUE, 0, &[(BUF, 20, 0)], true), expect_used);
    // Longer than the largest frame (spread over descriptors of guest RAM).
    expect_used += 1;
    let big = (VNET_HDR_LEN + MAX_FRAME + 1) as u32;
    assert_eq!(rig.post(TX_QUEUE, 0, &[(BUF, big, 0)], true), expect_used);
    // A descriptor loop: 0 -> 1 -> 0 ...
    let d1 = DESC + 0x10000 + 16;
    rig.post(TX_QUEUE, 0, &[(BUF, 64, 0), (BUF, 64, 0)], false);
    rig.mem().write_obj(0u16, GuestAddress(d1 + 14)).unwrap();
    rig.mem().write_obj(NEXT, GuestAddress(d1 + 12)).unwrap();
    rig.w(0x3004, 1, 2);
    expect_used += 1;
    assert_eq!(rig.used_idx(TX_QUEUE), expect_used);
    // A bogus avail index far ahead of the ring: nothing is processed, nothing crashes.
    rig.mem()
        .write_obj(0x7fffu16, GuestAddress(AVAIL + 0x10000 + 2))
        .unwrap();
    rig.w(0x3004, 1, 2);
    assert!(rig.host_recv().is_none(), "nothing reached the TAP");
    assert_eq!(lock(&rig.net).counters().tx_frames, 0);
    assert_eq!(lock(&rig.net).counters().tx_dropped, 4);
}

#[test]
fn rx_fills_posted_buffers_and_keeps_frames_while_paused() {
    let mut rig = Rig::new();
    let f = frame(60);
    let mut with_hdr = vec![0u8; VNET_HDR_LEN];
    with_hdr.extend_from_slice(&f);
    // Paused: the frame stays in the "TAP" even though a buffer is posted.
    rig.dev.set_paused(true);
    rig.host.send(&with_hdr).unwrap();
    assert_eq!(rig.post(RX_QUEUE, 0, &[(BUF, 2048, WRITE)], true), 0);
    // Resumed: the next RX pass delivers it.
    rig.dev.set_paused(false);
    rig.dev.process(RX_QUEUE);
    assert_eq!(rig.used_idx(RX_QUEUE), 1);
    assert_eq!(rig.used_len(RX_QUEUE, 0) as usize, with_hdr.len());
    let mut got = vec![0u8; with_hdr.len()];
    rig.mem().read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    // The device's writes are in the VMM dirty bitmap.
    assert!(rig.ram.take_vmm_dirty(0).iter().any(|w| *w != 0));
}

#[test]
fn rx_frames_too_big_for_the_buffer_are_dropped_and_the_buffer_kept() {
    let mut rig = Rig::new();
    let mut big = vec![0u8; VNET_HDR_LEN];
    big.extend_from_slice(&frame(1500));
    rig.host.send(&big).unwrap();
    let mut small = vec![0u8; VNET_HDR_LEN];
    small.extend_from_slice(&frame(60));
    rig.host.send(&small).unwrap();
    // A 512-byte buffer: the 1500-byte frame is dropped, the 60-byte one delivered in it.
    assert_eq!(rig.post(RX_QUEUE, 0, &[(BUF, 512, WRITE)], true), 1);
    assert_eq!(rig.used_len(RX_QUEUE, 0) as usize, small.len());
    let c = lock(&rig.net).counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 1));
    // A read-only "buffer" outside RAM is handed back empty; the frame waits.
    rig.host.send(&small).unwrap();
    assert_eq!(rig.post(RX_QUEUE, 1, &[(0xfff0_0000, 512, WRITE)], true), 2);
    assert_eq!(rig.used_len(RX_QUEUE, 1), 0);
    assert_eq!(rig.post(RX_QUEUE, 2, &[(BUF, 2048, WRITE)], true), 3);
    assert_eq!(rig.used_len(RX_QUEUE, 2) as usize, small.len());
}

#[test]
fn announce_sends_rarp_from_the_mac() {
    let rig = Rig::new();
    let (t, n) = (rig.dev.state(), rig.net.clone());
    assert_eq!(t.queues.len(), 2);
    let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
    let control = evt();
    let fds = super::worker::WorkerFds {
        queues: vec![evt(), evt()],
        control: control.try_clone().unwrap(),
        backend: None,
        poll: None,
    };
    lock(&n).announce();
    // The worker sends the announcements (it looks at the timer before each wait).
    let rx = super::worker::Worker::spawn("test-net".into(), Arc::new(Mutex::new(rig.dev)), fds)
        .unwrap();
    rig.host.set_nonblocking(false).unwrap();
    rig.host
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut b = vec![0u8; 2048];
    let len = rig.host.recv(&mut b).unwrap();
    let f = &b[VNET_HDR_LEN..len];
    assert_eq!(&f[..6], &[0xff; 6]);
    assert_eq!(&f[6..12], &MAC);
    assert_eq!(&f[12..14], &[0x80, 0x35]);
    assert_eq!(f.len(), 60);
    drop(rx);
}

/// Feature bits (virtio 1.x, 5.1.3).
const CSUM: u32 = 1 << 0;
const GUEST_CSUM: u32 = 1 << 1;
const GUEST_TSO4: u32 = 1 << 7;
const GUEST_TSO6: u32 = 1 << 8;
const HOST_TSO4: u32 = 1 << 11;
const NEEDS_CSUM: u8 = 1;
const DATA_VALID: u8 = 2;
const GSO_TCPV4: u8 = 1;

/// A virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
fn hdr(flags: u8, gso: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> Vec<u8> {
    let mut h = vec![flags, gso];
    h.extend_from_slice(&54u16.to_le_bytes());
    h.extend_from_slice(&gso_size.to_le_bytes());
    h.extend_from_slice(&csum_start.to_le_bytes());
    h.extend_from_slice(&csum_offset.to_le_bytes());
    h.extend_from_slice(&7u16.to_le_bytes()); // num_buffers: meaningless on TX
    h
}

impl Rig {
    /// Send header + frame on the TX queue in one descriptor.
    fn send(&mut self, header: &[u8], f: &[u8]) {
        let mut b = header.to_vec();
        b.extend_from_slice(f);
        self.mem().write_slice(&b, GuestAddress(BUF)).unwrap();
        let first = self.avail[TX_QUEUE] % QSIZE;
        self.post(TX_QUEUE, first, &[(BUF, b.len() as u32, 0)], true);
    }

    fn device_features(&mut self) -> u64 {
        self.w(0x00, 0, 4);
        let lo = self.r(0x04, 4);
        self.w(0x00, 1, 4);
        lo | self.r(0x04, 4) << 32
    }
}

#[test]
fn offloads_are_offered_only_on_a_tap_with_the_vnet_header() {
    let mut with = Rig::new();
    let f = with.device_features();
    for b in [CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, HOST_TSO4] {
        assert_ne!(f & u64::from(b), 0, "feature {b:#x} offered");
    }
    let mut without = Rig::with(BASIC, Tap::from_socket_without_vnet_hdr);
    assert_eq!(without.device_features() & OFFLOADS, 0);
    // A driver that asks for them anyway is refused at FEATURES_OK.
    without.w(0x14, 0, 1);
    without.w(0x14, 1 | 2, 1);
    without.w(0x08, 0, 4);
    without.w(0x0c, u64::from(BASIC | CSUM), 4);
    without.w(0x08, 1, 4);
    without.w(0x0c, 1, 4);
    without.w(0x14, 1 | 2 | 8, 1);
    assert_eq!(without.r(0x14, 1) & 8, 0, "features accepted");
}

#[test]
fn with_csum_the_guest_header_reaches_the_tap_unchanged() {
    let mut rig = Rig::with(BASIC | CSUM | HOST_TSO4, Tap::from_socket);
    let f = frame(100);
    // A partial checksum to complete from byte 34, stored at 34 + 6 (UDP).
    let h = hdr(NEEDS_CSUM, 0, 0, 34, 6);
    rig.send(&h, &f);
    let got = rig.host_recv().expect("frame on the TAP");
    assert_eq!(&got[..10], &h[..10], "the header is the guest's");
    assert_eq!(&got[10..12], &[0, 0], "num_buffers is not sent");
    assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
    // A negotiated GSO type goes through as well.
    let h = hdr(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16);
    rig.send(&h, &f);
    assert_eq!(&rig.host_recv().expect("GSO frame")[..10], &h[..10]);
    assert_eq!(lock(&rig.net).counters().tx_frames, 2);
}

#[test]
fn tx_headers_asking_for_what_was_not_negotiated_are_cleared_or_dropped() {
    // CSUM without HOST_TSO: a TSO frame is dropped, unknown flag bits cleared.
    let mut rig = Rig::with(BASIC | CSUM, Tap::from_socket);
    let f = frame(100);
    rig.send(&hdr(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16), &f);
    assert!(rig.host_recv().is_none(), "TSO frame without HOST_TSO4");
    rig.send(&hdr(0x80 | NEEDS_CSUM, 0, 0, 34, 6), &f);
    assert_eq!(rig.host_recv().expect("frame")[0], NEEDS_CSUM);
    // UDP fragmentation offload (gso_type 3) is never offered.
    rig.send(&hdr(NEEDS_CSUM, 3, 1000, 34, 6), &f);
    assert!(rig.host_recv().is_none(), "UFO frame");
    let c = lock(&rig.net).counters();
    assert_eq!((c.tx_frames, c.tx_dropped), (1, 2));
    // Without CSUM the header is zero whatever the guest wrote (the old behaviour).
    let mut rig = Rig::new();
    rig.send(&hdr(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16), &f);
    assert_eq!(
        &rig.host_recv().expect("frame")[..VNET_HDR_LEN],
        &[0; VNET_HDR_LEN]
    );
}

#[test]
fn the_tap_gets_exactly_the_offloads_the_guest_accepted_until_a_reset() {
    use super::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
    let mut rig = Rig::with(
        BASIC | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6,
        Tap::from_socket,
    );
    assert_eq!(
        lock(&rig.net).tap().offload(),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    );
    rig.w(0x14, 0, 1); // reset
    assert_eq!(lock(&rig.net).tap().offload(), 0);
    assert_eq!(lock(&rig.net).acked_features(), 0);
    // Host-side offloads only (CSUM, HOST_TSO4): nothing to turn on for RX.
    let rig = Rig::with(BASIC | CSUM | HOST_TSO4, Tap::from_socket);
    assert_eq!(lock(&rig.net).tap().offload(), 0);
    // TSO without the checksum offload it depends on: nothing either.
    assert_eq!(super::net::tun_offload(u64::from(GUEST_TSO4)), 0);
}

#[test]
fn rx_header_flags_reach_the_guest_only_with_guest_csum() {
    let mut f = hdr(DATA_VALID, 0, 0, 0, 0);
    f.extend_from_slice(&frame(60));
    for (features, flags) in [(BASIC, 0), (BASIC | GUEST_CSUM, DATA_VALID)] {
        let mut rig = Rig::with(features, Tap::from_socket);
        rig.host.send(&f).unwrap();
        assert_eq!(rig.post(RX_QUEUE, 0, &[(BUF, 2048, WRITE)], true), 1);
        let mut got = [0u8; VNET_HDR_LEN];
        rig.mem().read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got[0], flags, "features {features:#x}");
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    }
    // A GSO frame the driver did not ask for is dropped; the buffer stays for the next.
    let mut rig = Rig::with(BASIC | GUEST_CSUM, Tap::from_socket);
    let mut gso = hdr(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16);
    gso.extend_from_slice(&frame(3000));
    rig.host.send(&gso).unwrap();
    assert_eq!(rig.post(RX_QUEUE, 0, &[(BUF, 4096, WRITE)], true), 0);
    assert_eq!(lock(&rig.net).counters().rx_dropped, 1);
}

#[test]
fn a_gso_frame_too_big_for_the_guest_buffers_is_dropped_and_the_queue_kept() {
    let mut rig = Rig::with(BASIC | GUEST_CSUM | GUEST_TSO4, Tap::from_socket);
    let mut gso = hdr(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16);
    gso.extend_from_slice(&frame(60000));
    rig.host.send(&gso).unwrap();
    let mut small = vec![0u8; VNET_HDR_LEN];
    small.extend_from_slice(&frame(60));
    rig.host.send(&small).unwrap();
    // A 2 KiB buffer cannot take the super-frame: dropped, the next frame gets the buffer.
    assert_eq!(rig.post(RX_QUEUE, 0, &[(BUF, 2048, WRITE)], true), 1);
    assert_eq!(rig.used_len(RX_QUEUE, 0) as usize, small.len());
    let c = lock(&rig.net).counters();
    assert_eq!((c.rx_frames, c.rx_dropped, c.rx_too_big), (1, 1, 1));
    // A chain as big as Linux's "big packets" buffers takes it whole.
    rig.host.send(&gso).unwrap();
    let descs: Vec<(u64, u32, u16)> = (0..u64::from(QSIZE))
        .map(|i| (BUF + 0x2000 * i, 0x2000, WRITE))
        .collect();
    assert_eq!(rig.post(RX_QUEUE, 0, &descs, true), 2);
    assert_eq!(rig.used_len(RX_QUEUE, 1) as usize, gso.len());
}

#[test]
fn negotiated_offloads_are_applied_again_on_restore() {
    use super::tap::{TUN_F_CSUM, TUN_F_TSO4};
    let rig = Rig::with(BASIC | CSUM | GUEST_CSUM | GUEST_TSO4, Tap::from_socket);
    let saved = rig.dev.state();
    let offload = lock(&rig.net).offload_state(saved.driver_features);
    assert_eq!(offload.tun_offload, TUN_F_CSUM | TUN_F_TSO4);
    let restore = |tap: Tap| {
        let ram = GuestRam::new(4 << 20).unwrap();
        // As during a migration: the device's writes are recorded.
        ram.track_vmm_writes(true);
        let net = Arc::new(Mutex::new(Net::new(tap, MAC, true).unwrap()));
        let mut dev = VirtioPciDevice::new(
            16,
            net.clone(),
            ram.memory().clone(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        dev.restore(&saved).map(|_| net)
    };
    // A new TAP (copy migration) or the handed-over one: its offloads are off until the
    // restored device turns on what the guest had.
    let (_h, g) = UnixDatagram::pair().unwrap();
    let net = restore(Tap::from_socket(g)).expect("restore");
    assert_eq!(lock(&net).offload_state(saved.driver_features), offload);
    // A TAP without the vnet header cannot carry them: the restore is refused.
    let (_h, g) = UnixDatagram::pair().unwrap();
    let err = restore(Tap::from_socket_without_vnet_hdr(g)).unwrap_err();
    assert!(err.to_string().contains("IFF_VNET_HDR"), "{err}");
}

#[test]
fn tx_frames_are_the_same_through_writev_and_the_bounce_buffer() {
    let mut rig = Rig::new();
    let f = frame(200);
    let mut whole = vec![0u8; VNET_HDR_LEN];
    whole.extend_from_slice(&f);
    rig.mem().write_slice(&whole, GuestAddress(BUF)).unwrap();
    let h = VNET_HDR_LEN as u64;
    // Header and frame in one descriptor (writev from guest memory).
    rig.post(TX_QUEUE, 0, &[(BUF, whole.len() as u32, 0)], true);
    // The header split over two descriptors (bounce buffer).
    rig.post(
        TX_QUEUE,
        1,
        &[(BUF, 6, 0), (BUF + 6, 6, 0), (BUF + h, 200, 0)],
        true,
    );
    assert_eq!(rig.used_idx(TX_QUEUE), 2);
    for _ in 0..2 {
        let got = rig.host_recv().expect("frame on the TAP");
        assert_eq!(&got[VNET_HDR_LEN..], &f[..], "the frame, unchanged");
        assert_eq!(&got[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
    }
}

/// `avail_event` of the TX queue (EVENT_IDX), after the used ring's entries.
fn tx_avail_event(rig: &Rig) -> u16 {
    let at = USED + TX_QUEUE as u64 * 0x10000 + 4 + 8 * u64::from(QSIZE);
    rig.mem().read_obj(GuestAddress(at)).unwrap()
}

#[test]
fn polling_keeps_tx_notifications_off_until_processed_again() {
    let event_idx = 1u32 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    let mut rig = Rig::with(BASIC | event_idx, Tap::from_socket);
    let f = frame(60);
    let mut whole = vec![0u8; VNET_HDR_LEN];
    whole.extend_from_slice(&f);
    rig.mem().write_slice(&whole, GuestAddress(BUF)).unwrap();
    rig.dev.process(TX_QUEUE);
    assert_eq!(tx_avail_event(&rig), 0, "armed: notify at the next index");
    rig.dev.suppress_notifications(TX_QUEUE);
    assert_eq!(tx_avail_event(&rig), u16::MAX, "one behind: never crossed");
    // Posted without a notification: the polling worker finds it.
    rig.post(TX_QUEUE, 0, &[(BUF, whole.len() as u32, 0)], false);
    assert!(rig.dev.poll(TX_QUEUE));
    assert_eq!(rig.used_idx(TX_QUEUE), 1);
    assert_eq!(&rig.host_recv().expect("frame")[VNET_HDR_LEN..], &f[..]);
    assert_eq!(tx_avail_event(&rig), 0, "still off");
    assert!(!rig.dev.poll(TX_QUEUE), "nothing new");
    // The end of the window: armed again.
    assert!(!rig.dev.process(TX_QUEUE));
    assert_eq!(tx_avail_event(&rig), 1);
    // Paused: polling takes nothing.
    rig.dev.set_paused(true);
    rig.post(TX_QUEUE, 1, &[(BUF, whole.len() as u32, 0)], false);
    assert!(!rig.dev.poll(TX_QUEUE));
    assert_eq!(rig.used_idx(TX_QUEUE), 1);
    rig.dev.set_paused(false);
    assert!(rig.dev.process(TX_QUEUE));
    assert_eq!(rig.used_idx(TX_QUEUE), 2);
}

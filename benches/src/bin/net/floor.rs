//! The kernel's floor for the guest → host flood: this process writes the same frames
//! into a TAP on the same bridge, one write per frame (a 12-byte `virtio_net_hdr_v1`
//! asking for the checksum, and an Ethernet/IPv4/UDP frame with a 1400-byte payload, as
//! the guest's), as fast as one thread can,
//! with no VM, no virtqueue and no notification. A VMM whose sending thread writes a TAP
//! frame by frame (ours, QEMU's userspace virtio-net) pays at least this per frame: its
//! throughput over this one is the share of the per-frame cost that is the kernel's, and
//! the floor over QEMU's is the most any such VMM could lead QEMU by on this host.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use integration_tests::netns::inet_checksum;
use vmm::devices::virtio::tap::{Tap, VNET_HDR_LEN};

use super::{drain, epoch_ns, host_socket, FloodRate, FLOOD_COUNT, FLOOD_SIZE, GUEST_IP};

/// The bridge's MAC, set when the namespace is made, so that frames can be addressed to
/// the host side without asking.
pub const BRIDGE_MAC: &str = "02:00:00:99:09:01";
/// The TAP the floor writes into (no VM behind it).
pub const FLOOR_TAP: &str = "tapk";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 9, 1);
const SRC_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x09];

/// Opens [`FLOOR_TAP`] with a vnet header, as the VMMs open theirs; call on a thread in
/// the namespace. The descriptor stays open across runs (an open TAP is what makes its
/// bridge port forward).
pub fn open_tap() -> Tap {
    let mut tap = Tap::open_named(FLOOR_TAP)
        .unwrap_or_else(|e| super::fail(&format!("cannot open {FLOOR_TAP}: {e}")));
    if !tap.has_vnet_hdr() {
        super::fail(&format!("{FLOOR_TAP} has no vnet header"));
    }
    // As a VMM whose driver took the checksum offload: the kernel completes checksums.
    let _ = tap.set_offload(libc::TUN_F_CSUM);
    tap
}

fn bridge_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(BRIDGE_MAC.split(':')) {
        *b = u8::from_str_radix(p, 16).unwrap_or(0);
    }
    m
}

/// An Ethernet/IPv4/UDP frame from the guest's address and echo port to `dst_port` on
/// the host side, with a [`FLOOD_SIZE`]-byte payload whose UDP checksum the kernel
/// completes (the pseudo-header sum in the field; [`vnet_header`] asks for the rest), as
/// the guest's datagrams with `csum=1` do.
fn frame(dst_port: u16) -> Vec<u8> {
    let udp_len = 8 + FLOOD_SIZE as usize;
    let mut f = Vec::with_capacity(14 + 20 + udp_len);
    f.extend_from_slice(&bridge_mac());
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&GUEST_IP.octets());
    ip[16..20].copy_from_slice(&HOST_IP.octets());
    let c = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&7u16.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    // Pseudo-header: addresses, protocol, UDP length; folded, not inverted.
    let mut s: u32 = GUEST_IP
        .octets()
        .chunks(2)
        .chain(HOST_IP.octets().chunks(2))
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>()
        + 17
        + udp_len as u32;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    f.extend_from_slice(&(s as u16).to_be_bytes());
    f.resize(14 + 20 + udp_len, b'f');
    f
}

/// `virtio_net_hdr_v1` asking the kernel to complete the UDP checksum
/// (`VIRTIO_NET_HDR_F_NEEDS_CSUM`, start after the Ethernet and IPv4 headers, offset 6).
fn vnet_header() -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = 1;
    h[6..8].copy_from_slice(&34u16.to_le_bytes());
    h[8..10].copy_from_slice(&6u16.to_le_bytes());
    h
}

/// One floor run, on a thread in the namespace: [`FLOOD_COUNT`] frames into `tap`, the
/// throughput measured as for the VMMs (payload received over the last datagram's kernel
/// timestamp minus the start).
pub fn measure_in_ns(tap: &mut Tap) -> FloodRate {
    let sock = host_socket();
    let fd = sock.as_raw_fd();
    let port = sock.local_addr().map_or(0, |a| a.port());
    let mut buf = vnet_header().to_vec();
    buf.extend_from_slice(&frame(port));
    let t0 = epoch_ns();
    for _ in 0..FLOOD_COUNT {
        if let Err(e) = tap.write_frame(&buf) {
            super::fail(&format!("writing into {FLOOR_TAP}: {e}"));
        }
    }
    let mut got = Vec::with_capacity(FLOOD_COUNT as usize);
    while drain(fd, &mut got) > 0 {}
    FloodRate::of(&got, t0)
}

//! virtio-pci + virtio-blk driven the way a guest driver does: through BAR0 writes, with
//! descriptors and rings written into guest memory.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::block::Block;
use super::pci::{ConfigHandle, VirtioPciDevice};
use super::{bar0_address, VirtioDevice};
use crate::config::DiskConfig;
use crate::devices::pci::PciDevice;
use crate::devices::BusDevice;
use crate::vstate::memory::GuestRam;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const QSIZE: u16 = 16;
const DISK_BYTES: u64 = 64 << 10;
const WRITE: u16 = 2;
const NEXT: u16 = 1;

struct Rig {
    ram: GuestRam,
    dev: VirtioPciDevice,
    path: String,
    irq: EventFd,
    avail_idx: u16,
}

fn disk_file(name: &str, size: u64) -> String {
    let p = std::env::temp_dir().join(format!("vmm-virtio-{name}-{}", std::process::id()));
    let content: Vec<u8> = (0..size).map(|i| (i / 512) as u8).collect();
    std::fs::write(&p, content).unwrap();
    p.display().to_string()
}

impl Rig {
    fn new(name: &str, readonly: bool) -> Rig {
        let path = disk_file(name, DISK_BYTES);
        let ram = GuestRam::new(2 << 20).unwrap();
        // As during a migration: the device's writes are recorded.
        ram.track_vmm_writes(true);
        let block = Block::open(&DiskConfig {
            path: path.clone(),
            readonly,
            shared: false,
        })
        .unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = VirtioPciDevice::new(
            4,
            Arc::new(Mutex::new(block)),
            ram.memory().clone(),
            irq.try_clone().unwrap(),
        );
        let mut rig = Rig {
            ram,
            dev,
            path,
            irq,
            avail_idx: 0,
        };
        rig.init(1 << 32);
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

    /// The driver initialisation sequence; returns the final status.
    fn init(&mut self, features: u64) -> u64 {
        self.w(0x14, 0, 1);
        self.w(0x14, 1 | 2, 1);
        self.w(0x08, 0, 4);
        self.w(0x0c, features & 0xffff_ffff, 4);
        self.w(0x08, 1, 4);
        self.w(0x0c, features >> 32, 4);
        self.w(0x14, 1 | 2 | 8, 1);
        if self.r(0x14, 1) & 8 == 0 {
            return self.r(0x14, 1);
        }
        self.w(0x16, 0, 2);
        self.w(0x18, u64::from(QSIZE), 2);
        self.w(0x20, DESC, 4);
        self.w(0x24, 0, 4);
        self.w(0x28, AVAIL, 8);
        self.w(0x30, USED, 4);
        self.w(0x1c, 1, 2);
        self.w(0x14, 1 | 2 | 8 | 4, 1);
        self.avail_idx = 0;
        self.r(0x14, 1)
    }

    fn mem(&self) -> &crate::vstate::memory::GuestMemoryMmap {
        self.ram.memory()
    }

    /// Post a chain of (addr, len, flags) starting at descriptor 0 and notify; returns
    /// (used len, status byte at STATUS).
    fn submit(&mut self, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let mut flags = *flags;
            if i + 1 < descs.len() {
                flags |= NEXT;
            }
            let d = DESC + 16 * i as u64;
            let m = self.mem();
            m.write_obj(*addr, GuestAddress(d)).unwrap();
            m.write_obj(*len, GuestAddress(d + 8)).unwrap();
            m.write_obj(flags, GuestAddress(d + 12)).unwrap();
            m.write_obj((i + 1) as u16, GuestAddress(d + 14)).unwrap();
        }
        self.mem().write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem().write_obj(0u16, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem()
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.w(0x3000, 0, 2);
        let used_idx: u16 = self.mem().read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, self.avail_idx, "request was not completed");
        let e = USED + 4 + 8 * u64::from((used_idx.wrapping_sub(1)) % QSIZE);
        let len: u32 = self.mem().read_obj(GuestAddress(e + 4)).unwrap();
        (len, self.mem().read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn header(&self, ty: u32, sector: u64) {
        self.mem().write_obj(ty, GuestAddress(HDR)).unwrap();
        self.mem().write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem().write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    fn request(&mut self, ty: u32, sector: u64, data_len: u32, data_flags: u16) -> (u32, u8) {
        self.header(ty, sector);
        let mut d = vec![(HDR, 16, 0)];
        if data_len > 0 {
            d.push((DATA, data_len, data_flags));
        }
        d.push((STATUS, 1, WRITE));
        self.submit(&d)
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn config_space_describes_a_modern_virtio_blk() {
    let rig = Rig::new("cfg", false);
    let block = Block::open(&DiskConfig {
        path: rig.path.clone(),
        readonly: false,
        shared: false,
    })
    .unwrap();
    let dev = VirtioPciDevice::new(
        4,
        Arc::new(Mutex::new(block)),
        rig.ram.memory().clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    let mut h = ConfigHandle(Arc::new(Mutex::new(dev)));
    let mut d = [0u8; 4];
    h.config_read(0, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
    h.config_read(0x34, &mut d);
    let mut cap = usize::from(d[0]);
    let mut types = Vec::new();
    while cap != 0 {
        let mut c = [0u8; 4];
        h.config_read(cap as u16, &mut c);
        assert_eq!(c[0], 0x09);
        types.push(c[3]);
        cap = usize::from(c[1]);
    }
    assert_eq!(types, vec![1, 3, 4, 2]);
    // BAR sizing.
    h.config_write(0x10, &[0xff; 4]);
    h.config_read(0x10, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0xffff_8000, "a 32 KiB BAR0");
    h.config_write(0x10, &(bar0_address(4) as u32).to_le_bytes());
    h.config_read(0x10, &mut d);
    assert_eq!(u64::from(u32::from_le_bytes(d)), bar0_address(4));
    // Interrupt line = GSI, pin A.
    h.config_read(0x3c, &mut d);
    assert_eq!((d[0], d[1]), (20, 1));
}

#[test]
fn features_without_version_1_are_refused() {
    let mut rig = Rig::new("feat", false);
    let status = rig.init(1 << 9);
    assert_eq!(status & 8, 0);
    // The device offers VERSION_1, FLUSH and INDIRECT_DESC, not RO.
    rig.w(0x00, 0, 4);
    let lo = rig.r(0x04, 4);
    rig.w(0x00, 1, 4);
    let hi = rig.r(0x04, 4);
    assert_eq!(hi & 1, 1);
    assert_eq!(lo & (1 << 9), 1 << 9);
    assert_eq!(lo & (1 << 5), 0);
    assert_eq!(rig.init(1 << 32) & 0x4f, 0x0f);
}

#[test]
fn read_write_flush_get_id() {
    let mut rig = Rig::new("rw", false);
    // Read sectors 2..4 into DATA.
    let (len, st) = rig.request(0, 2, 1024, WRITE);
    assert_eq!((len, st), (1025, 0));
    let mut got = [0u8; 1024];
    rig.mem().read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..512].iter().all(|b| *b == 2) && got[512..].iter().all(|b| *b == 3));
    // The device's write into guest memory is in the VMM-side dirty bitmap.
    let dirty = rig.ram.take_vmm_dirty(0);
    assert_ne!(
        dirty[(DATA / 4096 / 64) as usize] & (1 << ((DATA / 4096) % 64)),
        0
    );
    // Write sector 5.
    rig.mem()
        .write_slice(&[0xab; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(rig.request(1, 5, 512, 0), (1, 0));
    assert!(rig.file()[5 * 512..6 * 512].iter().all(|b| *b == 0xab));
    assert_eq!(rig.request(4, 0, 0, 0), (1, 0));
    let (len, st) = rig.request(8, 0, 20, WRITE);
    assert_eq!(st, 0);
    let mut id = vec![0u8; len as usize - 1];
    rig.mem().read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert!(String::from_utf8_lossy(&id).starts_with("vmm-virtio-rw"));
    // Unknown request types.
    assert_eq!(rig.request(11, 0, 0, 0).1, 2);
    // An interrupt was raised.
    assert!(rig.irq.read().unwrap() > 0);
    assert_eq!(rig.r(0x1000, 1), 1);
    assert_eq!(rig.r(0x1000, 1), 0);
}

/// The data path moves bytes straight between the file and the descriptors' buffers
/// (`preadv`/`pwritev` over guest memory): a chain whose header is split in two and whose
/// data is scattered over buffers of uneven sizes (not sector multiples on their own) must
/// land at the right offsets, both ways, and a read marks every page it wrote dirty.
#[test]
fn scattered_chains_move_the_right_bytes() {
    let mut rig = Rig::new("sg", false);
    let pattern: Vec<u8> = (0..1536u32).map(|i| (i % 251) as u8 + 1).collect();
    rig.mem()
        .write_slice(&pattern[..512], GuestAddress(DATA))
        .unwrap();
    rig.mem()
        .write_slice(&pattern[512..1512], GuestAddress(DATA + 0x1000))
        .unwrap();
    rig.mem()
        .write_slice(&pattern[1512..], GuestAddress(DATA + 0x3000))
        .unwrap();
    rig.header(1, 3);
    let chain = [
        (HDR, 8, 0),
        (HDR + 8, 8, 0),
        (DATA, 512, 0),
        (DATA + 0x1000, 1000, 0),
        (DATA + 0x3000, 24, 0),
        (STATUS, 1, WRITE),
    ];
    assert_eq!(rig.submit(&chain), (1, 0));
    let file = rig.file();
    assert_eq!(&file[3 * 512..3 * 512 + 1536], &pattern[..]);
    assert!(file[2 * 512..3 * 512].iter().all(|b| *b == 2));
    assert!(file[6 * 512..7 * 512].iter().all(|b| *b == 6));
    // Read the same range back, split differently, into pages on either side of a page
    // boundary; the status byte shares the last data descriptor's page.
    let _ = rig.ram.take_vmm_dirty(0);
    rig.header(0, 3);
    let chain = [
        (HDR, 16, 0),
        (DATA + 0x8000 - 100, 100, WRITE),
        (DATA + 0x8000, 1400, WRITE),
        (DATA + 0xc000, 36, WRITE),
        (STATUS, 1, WRITE),
    ];
    assert_eq!(rig.submit(&chain), (1537, 0));
    let mut got = vec![0u8; 1536];
    rig.mem()
        .read_slice(&mut got[..100], GuestAddress(DATA + 0x8000 - 100))
        .unwrap();
    rig.mem()
        .read_slice(&mut got[100..1500], GuestAddress(DATA + 0x8000))
        .unwrap();
    rig.mem()
        .read_slice(&mut got[1500..], GuestAddress(DATA + 0xc000))
        .unwrap();
    assert_eq!(got, pattern);
    let dirty = rig.ram.take_vmm_dirty(0);
    for addr in [DATA + 0x8000 - 100, DATA + 0x8000, DATA + 0xc000] {
        let page = addr / 4096;
        assert_ne!(
            dirty[(page / 64) as usize] & (1 << (page % 64)),
            0,
            "page {page:#x} not dirty"
        );
    }
}

#[test]
fn bad_requests_get_ioerr_and_never_touch_the_file_outside() {
    let mut rig = Rig::new("bad", false);
    let before = rig.file();
    let last = DISK_BYTES / 512;
    // Past the end, straddling the end, huge sector (overflow), odd length.
    assert_eq!(rig.request(1, last, 512, 0).1, 1);
    assert_eq!(rig.request(1, last - 1, 1024, 0).1, 1);
    assert_eq!(rig.request(1, u64::MAX / 256, 512, 0).1, 1);
    assert_eq!(rig.request(1, 0, 100, 0).1, 1);
    assert_eq!(rig.request(0, last, 512, WRITE).1, 1);
    assert_eq!(rig.request(0, 0, 100, WRITE).1, 1);
    // Data outside guest RAM.
    rig.header(1, 0);
    assert_eq!(
        rig.submit(&[(HDR, 16, 0), (0xdead_0000, 512, 0), (STATUS, 1, WRITE)])
            .1,
        1
    );
    // A short header.
    assert_eq!(rig.submit(&[(HDR, 8, 0), (STATUS, 1, WRITE)]).1, 1);
    // No writable byte: returned with length 0, nothing else happens.
    rig.header(1, 0);
    assert_eq!(rig.submit(&[(HDR, 16, 0), (DATA, 512, 0)]), (0, 0xff));
    // Status outside RAM.
    assert_eq!(rig.submit(&[(HDR, 16, 0), (0xffff_0000, 1, WRITE)]).0, 0);
    assert_eq!(rig.file(), before);
    assert_eq!(rig.file().len() as u64, DISK_BYTES);
    // The device still works.
    assert_eq!(rig.request(0, 1, 512, WRITE), (513, 0));
}

#[test]
fn descriptor_loops_and_bogus_rings_do_not_hang() {
    let mut rig = Rig::new("loop", false);
    // Descriptor 0 -> 0 -> ... (next = itself).
    let m = rig.mem();
    m.write_obj(HDR, GuestAddress(DESC)).unwrap();
    m.write_obj(16u32, GuestAddress(DESC + 8)).unwrap();
    m.write_obj(NEXT, GuestAddress(DESC + 12)).unwrap();
    m.write_obj(0u16, GuestAddress(DESC + 14)).unwrap();
    m.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    rig.w(0x3000, 0, 2);
    // An avail index far ahead of the device's: refused, no work done.
    rig.mem()
        .write_obj(1000u16, GuestAddress(AVAIL + 2))
        .unwrap();
    rig.w(0x3000, 0, 2);
    // Notify of a queue that does not exist, odd offsets.
    rig.w(0x3004, 1, 2);
    rig.w(0x3001, 0, 1);
    rig.w(0x3ffc, 0, 4);
}

#[test]
fn readonly_disk_refuses_writes() {
    let mut rig = Rig::new("ro", true);
    rig.w(0x00, 0, 4);
    assert_eq!(rig.r(0x04, 4) & (1 << 5), 1 << 5);
    let before = rig.file();
    rig.mem()
        .write_slice(&[0xcd; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(rig.request(1, 0, 512, 0).1, 1);
    assert_eq!(rig.request(0, 0, 512, WRITE).1, 0);
    assert_eq!(rig.request(4, 0, 0, 0).1, 0);
    assert_eq!(rig.file(), before);
}

#[test]
fn state_roundtrip_continues_the_queue() {
    let mut rig = Rig::new("state", false);
    assert_eq!(rig.request(0, 1, 512, WRITE).1, 0);
    let state = rig.dev.state();
    assert_eq!(state.queues[0].next_avail, 1);
    assert_eq!(state.queues[0].next_used, 1);
    let bytes = bincode::serialize(&state).unwrap();
    let back: super::VirtioPciState = bincode::deserialize(&bytes).unwrap();
    let block = Block::open(&DiskConfig {
        path: rig.path.clone(),
        readonly: false,
        shared: false,
    })
    .unwrap();
    assert_eq!(block.backend_size(), DISK_BYTES);
    let mut dev = VirtioPciDevice::new(
        4,
        Arc::new(Mutex::new(block)),
        rig.ram.memory().clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    dev.restore(&back).unwrap();
    assert_eq!(dev.state(), state);
    rig.dev = dev;
    assert_eq!(rig.request(0, 3, 512, WRITE), (513, 0));
    // A state from another slot or another disk size is refused.
    let mut other = state.clone();
    other.slot = 5;
    assert!(rig.dev.restore(&other).is_err());
    let mut other = state;
    other.backend_size += 512;
    assert!(rig
        .dev
        .restore(&other)
        .unwrap_err()
        .to_string()
        .contains("bytes"));
}

#[test]
fn msix_vector_is_pending_while_masked_and_fires_on_unmask() {
    let kvm = crate::vstate::vm::KvmVm::new().expect("/dev/kvm");
    let mut rig = Rig::new("msix", false);
    let block = Block::open(&DiskConfig {
        path: rig.path.clone(),
        readonly: false,
        shared: false,
    })
    .unwrap();
    let msix = super::msix::Msix::new(2, kvm.fd(), kvm.router()).unwrap();
    rig.dev = VirtioPciDevice::new(
        4,
        Arc::new(Mutex::new(block)),
        rig.ram.memory().clone(),
        rig.irq.try_clone().unwrap(),
    )
    .with_msix(msix);
    assert_eq!(rig.init(1 << 32) & 4, 4, "driver ready");
    assert!(
        !rig.dev.msix_in_use(),
        "an INTx driver's state needs no MSI-X section"
    );
    // The capability list: the four virtio capabilities, then MSI-X (2 vectors, table
    // and PBA in BAR0); the notify capability keeps its multiplier.
    let cfg = |dev: &VirtioPciDevice, off: u16| {
        let mut d = [0u8; 4];
        dev.read_config_space(off, &mut d);
        u32::from_le_bytes(d)
    };
    assert_eq!(cfg(&rig.dev, 0x80), 4, "notify_off_multiplier");
    assert_eq!(
        cfg(&rig.dev, 0x70) >> 8 & 0xff,
        0x84,
        "notify cap links to MSI-X"
    );
    assert_eq!(cfg(&rig.dev, 0x84) & 0xff, 0x11);
    assert_eq!(cfg(&rig.dev, 0x84) >> 16, 1, "table size - 1");
    assert_eq!(cfg(&rig.dev, 0x88), 0x4000);
    assert_eq!(cfg(&rig.dev, 0x8c), 0x5000);
    // Queue 0 on vector 0; a vector the device does not have reads back as "none".
    rig.w(0x16, 0, 2);
    rig.w(0x1a, 5, 2);
    assert_eq!(rig.r(0x1a, 2), 0xffff);
    rig.w(0x1a, 0, 2);
    assert_eq!(rig.r(0x1a, 2), 0);
    // Entry 0: an x86 MSI to APIC 0, vector 0x41, unmasked.
    rig.w(0x4000, 0xfee0_0000, 4);
    rig.w(0x4004, 0, 4);
    rig.w(0x4008, 0x41, 4);
    rig.w(0x400c, 0, 4);
    assert_eq!(rig.r(0x4000, 4), 0xfee0_0000);
    // MSI-X on, function masked: a completion only sets the pending bit.
    rig.dev.write_config_space(0x86, &0xc000u16.to_le_bytes());
    assert_eq!(rig.request(0, 1, 512, WRITE).1, 0);
    assert_eq!(rig.r(0x5000, 8), 1, "pending while masked");
    assert_eq!(rig.r(0x1000, 1), 0, "no INTx with MSI-X on");
    assert!(rig.irq.read().is_err(), "INTx not pulsed");
    // Unmasking delivers it and clears the pending bit.
    rig.dev.write_config_space(0x86, &0x8000u16.to_le_bytes());
    assert_eq!(rig.r(0x5000, 8), 0);
    // The table, pending bits and vectors travel with the state.
    assert!(rig.dev.msix_in_use());
    let saved = rig.dev.msix_state();
    assert_eq!(saved.queue_vectors, vec![0]);
    let table = &saved.msix.as_ref().unwrap().table;
    assert_eq!(
        (table[0].address, table[0].data, table[0].control),
        (0xfee0_0000, 0x41, 0)
    );
}

//! PCI segment 0, bus 0: the q35 host bridge and the two ways to reach
//! configuration space.
//!
//! * Configuration mechanism #1 ([`PciConfigIo`]): a dword written to
//!   `0xcf8` latches bus/device/function/register; `0xcfc..0xcff` then access
//!   that dword of configuration space with byte, word or dword accesses.
//!   The same decode holds the reset control register at `0xcf9` (byte
//!   accesses), as on Intel chipsets.
//! * ECAM ([`PciConfigMmio`]): the MMIO window at
//!   [`crate::layout::PCIE_ECAM_START`], where
//!   `offset = bus << 20 | device << 15 | function << 12 | register`.
//!
//! Both are views of one [`PciBus`], which owns the functions. Today that is
//! only the host bridge at 00:00.0; the bus has a slot table keyed by device
//! number so that a virtio-pci device (implementing [`PciDevice`]) can be
//! added later without touching the access paths. Every absent function
//! reads as all ones, which is how a guest enumerating the bus learns that
//! nothing is there.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::bus::lock;
use super::i8042::ResetControl;
use super::{BusDevice, VmEvent};

/// Size of a function's configuration space through ECAM.
pub const PCI_CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the conventional (type 0 header + device-specific) configuration space.
pub const PCI_CONFIG_SPACE_LEGACY_SIZE: usize = 256;
/// Device numbers on a bus.
pub const PCI_DEVICES_PER_BUS: u8 = 32;
/// Ports decoded at [`crate::layout::PCI_CONFIG_ADDRESS`]: `0xcf8..0xd00`.
pub const PCI_CONFIG_IO_PORT_COUNT: u64 = 8;

/// Intel's vendor id.
pub const PCI_VENDOR_ID_INTEL: u16 = 0x8086;
/// The Q35 (82G33/G31/P35/P31) DRAM controller, i.e. QEMU's q35 MCH.
pub const PCI_DEVICE_ID_INTEL_Q35_MCH: u16 = 0x29c0;
/// Class code: bridge.
pub const PCI_CLASS_BRIDGE: u8 = 0x06;
/// Subclass: host bridge.
pub const PCI_SUBCLASS_HOST: u8 = 0x00;
/// Red Hat / virtio subsystem vendor id, as QEMU reports for its MCH.
const PCI_SUBSYSTEM_VENDOR_ID_QEMU: u16 = 0x1af4;
/// QEMU's subsystem id.
const PCI_SUBSYSTEM_ID_QEMU: u16 = 0x1100;
/// Offset of the MCH's PCIEXBAR register (ECAM base and enable).
const MCH_PCIEXBAR: usize = 0x60;

/// Errors of the PCI bus.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// A saved host-bridge config space of the wrong size.
    #[error("saved PCI host bridge config space is {0} bytes, expected 256")]
    BadConfigLength(usize),
    /// Device number out of range or reserved for the host bridge.
    #[error("PCI device number {0} is not available (1..=31)")]
    BadDeviceNumber(u8),
    /// The slot already holds a device.
    #[error("PCI slot {0} is already occupied")]
    SlotOccupied(u8),
}

/// A function on bus 0, seen through its configuration space.
///
/// Offsets are byte offsets in the 4 KiB ECAM space of the function; an
/// access may have any length (1, 2, 4, and whatever else a guest produces)
/// and may run past the end, which the implementation must clip: reads past
/// the implemented space return zero, writes there are dropped.
pub trait PciDevice: Send {
    /// Read `data.len()` bytes of configuration space at `offset`.
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    /// Write configuration space at `offset`; read-only bits are preserved.
    fn config_write(&mut self, offset: u16, data: &[u8]);
}

/// 256 bytes of configuration space with a per-bit write mask: the common
/// storage of a conventional PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciConfigSpace {
    bytes: [u8; PCI_CONFIG_SPACE_LEGACY_SIZE],
    write_mask: [u8; PCI_CONFIG_SPACE_LEGACY_SIZE],
}

impl PciConfigSpace {
    /// An all-zero, read-only space.
    pub fn new() -> Self {
        PciConfigSpace {
            bytes: [0; PCI_CONFIG_SPACE_LEGACY_SIZE],
            write_mask: [0; PCI_CONFIG_SPACE_LEGACY_SIZE],
        }
    }

    /// Set the initial value of a little-endian field (setup, not guest access).
    pub(crate) fn set(&mut self, offset: usize, value: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..offset + value.len()) {
            dst.copy_from_slice(value);
        }
    }

    /// Make bits of a little-endian field guest-writable.
    pub(crate) fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = self.write_mask.get_mut(offset..offset + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// The raw bytes (for save).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Guest read: clipped, zeros past 256.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self
                .bytes
                .get(usize::from(offset) + i)
                .copied()
                .unwrap_or(0);
        }
    }

    /// Guest write through the write mask.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let idx = usize::from(offset) + i;
            if let (Some(cur), Some(mask)) =
                (self.bytes.get(idx).copied(), self.write_mask.get(idx))
            {
                self.bytes[idx] = (cur & !mask) | (b & mask);
            }
        }
    }
}

impl Default for PciConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

/// The q35 host bridge (MCH) at 00:00.0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciHostBridge {
    config: PciConfigSpace,
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHostBridge {
    /// The bridge as firmware would leave it: identity of QEMU's q35 MCH, and
    /// PCIEXBAR reporting the ECAM window of the MCFG table (read-only here;
    /// there is no firmware to move it).
    pub fn new() -> Self {
        let mut c = PciConfigSpace::new();
        c.set(0x00, &PCI_VENDOR_ID_INTEL.to_le_bytes());
        c.set(0x02, &PCI_DEVICE_ID_INTEL_Q35_MCH.to_le_bytes());
        // Command: memory space and bus master, as after firmware.
        c.set(0x04, &0x0006u16.to_le_bytes());
        // Revision 0, programming interface 0, subclass, class.
        c.set(0x08, &[0x00, 0x00, PCI_SUBCLASS_HOST, PCI_CLASS_BRIDGE]);
        // Header type 0, single function.
        c.set(0x0e, &[0x00]);
        c.set(0x2c, &PCI_SUBSYSTEM_VENDOR_ID_QEMU.to_le_bytes());
        c.set(0x2e, &PCI_SUBSYSTEM_ID_QEMU.to_le_bytes());
        // PCIEXBAR: base | length 256 MiB (bits 2:1 = 0) | enable.
        let pciexbar = crate::layout::PCIE_ECAM_START | 1;
        c.set(MCH_PCIEXBAR, &pciexbar.to_le_bytes());

        // Writable: command (I/O, memory, master, parity, SERR, INTx disable),
        // cache line size, latency timer, interrupt line.
        c.set_writable(0x04, &0x0547u16.to_le_bytes());
        c.set_writable(0x0c, &[0xff, 0xff]);
        c.set_writable(0x3c, &[0xff]);
        PciHostBridge { config: c }
    }

    /// Rebuild from saved configuration bytes (exactly 256).
    pub fn from_config(bytes: &[u8]) -> Result<Self, PciError> {
        let mut bridge = Self::new();
        if bytes.len() != PCI_CONFIG_SPACE_LEGACY_SIZE {
            return Err(PciError::BadConfigLength(bytes.len()));
        }
        bridge.config.bytes.copy_from_slice(bytes);
        Ok(bridge)
    }

    /// The configuration bytes.
    pub fn config_bytes(&self) -> &[u8] {
        self.config.bytes()
    }
}

impl PciDevice for PciHostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
    }
}

/// Bus 0 of segment 0: the host bridge at device 0 and a slot table for the rest.
pub struct PciBus {
    host_bridge: PciHostBridge,
    /// Device number (1..=31) -> function 0 of that device.
    slots: BTreeMap<u8, Box<dyn PciDevice>>,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("host_bridge", &self.host_bridge)
            .field("slots", &self.slots.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new(PciHostBridge::new())
    }
}

impl PciBus {
    /// A bus with only the host bridge.
    pub fn new(host_bridge: PciHostBridge) -> Self {
        PciBus {
            host_bridge,
            slots: BTreeMap::new(),
        }
    }

    /// The host bridge.
    pub fn host_bridge(&self) -> &PciHostBridge {
        &self.host_bridge
    }

    /// Plug a single-function device into slot `device` (1..=31).
    pub fn add_device(&mut self, device: u8, dev: Box<dyn PciDevice>) -> Result<(), PciError> {
        if device == 0 || device >= PCI_DEVICES_PER_BUS {
            return Err(PciError::BadDeviceNumber(device));
        }
        if self.slots.contains_key(&device) {
            return Err(PciError::SlotOccupied(device));
        }
        self.slots.insert(device, dev);
        Ok(())
    }

    fn function(&mut self, bus: u8, device: u8, function: u8) -> Option<&mut dyn PciDevice> {
        // Only bus 0 exists and every device is single-function.
        if bus != 0 || function != 0 {
            return None;
        }
        if device == 0 {
            return Some(&mut self.host_bridge);
        }
        self.slots
            .get_mut(&device)
            .map(|d| &mut **d as &mut dyn PciDevice)
    }

    /// Read configuration space; absent functions read all ones.
    pub fn config_read(&mut self, bus: u8, device: u8, function: u8, offset: u16, data: &mut [u8]) {
        match self.function(bus, device, function) {
            Some(f) => f.config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Write configuration space; writes to absent functions are dropped.
    pub fn config_write(&mut self, bus: u8, device: u8, function: u8, offset: u16, data: &[u8]) {
        if let Some(f) = self.function(bus, device, function) {
            f.config_write(offset, data);
        }
    }
}

/// CONFIG_ADDRESS bit 31: the data port accesses configuration space.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// CONFIG_ADDRESS bits that hold state: enable, bus, device, function, register
/// (dword-aligned). Bits 30:24 and 1:0 are reserved and read as zero.
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;
/// Offset of the reset control register in the `0xcf8` decode.
const RESET_CONTROL_OFFSET: u64 =
    (super::i8042::RESET_CONTROL_PORT - crate::layout::PCI_CONFIG_ADDRESS) as u64;
/// Offset of CONFIG_DATA in the `0xcf8` decode.
const CONFIG_DATA_OFFSET: u64 =
    (crate::layout::PCI_CONFIG_DATA - crate::layout::PCI_CONFIG_ADDRESS) as u64;

/// Configuration mechanism #1 at ports `0xcf8..0xd00`, plus RST_CNT at `0xcf9`.
#[derive(Debug)]
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    config_address: u32,
    reset_control: ResetControl,
}

impl PciConfigIo {
    /// The port device over `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciConfigIo {
            bus,
            config_address: 0,
            reset_control: ResetControl::new(),
        }
    }

    /// Rebuild with a latched CONFIG_ADDRESS and RST_CNT value.
    pub fn with_state(bus: Arc<Mutex<PciBus>>, config_address: u32, reset_control: u8) -> Self {
        PciConfigIo {
            bus,
            config_address: config_address & CONFIG_ADDRESS_MASK,
            reset_control: ResetControl::from_value(reset_control),
        }
    }

    /// The latched CONFIG_ADDRESS.
    pub fn config_address(&self) -> u32 {
        self.config_address
    }

    /// The reset control register.
    pub fn reset_control(&self) -> u8 {
        self.reset_control.value()
    }

    /// Bus, device, function and register of a data-port access at byte
    /// `data_offset` (0..=3) of CONFIG_DATA, or `None` when disabled.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, u16)> {
        let a = self.config_address;
        if a & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let bus = (a >> 16) as u8;
        let device = ((a >> 11) & 0x1f) as u8;
        let function = ((a >> 8) & 0x7) as u8;
        // data_offset < 4, so this stays below 0x103.
        let reg = (a & 0xfc) as u16 + data_offset as u16;
        Some((bus, device, function, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.config_address.to_le_bytes()),
            RESET_CONTROL_OFFSET if data.len() == 1 => data[0] = self.reset_control.value(),
            CONFIG_DATA_OFFSET..=7 => {
                let data_offset = offset - CONFIG_DATA_OFFSET;
                // Clip to the 4-byte data window.
                let n = data.len().min((4 - data_offset) as usize);
                let (inside, outside) = data.split_at_mut(n);
                outside.fill(0xff);
                match self.target(data_offset) {
                    Some((b, d, f, r)) => lock(&self.bus).config_read(b, d, f, r, inside),
                    None => inside.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmEvent {
        match offset {
            0 if data.len() == 4 => {
                let mut v = [0u8; 4];
                v.copy_from_slice(data);
                self.config_address = u32::from_le_bytes(v) & CONFIG_ADDRESS_MASK;
            }
            RESET_CONTROL_OFFSET if data.len() == 1 => {
                return self.reset_control.write_byte(data[0])
            }
            CONFIG_DATA_OFFSET..=7 => {
                let data_offset = offset - CONFIG_DATA_OFFSET;
                let n = data.len().min((4 - data_offset) as usize);
                if let Some((b, d, f, r)) = self.target(data_offset) {
                    lock(&self.bus).config_write(b, d, f, r, &data[..n]);
                }
            }
            _ => {}
        }
        VmEvent::None
    }
}

/// The ECAM (MMCONFIG) window as an MMIO device.
#[derive(Debug)]
pub struct PciConfigMmio {
    bus: Arc<Mutex<PciBus>>,
}

impl PciConfigMmio {
    /// The MMIO device over `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciConfigMmio { bus }
    }

    /// Split an ECAM offset and clip the access to the function's 4 KiB.
    fn decode(offset: u64, len: usize) -> Option<(u8, u8, u8, u16, usize)> {
        if offset >= crate::layout::PCIE_ECAM_SIZE {
            return None;
        }
        let bus = (offset >> 20) as u8;
        let device = ((offset >> 15) & 0x1f) as u8;
        let function = ((offset >> 12) & 0x7) as u8;
        let reg = (offset & 0xfff) as u16;
        let n = len.min(PCI_CONFIG_SPACE_SIZE - usize::from(reg));
        Some((bus, device, function, reg, n))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset, data.len()) {
            Some((b, d, f, r, n)) => {
                let (inside, outside) = data.split_at_mut(n);
                outside.fill(0xff);
                lock(&self.bus).config_read(b, d, f, r, inside);
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmEvent {
        if let Some((b, d, f, r, n)) = Self::decode(offset, data.len()) {
            lock(&self.bus).config_write(b, d, f, r, &data[..n]);
        }
        VmEvent::None
    }
}

/// Saved state of the PCI side of the platform.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PciState {
    /// The host bridge's 256 configuration bytes.
    pub host_bridge_config: Vec<u8>,
    /// The latched CONFIG_ADDRESS (`0xcf8`).
    pub config_address: u32,
    /// The reset control register (`0xcf9`).
    pub reset_control: u8,
}

impl Default for PciState {
    fn default() -> Self {
        PciState {
            host_bridge_config: PciHostBridge::new().config_bytes().to_vec(),
            config_address: 0,
            reset_control: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (PciConfigIo, PciConfigMmio, Arc<Mutex<PciBus>>) {
        let bus = Arc::new(Mutex::new(PciBus::default()));
        (
            PciConfigIo::new(bus.clone()),
            PciConfigMmio::new(bus.clone()),
            bus,
        )
    }

    fn cf8(io: &mut PciConfigIo, bus: u32, dev: u32, func: u32, reg: u32) {
        let a = 0x8000_0000 | bus << 16 | dev << 11 | func << 8 | reg;
        assert_eq!(io.write(0, &a.to_le_bytes()), VmEvent::None);
    }

    fn cfc32(io: &mut PciConfigIo) -> u32 {
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    fn ecam32(m: &mut PciConfigMmio, bus: u64, dev: u64, func: u64, reg: u64) -> u32 {
        let mut d = [0u8; 4];
        m.read(bus << 20 | dev << 15 | func << 12 | reg, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn mechanism1_reads_the_host_bridge() {
        let (mut io, _, _) = setup();
        cf8(&mut io, 0, 0, 0, 0);
        assert_eq!(cfc32(&mut io), 0x29c0_8086);
        let mut a = [0u8; 4];
        io.read(0, &mut a);
        assert_eq!(u32::from_le_bytes(a), 0x8000_0000);
        cf8(&mut io, 0, 0, 0, 8);
        assert_eq!(cfc32(&mut io) >> 8, 0x06_0000);
        // Word and byte accesses at an offset in the data window.
        cf8(&mut io, 0, 0, 0, 0);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x29c0);
        let mut b = [0u8; 1];
        io.read(5, &mut b);
        assert_eq!(b[0], 0x80);
        // Header type.
        cf8(&mut io, 0, 0, 0, 0x0c);
        io.read(6, &mut b);
        assert_eq!(b[0], 0);
    }

    #[test]
    fn absent_functions_read_all_ones() {
        let (mut io, mut m, _) = setup();
        cf8(&mut io, 0, 1, 0, 0);
        assert_eq!(cfc32(&mut io), 0xffff_ffff);
        cf8(&mut io, 0, 0, 1, 0);
        assert_eq!(cfc32(&mut io), 0xffff_ffff);
        cf8(&mut io, 1, 0, 0, 0);
        assert_eq!(cfc32(&mut io), 0xffff_ffff);
        // Disabled CONFIG_ADDRESS.
        io.write(0, &0u32.to_le_bytes());
        assert_eq!(cfc32(&mut io), 0xffff_ffff);
        assert_eq!(ecam32(&mut m, 0, 31, 0, 0), 0xffff_ffff);
        assert_eq!(ecam32(&mut m, 255, 0, 0, 0), 0xffff_ffff);
    }

    #[test]
    fn ecam_reads_the_same() {
        let (_, mut m, _) = setup();
        assert_eq!(ecam32(&mut m, 0, 0, 0, 0), 0x29c0_8086);
        assert_eq!(ecam32(&mut m, 0, 0, 0, 8) >> 8, 0x06_0000);
        // Extended space of a conventional function reads zero.
        assert_eq!(ecam32(&mut m, 0, 0, 0, 0x100), 0);
        assert_eq!(
            ecam32(&mut m, 0, 0, 0, 0x60) & !1,
            crate::layout::PCIE_ECAM_START as u32
        );
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let (mut io, mut m, bus) = setup();
        cf8(&mut io, 0, 0, 0, 0);
        io.write(4, &0xdead_beefu32.to_le_bytes());
        assert_eq!(cfc32(&mut io), 0x29c0_8086);
        // Interrupt line is writable, through ECAM too.
        m.write(0x3c, &[0x0b]);
        cf8(&mut io, 0, 0, 0, 0x3c);
        assert_eq!(cfc32(&mut io) & 0xff, 0x0b);
        // Command: only the masked bits stick.
        m.write(0x04, &0xffffu16.to_le_bytes());
        assert_eq!(ecam32(&mut m, 0, 0, 0, 4) & 0xffff, 0x0547);
        // Writes to absent functions are dropped without effect.
        m.write(1 << 15, &[1, 2, 3, 4]);
        assert_eq!(lock(&bus).host_bridge().config_bytes()[0], 0x86);
    }

    #[test]
    fn reset_control_shares_the_decode() {
        let (mut io, _, _) = setup();
        cf8(&mut io, 0, 0, 0, 0);
        assert_eq!(io.write(1, &[0x02]), VmEvent::None);
        assert_eq!(io.write(1, &[0x06]), VmEvent::Reset);
        // The byte write did not disturb the latched address.
        assert_eq!(io.config_address(), 0x8000_0000);
        let mut b = [0u8];
        io.read(1, &mut b);
        assert_eq!(b[0], 0x02);
    }

    #[test]
    fn slots_accept_devices() {
        struct Fake;
        impl PciDevice for Fake {
            fn config_read(&mut self, _offset: u16, data: &mut [u8]) {
                data.fill(0x11);
            }
            fn config_write(&mut self, _offset: u16, _data: &[u8]) {}
        }
        let (_, mut m, bus) = setup();
        lock(&bus).add_device(3, Box::new(Fake)).unwrap();
        assert!(lock(&bus).add_device(3, Box::new(Fake)).is_err());
        assert!(lock(&bus).add_device(0, Box::new(Fake)).is_err());
        assert!(lock(&bus).add_device(32, Box::new(Fake)).is_err());
        assert_eq!(ecam32(&mut m, 0, 3, 0, 0), 0x1111_1111);
    }

    #[test]
    fn bridge_config_roundtrip() {
        let mut b = PciHostBridge::new();
        b.config_write(0x3c, &[9]);
        let r = PciHostBridge::from_config(b.config_bytes()).unwrap();
        assert_eq!(r, b);
        assert!(matches!(
            PciHostBridge::from_config(&[0; 10]),
            Err(PciError::BadConfigLength(10))
        ));
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut io, mut m, _) = setup();
        let mut big = [0u8; 16];
        for off in 0..16u64 {
            for len in [0usize, 1, 2, 3, 4, 8, 16] {
                io.read(off, &mut big[..len]);
                io.write(off, &big[..len]);
            }
        }
        cf8(&mut io, 0, 0, 0, 0xfc);
        io.read(7, &mut big);
        io.write(6, &big);
        io.read(u64::MAX, &mut big);
        io.write(u64::MAX, &big);
        m.read(0xffc, &mut big);
        assert_eq!(&big[4..], &[0xff; 12]);
        m.read(0xfff, &mut big[..8]);
        m.write(0xffd, &[0xff; 8]);
        m.read(crate::layout::PCIE_ECAM_SIZE - 1, &mut big);
        m.read(u64::MAX, &mut big);
        m.write(u64::MAX, &big);
        m.read(0, &mut []);
    }
}

//! Address-range dispatch for port I/O and MMIO.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a device write asks of the VM as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    /// Nothing: the write was handled.
    None,
    /// ACPI S5: the guest powered off.
    PowerOff,
    /// i8042 reset line or ACPI reset register.
    Reset,
    /// The debug-exit port was written with this value.
    DebugExit(u8),
}

/// A device on a bus. `offset` is relative to the base the device was inserted at.
pub trait BusDevice: Send {
    /// Handle a read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handle a write at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> VmEvent;
}

/// Errors while building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps one already inserted.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    Empty(u64),
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default, Clone)]
pub struct Bus {
    /// base -> (length, device)
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Route `[base, base + len)` to `device`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((b, (l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr < base + len).then_some((addr - base, dev))
    }

    /// Dispatch a read; returns false (and leaves `data` all ones) when nothing is mapped.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatch a write; unmapped writes are ignored, as on real hardware.
    pub fn write(&self, addr: u64, data: &[u8]) -> VmEvent {
        match self.find(addr) {
            Some((offset, dev)) => lock(dev).write(offset, data),
            None => VmEvent::None,
        }
    }
}

/// Lock a device, recovering from a poisoned lock: a device whose handler panicked
/// still holds consistent register state for the next access.
pub(crate) use crate::sync::lock;

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> VmEvent {
            self.0 = data[0];
            VmEvent::DebugExit(data[0])
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(1))), 0x10, 4).unwrap();
        bus.insert(Arc::new(Mutex::new(Reg(9))), 0x14, 2).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x12, 4).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x0f, 2).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.read(0x15, &mut b));
        assert_eq!(b[0], 10);
        assert!(!bus.read(0x16, &mut b));
        assert_eq!(b[0], 0xff);
        assert_eq!(bus.write(0x14, &[7]), VmEvent::DebugExit(7));
        assert_eq!(bus.write(0x40, &[7]), VmEvent::None);
    }
}

//! The debug-exit port: the guest ends the VM with a status byte.
//!
//! Same contract as QEMU's `isa-debug-exit,iobase=0xf4,iosize=4`: any write
//! inside the 4-port window stops the VM, and the first byte written becomes
//! the launcher's exit status (QEMU reports `(v << 1) | 1` instead; the tests
//! account for that difference).

use super::{BusDevice, VmEvent};

/// Ports decoded at [`crate::layout::DEBUG_EXIT_PORT`].
pub const DEBUG_EXIT_PORT_COUNT: u64 = 4;

/// The debug-exit device. Stateless.
#[derive(Debug, Default)]
pub struct DebugExit {}

impl DebugExit {
    /// A new device.
    pub fn new() -> Self {
        DebugExit {}
    }
}

impl BusDevice for DebugExit {
    /// Reads return zero, as QEMU's device does.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Whatever the width, the low byte of the written value is the status.
    fn write(&mut self, _offset: u64, data: &[u8]) -> VmEvent {
        match data.first() {
            Some(v) => VmEvent::DebugExit(*v),
            None => VmEvent::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_exits_with_the_first_byte() {
        let mut d = DebugExit::new();
        assert_eq!(d.write(0, &[3]), VmEvent::DebugExit(3));
        assert_eq!(
            d.write(0, &0x1234_5642u32.to_le_bytes()),
            VmEvent::DebugExit(0x42)
        );
        assert_eq!(d.write(2, &[7, 0]), VmEvent::DebugExit(7));
        assert_eq!(d.write(0, &[]), VmEvent::None);
        let mut b = [0xffu8; 4];
        d.read(0, &mut b);
        assert_eq!(b, [0; 4]);
        d.read(u64::MAX, &mut []);
    }
}

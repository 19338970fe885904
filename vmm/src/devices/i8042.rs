//! The two ways a PC guest resets itself: the i8042 keyboard controller's
//! reset line and the chipset reset control register at port `0xcf9`.
//!
//! There is no keyboard. The i8042 only has to look sane to a guest that
//! peeks at it and to turn the "pulse reset line" command (`0xfe` on the
//! command port) into [`VmEvent::Reset`]. The FADT does not advertise an
//! 8042, so Linux does not probe it, but `reboot=kbd` and simple guests still
//! reach the reset command.

use super::{BusDevice, VmEvent};

/// Ports decoded by the i8042 device: `0x60` (data) to `0x64` (command and
/// status), as Firecracker maps it, so the device is inserted at
/// [`crate::layout::I8042_DATA_PORT`] with this length.
pub const I8042_PORT_COUNT: u64 = 5;
/// Offset of the command/status port from the data port.
const COMMAND_OFFSET: u64 =
    (crate::layout::I8042_COMMAND_PORT - crate::layout::I8042_DATA_PORT) as u64;
/// Command: pulse the CPU reset line.
pub const I8042_CMD_RESET: u8 = 0xfe;
/// Status read from the command port: system flag (self test passed),
/// last write was a command, keyboard not inhibited; output and input buffers
/// empty so no guest waits on them.
pub const I8042_STATUS: u8 = 0x1c;

/// A minimal i8042: status reads, reset command. Stateless.
#[derive(Debug, Default)]
pub struct I8042 {}

impl I8042 {
    /// A new controller.
    pub fn new() -> Self {
        I8042 {}
    }
}

impl BusDevice for I8042 {
    /// The status port reads [`I8042_STATUS`]; everything else (data port with
    /// an empty output buffer, and the unused ports in between) reads zero.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == COMMAND_OFFSET {
            if let Some(b) = data.first_mut() {
                *b = I8042_STATUS;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmEvent {
        if offset == COMMAND_OFFSET && data.first() == Some(&I8042_CMD_RESET) {
            VmEvent::Reset
        } else {
            VmEvent::None
        }
    }
}

/// Port of the reset control register (Intel RST_CNT).
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// RST_CNT bit 1: system reset (hard) rather than CPU-only.
const RST_SYS_RST: u8 = 1 << 1;
/// RST_CNT bit 2: reset the CPU (the write that sets it triggers the reset).
const RST_CPU: u8 = 1 << 2;
/// RST_CNT bit 3: full reset (power cycle).
const RST_FULL: u8 = 1 << 3;
/// The value the FADT reset register tells the OS to write.
pub const RESET_VALUE: u8 = RST_SYS_RST | RST_CPU;

/// The reset control register at `0xcf9`.
///
/// It shares the `0xcf8..0xd00` decode with PCI configuration mechanism #1 (on
/// Intel chipsets a byte access to `0xcf9` is RST_CNT, dword accesses to
/// `0xcf8` are CONFIG_ADDRESS), so the PCI config-I/O device embeds it; it is
/// also a [`BusDevice`] of its own (one port) for tests and other layouts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResetControl {
    /// The sticky bits (SYS_RST, FULL_RST); RST_CPU is a trigger, not state.
    value: u8,
}

impl ResetControl {
    /// A register in its power-on state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuild from a saved value.
    pub fn from_value(value: u8) -> Self {
        ResetControl {
            value: value & (RST_SYS_RST | RST_FULL),
        }
    }

    /// The current register value.
    pub fn value(&self) -> u8 {
        self.value
    }

    /// Write the register: setting RST_CPU (as with `0x06` or `0x0e`) resets.
    pub fn write_byte(&mut self, v: u8) -> VmEvent {
        self.value = v & (RST_SYS_RST | RST_FULL);
        if v & RST_CPU != 0 {
            VmEvent::Reset
        } else {
            VmEvent::None
        }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = self.value;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmEvent {
        match (offset, data.first()) {
            (0, Some(v)) => self.write_byte(*v),
            _ => VmEvent::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets() {
        let mut k = I8042::new();
        assert_eq!(k.write(4, &[0xfe]), VmEvent::Reset);
        assert_eq!(k.write(4, &[0xd1]), VmEvent::None);
        assert_eq!(k.write(0, &[0xfe]), VmEvent::None);
        let mut s = [0u8];
        k.read(4, &mut s);
        assert_eq!(s[0], I8042_STATUS);
        k.read(0, &mut s);
        assert_eq!(s[0], 0);
    }

    #[test]
    fn i8042_odd_accesses() {
        let mut k = I8042::new();
        k.read(4, &mut []);
        assert_eq!(k.write(4, &[]), VmEvent::None);
        let mut d = [0xaau8; 4];
        k.read(4, &mut d);
        assert_eq!(d, [I8042_STATUS, 0, 0, 0]);
        k.read(u64::MAX, &mut d);
        assert_eq!(k.write(u64::MAX, &[0xfe]), VmEvent::None);
    }

    #[test]
    fn reset_control_register() {
        let mut r = ResetControl::new();
        assert_eq!(r.write(0, &[0x02]), VmEvent::None);
        let mut d = [0u8];
        r.read(0, &mut d);
        assert_eq!(d[0], 0x02);
        assert_eq!(r.write(0, &[0x06]), VmEvent::Reset);
        assert_eq!(r.write(0, &[0x0e]), VmEvent::Reset);
        assert_eq!(r.value(), 0x0a);
        assert_eq!(r.write(1, &[0x06]), VmEvent::None);
        assert_eq!(r.write(0, &[]), VmEvent::None);
        r.read(3, &mut []);
    }
}

//! COM1: a 16550A UART on top of `vm_superio::Serial`.
//!
//! The register model comes from vm-superio; this module adds the three things
//! the VMM needs around it: the interrupt is an `EventFd` (registered by the VM
//! as a KVM irqfd on GSI [`crate::layout::COM1_IRQ`]), the device sits on the
//! port-I/O [`Bus`](super::Bus) through [`BusDevice`], and its registers can be
//! saved to and restored from a plain serde struct so that a snapshot or a
//! migration continues the UART exactly where it was.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, VmEvent};

/// Number of ports the UART decodes (THR/RBR .. SCR).
pub const SERIAL_PORT_COUNT: u64 = 8;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved receive FIFO holds more bytes than a 16550A FIFO can.
    #[error("serial state has {0} bytes in the receive FIFO, more than the UART holds")]
    FifoOverflow(usize),
    /// Signalling the interrupt eventfd failed.
    #[error("cannot signal the serial interrupt: {0}")]
    Interrupt(#[source] std::io::Error),
    /// The receive FIFO is full: the guest has not read what was queued yet.
    #[error("serial receive FIFO is full")]
    FifoFull,
    /// Writing guest output failed.
    #[error("cannot write serial output: {0}")]
    Output(#[source] std::io::Error),
}

impl From<vm_superio::serial::Error<std::io::Error>> for SerialError {
    fn from(e: vm_superio::serial::Error<std::io::Error>) -> Self {
        match e {
            vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
            vm_superio::serial::Error::IOError(e) => SerialError::Output(e),
            vm_superio::serial::Error::FullFifo => SerialError::FifoFull,
        }
    }
}

/// An `EventFd` that vm-superio can trigger. A newtype because neither the
/// trait nor the type is ours.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    /// Signal the interrupt line: KVM's irqfd turns the eventfd write into an
    /// edge on the IOAPIC/PIC pin.
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// The UART registers, as a plain serialisable struct.
///
/// Mirrors every field of `vm_superio::SerialState` (which has no serde
/// support) so that restoring it reproduces the device exactly, including
/// bytes the guest had not yet read from the receive FIFO.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SerialState {
    /// Divisor latch, low byte (DLL).
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte (DLM).
    pub baud_divisor_high: u8,
    /// Interrupt enable register (IER).
    pub interrupt_enable: u8,
    /// Interrupt identification register (IIR).
    pub interrupt_identification: u8,
    /// Line control register (LCR).
    pub line_control: u8,
    /// Line status register (LSR).
    pub line_status: u8,
    /// Modem control register (MCR).
    pub modem_control: u8,
    /// Modem status register (MSR).
    pub modem_status: u8,
    /// Scratch register (SCR).
    pub scratch: u8,
    /// Receive FIFO contents, oldest byte first.
    pub in_buffer: Vec<u8>,
}

impl Default for SerialState {
    fn default() -> Self {
        vm_superio::SerialState::default().into()
    }
}

impl From<vm_superio::SerialState> for SerialState {
    fn from(s: vm_superio::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Where the guest's console output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The COM1 UART as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, SerialOut>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("state", &self.serial.state())
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART in its power-on state. `irq` is signalled for every interrupt;
    /// `out` receives each byte the guest transmits. vm-superio flushes `out`
    /// after every byte, so an unbuffered `File` sees output immediately (tests
    /// read the console log while the guest runs).
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Rebuild a UART from saved registers. Re-raises a pending THR-empty or
    /// received-data interrupt, as the saved IIR says.
    pub fn from_state(
        irq: EventFd,
        out: SerialOut,
        state: &SerialState,
    ) -> Result<Self, SerialError> {
        // vm-superio's FIFO holds 64 bytes; check here to give a precise error.
        const FIFO_SIZE: usize = 64;
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(SerialError::FifoOverflow(state.in_buffer.len()));
        }
        let serial = Serial::from_state(&state.into(), EventFdTrigger(irq), NoEvents, out)?;
        Ok(SerialDevice { serial })
    }

    /// The current registers.
    pub fn state(&self) -> SerialState {
        self.serial.state().into()
    }

    /// Queue input bytes for the guest (the receive path, e.g. from a console
    /// socket). Returns how many bytes fit in the FIFO.
    pub fn enqueue_raw_bytes(&mut self, input: &[u8]) -> Result<usize, SerialError> {
        Ok(self.serial.enqueue_raw_bytes(input)?)
    }

    /// Free space in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    /// Each byte of the access is a read of the register at that offset, as an
    /// 8-bit ISA device would see a wider access split up. Bytes beyond the
    /// eight registers read as all ones (nothing decodes them).
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset.checked_add(i as u64) {
                Some(o) if o < SERIAL_PORT_COUNT => self.serial.read(o as u8),
                _ => 0xff,
            };
        }
    }

    /// A failed output write is logged, not propagated: the guest cannot be
    /// stopped because the console file went away, and the THR-empty interrupt
    /// is still delivered by vm-superio.
    fn write(&mut self, offset: u64, data: &[u8]) -> VmEvent {
        for (i, b) in data.iter().enumerate() {
            let Some(o) = offset
                .checked_add(i as u64)
                .filter(|o| *o < SERIAL_PORT_COUNT)
            else {
                break;
            };
            if let Err(e) = self.serial.write(o as u8, *b) {
                tracing::warn!("serial: {}", SerialError::from(e));
            }
        }
        VmEvent::None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer that tests can look into after handing it to the device.
    #[derive(Clone, Default)]
    pub(crate) struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn efd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    const LCR: u64 = 3;
    const IER: u64 = 1;
    const SCR: u64 = 7;
    const LSR: u64 = 5;

    #[test]
    fn output_reaches_the_writer() {
        let buf = SharedBuf::default();
        let mut s = SerialDevice::new(efd(), Box::new(buf.clone()));
        for b in b"hello\n" {
            assert_eq!(s.write(0, &[*b]), VmEvent::None);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hello\n");
        // Transmitter always empty: LSR has THRE and TEMT.
        let mut d = [0u8];
        s.read(LSR, &mut d);
        assert_eq!(d[0] & 0x60, 0x60);
    }

    #[test]
    fn thr_empty_interrupt_signals_the_eventfd() {
        let irq = efd();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        s.write(IER, &[0x02]);
        assert!(irq.read().unwrap() >= 1);
        // Reading IIR acknowledges the THR-empty interrupt; the next byte
        // raises it again.
        let mut iir = [0u8];
        s.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02);
        s.write(0, b"x");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn save_restore_reproduces_registers() {
        let mut s = SerialDevice::new(efd(), Box::new(std::io::sink()));
        // Set the divisor through DLAB, then 8N1 and the scratch register.
        s.write(LCR, &[0x80]);
        s.write(0, &[0x0c]);
        s.write(1, &[0x00]);
        s.write(LCR, &[0x03]);
        s.write(IER, &[0x01]);
        s.write(SCR, &[0x5a]);
        s.enqueue_raw_bytes(b"ab").unwrap();
        let state = s.state();
        assert_eq!(state.line_control, 0x03);
        assert_eq!(state.interrupt_enable, 0x01);
        assert_eq!(state.baud_divisor_low, 0x0c);
        assert_eq!(state.in_buffer, b"ab");

        let mut r = SerialDevice::from_state(efd(), Box::new(std::io::sink()), &state).unwrap();
        assert_eq!(r.state(), state);
        let mut d = [0u8];
        r.read(LCR, &mut d);
        assert_eq!(d[0], 0x03);
        r.read(SCR, &mut d);
        assert_eq!(d[0], 0x5a);
        r.read(0, &mut d);
        assert_eq!(d[0], b'a');
    }

    #[test]
    fn oversized_fifo_is_refused() {
        let state = SerialState {
            in_buffer: vec![0; 65],
            ..SerialState::default()
        };
        assert!(matches!(
            SerialDevice::from_state(efd(), Box::new(std::io::sink()), &state),
            Err(SerialError::FifoOverflow(65))
        ));
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut s = SerialDevice::new(efd(), Box::new(std::io::sink()));
        let mut d = [0u8; 8];
        s.read(6, &mut d);
        assert_eq!(&d[2..], &[0xff; 6]);
        s.read(u64::MAX, &mut d);
        s.read(100, &mut []);
        s.write(u64::MAX, &[1, 2, 3]);
        s.write(7, &[1, 2, 3, 4, 5, 6, 7, 8]);
        s.write(0, &[]);
    }
}

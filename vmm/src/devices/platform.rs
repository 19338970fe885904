//! The set of legacy platform devices of a q35-style machine, wired onto the buses.
//!
//! [`Platform`] is what the VM owns: it builds every device of the guest ABI
//! (ARCHITECTURE.md, "Guest ABI"), inserts each at its address from
//! [`crate::layout`] on a port-I/O [`Bus`] and an MMIO [`Bus`], and saves and
//! restores their registers as one [`PlatformState`] for `VmState`.
//!
//! | where | device |
//! |---|---|
//! | PIO `0x60..0x65` | [`I8042`] (reset via `0xfe` on `0x64`) |
//! | PIO `0xf4..0xf8` | [`DebugExit`] |
//! | PIO `0x3f8..0x400` | [`SerialDevice`] (COM1, IRQ 4 through an irqfd) |
//! | PIO `0x600..0x680` | [`AcpiPm`] (PM1a, PM timer, GPE0) |
//! | PIO `0xcf8..0xd00` | [`PciConfigIo`] (config mechanism #1, RST_CNT at `0xcf9`) |
//! | MMIO `0xb000_0000`, 256 MiB | [`PciConfigMmio`] (ECAM) |

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::acpi_pm::{AcpiPm, AcpiPmState, ACPI_PM_PORT_COUNT};
use super::bus::lock;
use super::debug_exit::{DebugExit, DEBUG_EXIT_PORT_COUNT};
use super::i8042::{I8042, I8042_PORT_COUNT};
use super::pci::{
    PciBus, PciConfigIo, PciConfigMmio, PciError, PciHostBridge, PciState, PCI_CONFIG_IO_PORT_COUNT,
};
use super::serial::{SerialDevice, SerialError, SerialOut, SerialState, SERIAL_PORT_COUNT};
use super::{Bus, BusError};
use crate::layout;

/// Errors while building or restoring the platform.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// Two devices claimed the same addresses (a layout bug).
    #[error("cannot map platform device: {0}")]
    Bus(#[from] BusError),
    /// The saved serial state is not valid.
    #[error("cannot restore the serial port: {0}")]
    Serial(#[from] SerialError),
    /// The saved PCI state is not valid.
    #[error("cannot restore the PCI host bridge: {0}")]
    Pci(#[from] PciError),
}

/// Saved registers of every stateful platform device.
///
/// The i8042 and the debug-exit port have no state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct PlatformState {
    /// COM1.
    pub serial: SerialState,
    /// ACPI PM I/O block.
    pub acpi_pm: AcpiPmState,
    /// PCI host bridge, CONFIG_ADDRESS and RST_CNT.
    pub pci: PciState,
}

/// The platform devices and the two buses that route guest exits to them.
pub struct Platform {
    pio_bus: Bus,
    mmio_bus: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    pci_io: Arc<Mutex<PciConfigIo>>,
    pci_bus: Arc<Mutex<PciBus>>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform").finish_non_exhaustive()
    }
}

impl Platform {
    /// All devices in their power-on state. `serial_irq` is signalled when COM1
    /// interrupts (register it as an irqfd on GSI [`layout::COM1_IRQ`]);
    /// `serial_out` receives the guest's console output.
    pub fn new(serial_irq: EventFd, serial_out: SerialOut) -> Result<Platform, PlatformError> {
        Self::from_state(serial_irq, serial_out, &PlatformState::default())
    }

    /// All devices rebuilt from `state` (a snapshot or an incoming migration).
    pub fn from_state(
        serial_irq: EventFd,
        serial_out: SerialOut,
        state: &PlatformState,
    ) -> Result<Platform, PlatformError> {
        let serial = Arc::new(Mutex::new(SerialDevice::from_state(
            serial_irq,
            serial_out,
            &state.serial,
        )?));
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::from_state(&state.acpi_pm)));
        let bridge = PciHostBridge::from_config(&state.pci.host_bridge_config)?;
        let pci_bus = Arc::new(Mutex::new(PciBus::new(bridge)));
        let pci_io = Arc::new(Mutex::new(PciConfigIo::with_state(
            pci_bus.clone(),
            state.pci.config_address,
            state.pci.reset_control,
        )));
        let pci_mmio = Arc::new(Mutex::new(PciConfigMmio::new(pci_bus.clone())));

        let mut pio_bus = Bus::new();
        pio_bus.insert(
            Arc::new(Mutex::new(I8042::new())),
            layout::I8042_DATA_PORT.into(),
            I8042_PORT_COUNT,
        )?;
        pio_bus.insert(
            Arc::new(Mutex::new(DebugExit::new())),
            layout::DEBUG_EXIT_PORT.into(),
            DEBUG_EXIT_PORT_COUNT,
        )?;
        pio_bus.insert(serial.clone(), layout::COM1_PORT.into(), SERIAL_PORT_COUNT)?;
        pio_bus.insert(
            acpi_pm.clone(),
            layout::ACPI_PM_BASE.into(),
            ACPI_PM_PORT_COUNT,
        )?;
        pio_bus.insert(
            pci_io.clone(),
            layout::PCI_CONFIG_ADDRESS.into(),
            PCI_CONFIG_IO_PORT_COUNT,
        )?;

        let mut mmio_bus = Bus::new();
        mmio_bus.insert(pci_mmio, layout::PCIE_ECAM_START, layout::PCIE_ECAM_SIZE)?;

        Ok(Platform {
            pio_bus,
            mmio_bus,
            serial,
            acpi_pm,
            pci_io,
            pci_bus,
        })
    }

    /// The port-I/O bus (clone it for each vCPU thread; devices are shared).
    pub fn pio_bus(&self) -> &Bus {
        &self.pio_bus
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio_bus
    }

    /// Route `[base, base + len)` of the MMIO bus to `device` (PCI BARs). Only before the
    /// vCPUs are spawned: each vCPU thread works on its own clone of the bus.
    pub fn insert_mmio(
        &mut self,
        device: Arc<Mutex<dyn super::BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        self.mmio_bus.insert(device, base, len)
    }

    /// COM1, e.g. to feed it input with `enqueue_raw_bytes`.
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    /// PCI bus 0, where a future virtio-pci device is plugged in.
    pub fn pci_bus(&self) -> &Arc<Mutex<PciBus>> {
        &self.pci_bus
    }

    /// Capture every device's registers. The vCPUs must be paused (no exit
    /// half-handled), as a saved state requires.
    pub fn state(&self) -> PlatformState {
        let pci_io = lock(&self.pci_io);
        PlatformState {
            serial: lock(&self.serial).state(),
            acpi_pm: lock(&self.acpi_pm).state(),
            pci: PciState {
                host_bridge_config: lock(&self.pci_bus).host_bridge().config_bytes().to_vec(),
                config_address: pci_io.config_address(),
                reset_control: pci_io.reset_control(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::tests::SharedBuf;
    use crate::devices::VmEvent;

    fn efd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn platform() -> (Platform, SharedBuf) {
        let out = SharedBuf::default();
        (Platform::new(efd(), Box::new(out.clone())).unwrap(), out)
    }

    #[test]
    fn guest_abi_ports_are_wired() {
        let (p, out) = platform();
        let pio = p.pio_bus();
        for b in b"ok\n" {
            assert_eq!(pio.write(0x3f8, &[*b]), VmEvent::None);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"ok\n");
        assert_eq!(pio.write(0xf4, &[42]), VmEvent::DebugExit(42));
        assert_eq!(
            pio.write(0x604, &0x2000u16.to_le_bytes()),
            VmEvent::PowerOff
        );
        assert_eq!(pio.write(0x64, &[0xfe]), VmEvent::Reset);
        assert_eq!(pio.write(0xcf9, &[0x06]), VmEvent::Reset);
        assert_eq!(
            pio.write(0xcf8, &0x8000_0000u32.to_le_bytes()),
            VmEvent::None
        );
        let mut d = [0u8; 4];
        assert!(pio.read(0xcfc, &mut d));
        assert_eq!(u32::from_le_bytes(d), 0x29c0_8086);
        let mut d = [0u8; 4];
        assert!(p.mmio_bus().read(layout::PCIE_ECAM_START, &mut d));
        assert_eq!(u32::from_le_bytes(d), 0x29c0_8086);
        assert!(p
            .mmio_bus()
            .read(layout::PCIE_ECAM_START + (1 << 15), &mut d));
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
    }

    #[test]
    fn save_restore_roundtrip() {
        let (p, _) = platform();
        let pio = p.pio_bus();
        pio.write(0x3fb, &[0x03]);
        pio.write(0x3f9, &[0x01]);
        pio.write(0x602, &0x0100u16.to_le_bytes());
        pio.write(0xcf8, &0x8000_003cu32.to_le_bytes());
        pio.write(0xcfc, &[0x0a]);
        pio.write(0xcf9, &[0x02]);
        let state = p.state();
        assert_eq!(state.serial.line_control, 0x03);
        assert_eq!(state.pci.config_address, 0x8000_003c);

        // Through bincode, as VmState travels.
        let bytes = bincode::serialize(&state).unwrap();
        let back: PlatformState = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, state);

        let r = Platform::from_state(efd(), Box::new(std::io::sink()), &back).unwrap();
        let mut s2 = r.state();
        s2.acpi_pm.pm_timer = state.acpi_pm.pm_timer;
        assert_eq!(s2, state);
        let mut d = [0u8];
        r.pio_bus().read(0xcfc, &mut d);
        assert_eq!(d[0], 0x0a);
    }

    #[test]
    fn platform_can_be_shared_with_vcpu_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Platform>();
        assert_send_sync::<Bus>();
    }

    #[test]
    fn bad_state_is_an_error() {
        let mut state = PlatformState::default();
        state.pci.host_bridge_config.truncate(4);
        assert!(matches!(
            Platform::from_state(efd(), Box::new(std::io::sink()), &state),
            Err(PlatformError::Pci(_))
        ));
    }
}

//! Emulated platform devices and the buses that route port and MMIO exits to them.
//!
//! A device implements [`BusDevice`]; the vCPU loop looks the address up on the
//! port-I/O or MMIO [`Bus`] and calls it. A write may ask the VM to stop
//! ([`VmEvent`]), which is how power-off, reset and the debug-exit port work
//! without the device knowing about threads.

pub mod acpi_pm;
pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod pci;
pub mod platform;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, VmEvent};
pub use platform::{Platform, PlatformError, PlatformState};

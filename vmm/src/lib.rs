//! An embedded KVM virtual machine runtime for q35-style x86-64 guests.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of the crates.
//! The entry point is [`machine::Vm`]: boot a kernel ([`machine::Vm::boot`]),
//! pause it with a guard ([`machine::Vm::pause`]), save its [`state::VmState`],
//! and continue it elsewhere ([`machine::Vm::restore`]).

pub mod acpi;
pub mod boot;
pub mod config;
pub mod devices;
pub mod layout;
pub mod machine;
pub mod pages;
pub mod snapshot;
pub mod state;
pub mod sync;
pub mod vstate;

pub use config::VmConfig;
pub use machine::{MachineError, PauseGuard, Vm};
pub use state::VmState;
pub use vstate::vcpu::VmStop;

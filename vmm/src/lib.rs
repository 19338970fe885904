//! An embedded KVM virtual machine runtime for q35-style x86-64 guests.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of the crates.

pub mod devices;
pub mod layout;
pub mod persist;

//! The KVM-facing state of a VM: memory, the VM fd, and vCPUs.

pub mod dirty_ring;
pub mod memory;
pub mod vcpu;
pub mod vm;
pub mod vmm_dirty;

//! KVM state: the system handle, the VM, its memory and its vCPUs.

pub mod fork_image;
pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;

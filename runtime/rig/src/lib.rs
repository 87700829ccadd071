//! The rig: an emulated KVM host (QEMU TCG, -cpu max) for machines without hardware virtualization.

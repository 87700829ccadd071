//! A minimal KVM virtual machine monitor: boot, virtio-mmio devices, snapshots.

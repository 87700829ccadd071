//! Guest devices (virtio-mmio transport, virtio blk/vsock/net/rng, the layered disk) that know
//! nothing of the VMM.
//!
//! Architecture invariant: nothing in this crate knows the VMM. A device sees guest memory
//! (`vm_memory::GuestMemoryMmap`), its queues, and an [`Interrupt`] it can raise; the VMM sees a
//! [`bus::BusDevice`] it maps into its MMIO bus. Every byte that comes from the guest (register
//! accesses, descriptor chains, packet headers) and every saved state handed to `restore` is
//! untrusted: errors are returned or logged and the device is marked as needing a reset; nothing
//! panics on guest input.
#![deny(missing_docs)]

pub mod bus;
pub mod disk;
#[doc(hidden)]
pub mod fuzzing;
pub mod persist;
pub mod virtio;

/// An interrupt line the device can raise; implemented by the VMM (an irqfd `EventFd` on a GSI).
pub trait Interrupt: Send + Sync {
    /// Raise the interrupt (edge: one call, one interrupt).
    fn trigger(&self) -> std::io::Result<()>;
}

//! The MMIO bus interface a device presents to the VMM.

/// A device on the VMM's MMIO bus. `offset` is relative to the device's window; `data.len()` is
/// the access width. A device must handle any offset and width without panicking: a guest
/// chooses both.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`; fill `data` (leave zeros for unknown
    /// registers).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

//! An address-range bus: which device answers an access at `addr`, and at what offset.
//!
//! Generic over the device type so the same lookup serves the port-I/O and MMIO buses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Errors of bus registration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The new range is empty or wraps.
    #[error("bus range at {base:#x} of length {len:#x} is empty or wraps")]
    BadRange {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The new range overlaps an existing one.
    #[error("bus range at {base:#x} of length {len:#x} overlaps another device")]
    Overlap {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// A device registered on a bus.
struct Entry<D: ?Sized> {
    len: u64,
    device: Arc<Mutex<D>>,
}

/// Non-overlapping `[base, base+len)` ranges mapped to devices.
pub struct Bus<D: ?Sized> {
    entries: BTreeMap<u64, Entry<D>>,
}

impl<D: ?Sized> std::fmt::Debug for Bus<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl<D: ?Sized> Default for Bus<D> {
    fn default() -> Self {
        Bus {
            entries: BTreeMap::new(),
        }
    }
}

impl<D: ?Sized> Bus<D> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` at `[base, base+len)`.
    pub fn insert(&mut self, device: Arc<Mutex<D>>, base: u64, len: u64) -> Result<(), Error> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(Error::BadRange { base, len });
        }
        let end = base + len;
        let before = self.entries.range(..end).next_back();
        if let Some((b, e)) = before
            && b + e.len > base
        {
            return Err(Error::Overlap { base, len });
        }
        self.entries.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device covering `[addr, addr+size)` and the offset of `addr` in it. An access that
    /// straddles the end of a device's range matches nothing.
    pub fn resolve(&self, addr: u64, size: usize) -> Option<(&Arc<Mutex<D>>, u64)> {
        let (base, entry) = self.entries.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= entry.len).then_some((&entry.device, offset))
    }

    /// Number of registered devices.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no device is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(v: u32) -> Arc<Mutex<u32>> {
        Arc::new(Mutex::new(v))
    }

    #[test]
    fn resolve_finds_device_and_offset() {
        let mut b = Bus::new();
        b.insert(dev(1), 0x1000, 0x1000).unwrap();
        b.insert(dev(2), 0x3000, 0x10).unwrap();
        let (d, off) = b.resolve(0x1ffc, 4).unwrap();
        assert_eq!((*d.lock().unwrap(), off), (1, 0xffc));
        assert_eq!(b.resolve(0x3008, 8).map(|x| x.1), Some(8));
        assert!(b.resolve(0x2000, 1).is_none());
        assert!(b.resolve(0x0fff, 1).is_none());
    }

    #[test]
    fn straddling_access_resolves_to_nothing() {
        let mut b = Bus::new();
        b.insert(dev(1), 0x1000, 0x1000).unwrap();
        assert!(b.resolve(0x1ffe, 4).is_none());
        assert!(b.resolve(u64::MAX, 8).is_none());
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused() {
        let mut b = Bus::new();
        b.insert(dev(1), 0x1000, 0x1000).unwrap();
        assert!(matches!(
            b.insert(dev(2), 0x1800, 0x1000),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            b.insert(dev(2), 0x800, 0x1000),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            b.insert(dev(2), 0x0, 0),
            Err(Error::BadRange { .. })
        ));
        assert!(matches!(
            b.insert(dev(2), u64::MAX, 2),
            Err(Error::BadRange { .. })
        ));
        b.insert(dev(3), 0x2000, 0x10).unwrap();
        assert_eq!(b.len(), 2);
    }

    proptest::proptest! {
        #[test]
        fn resolve_never_panics_and_stays_in_range(addr: u64, size in 0usize..16) {
            let mut b = Bus::new();
            b.insert(dev(1), 0xd000_0000, 0x1000).unwrap();
            b.insert(dev(2), u64::MAX - 0x1fff, 0x1000).unwrap();
            if let Some((_, off)) = b.resolve(addr, size) {
                proptest::prop_assert!(off + size as u64 <= 0x1000);
            }
        }
    }
}

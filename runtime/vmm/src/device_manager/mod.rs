//! The guest's buses: port I/O (COM1, i8042) and MMIO (virtio-mmio windows), and the policy
//! for accesses that hit nothing: log, ignore, reads return all ones. A guest must never be
//! able to crash the VMM through them.

pub mod bus;
pub mod legacy;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::arch::x86_64::layout::{
    IOAPIC_LAST_GSI, MMIO_WINDOW_SIZE, VIRTIO_FIRST_GSI, VIRTIO_MMIO_BASE, VIRTIO_MMIO_LIMIT,
};
use legacy::LegacyDevices;

/// A device on the MMIO bus (the devices crate's transport implements it).
pub type MmioDevice = dyn specc_devices::bus::BusDevice;

/// Errors of device registration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No MMIO window or GSI is left.
    #[error("out of virtio-mmio windows or GSIs")]
    Exhausted,
    /// The bus refused the range.
    #[error("registering an MMIO device")]
    Bus(#[from] bus::Error),
}

/// Where a virtio-mmio device sits, for the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Window base.
    pub base: u64,
    /// Window length.
    pub len: u64,
    /// Interrupt line.
    pub gsi: u32,
}

impl MmioSlot {
    /// The `virtio_mmio.device=` parameter that tells Linux about this device.
    pub fn cmdline_param(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len / 1024,
            self.base,
            self.gsi
        )
    }
}

/// The buses the vCPU threads dispatch exits to.
#[derive(Debug)]
pub struct DeviceManager {
    /// COM1 and the i8042.
    pub legacy: LegacyDevices,
    mmio: bus::Bus<MmioDevice>,
    slots: Vec<MmioSlot>,
    unhandled: AtomicU64,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many stray accesses are logged at warn level before the rest go to debug.
const LOUD_UNHANDLED: u64 = 32;

impl DeviceManager {
    /// A device manager with the legacy devices and an empty MMIO bus.
    pub fn new(legacy: LegacyDevices) -> Self {
        DeviceManager {
            legacy,
            mmio: bus::Bus::new(),
            slots: Vec::new(),
            unhandled: AtomicU64::new(0),
        }
    }

    /// The next free virtio-mmio window and GSI.
    pub fn next_slot(&self) -> Result<MmioSlot, Error> {
        let n = self.slots.len() as u64;
        let base = VIRTIO_MMIO_BASE + n * MMIO_WINDOW_SIZE;
        let gsi = VIRTIO_FIRST_GSI + u32::try_from(n).map_err(|_| Error::Exhausted)?;
        if base + MMIO_WINDOW_SIZE > VIRTIO_MMIO_LIMIT || gsi > IOAPIC_LAST_GSI {
            return Err(Error::Exhausted);
        }
        Ok(MmioSlot {
            base,
            len: MMIO_WINDOW_SIZE,
            gsi,
        })
    }

    /// Maps `device` at `slot` (from [`DeviceManager::next_slot`]).
    pub fn add_mmio(
        &mut self,
        slot: MmioSlot,
        device: Arc<Mutex<MmioDevice>>,
    ) -> Result<(), Error> {
        self.mmio.insert(device, slot.base, slot.len)?;
        self.slots.push(slot);
        Ok(())
    }

    /// The virtio-mmio devices, in the order they were added.
    pub fn mmio_slots(&self) -> &[MmioSlot] {
        &self.slots
    }

    /// Stray accesses so far (reads and writes that hit no device).
    pub fn unhandled_accesses(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    fn stray(&self, what: &str, addr: u64, len: usize) {
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        if n < LOUD_UNHANDLED {
            tracing::warn!("guest {what} of {len} bytes at {addr:#x} hit no device; ignored");
        } else {
            tracing::debug!("guest {what} of {len} bytes at {addr:#x} hit no device; ignored");
        }
    }

    /// A port read. Nothing there reads as all ones, as on a PC.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.legacy.pio_read(port, data) {
            data.fill(0xff);
            // Linux's early probes of absent hardware (other COM ports, the PS/2 mouse,
            // port 0x80 delays) are routine; count them but only for the log.
            self.stray("port read", u64::from(port), data.len());
        }
    }

    /// A port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        // Port 0x80 is the POST/delay port: Linux writes it as an I/O delay, thousands of times.
        if port != 0x80 && !self.legacy.pio_write(port, data) {
            self.stray("port write", u64::from(port), data.len());
        }
    }

    /// An MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.mmio.resolve(addr, data.len()) {
            Some((dev, offset)) => lock(dev).read(offset, data),
            None => {
                data.fill(0xff);
                self.stray("MMIO read", addr, data.len());
            }
        }
    }

    /// An MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.mmio.resolve(addr, data.len()) {
            Some((dev, offset)) => lock(dev).write(offset, data),
            None => self.stray("MMIO write", addr, data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use legacy::{IrqLine, SerialOut};

    struct Echo(Vec<(u64, Vec<u8>)>);

    impl specc_devices::bus::BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset & 0xff).unwrap());
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn manager() -> DeviceManager {
        let (tx, _rx) = mpsc::channel();
        DeviceManager::new(
            LegacyDevices::new(
                IrqLine::new().unwrap(),
                SerialOut::new(None, false).unwrap(),
                crate::exit::ExitSender(tx),
                None,
            )
            .unwrap(),
        )
    }

    #[test]
    fn slots_are_consecutive_4k_windows_from_gsi_5() {
        let mut dm = manager();
        for i in 0..3u64 {
            let slot = dm.next_slot().unwrap();
            assert_eq!(slot.base, 0xd000_0000 + i * 0x1000);
            assert_eq!(u64::from(slot.gsi), 5 + i);
            dm.add_mmio(slot, Arc::new(Mutex::new(Echo(Vec::new()))))
                .unwrap();
        }
        assert_eq!(
            dm.mmio_slots()[1].cmdline_param(),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn gsis_run_out_before_the_ioapic_does() {
        let mut dm = manager();
        let mut n = 0;
        while let Ok(slot) = dm.next_slot() {
            dm.add_mmio(slot, Arc::new(Mutex::new(Echo(Vec::new()))))
                .unwrap();
            n += 1;
        }
        assert_eq!(n, 19);
    }

    #[test]
    fn mmio_accesses_reach_the_device_at_their_offset_and_strays_read_all_ones() {
        let mut dm = manager();
        let slot = dm.next_slot().unwrap();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        dm.add_mmio(slot, dev.clone()).unwrap();
        let mut data = [0u8; 4];
        dm.mmio_read(0xd000_0070, &mut data);
        assert_eq!(data, [0x70; 4]);
        dm.mmio_write(0xd000_0050, &[1, 0, 0, 0]);
        assert_eq!(dev.lock().unwrap().0, vec![(0x50, vec![1, 0, 0, 0])]);
        dm.mmio_read(0xd000_1000, &mut data);
        assert_eq!(data, [0xff; 4]);
        dm.pio_read(0x2f8, &mut data[..1]);
        assert_eq!(data[0], 0xff);
        assert_eq!(dm.unhandled_accesses(), 2);
    }
}

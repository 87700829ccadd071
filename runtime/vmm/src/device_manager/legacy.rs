//! The port-I/O devices: COM1 (8250 UART from vm-superio) and the i8042 controller's reset
//! line. The PIT and the PICs are KVM's in-kernel ones and never reach userspace.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use vm_superio::serial::NoEvents;
use vm_superio::serial::SerialState;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitSender, VmExit};

/// COM1 base port.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// COM1 register count.
pub const SERIAL_PORT_LEN: u16 = 8;
/// i8042 data port (the command port is base + 4 = 0x64).
pub const I8042_PORT_BASE: u16 = 0x60;
/// i8042 port range length (0x60..=0x64).
pub const I8042_PORT_LEN: u16 = 5;

/// Errors of legacy device setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the serial log failed.
    #[error("creating serial log {path}")]
    SerialLog {
        /// The log path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Creating an eventfd failed.
    #[error("creating an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A saved serial state was refused.
    #[error("invalid saved serial state: {0}")]
    SerialState(String),
}

/// An interrupt line backed by an irqfd: writing the eventfd raises the GSI in KVM.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl IrqLine {
    /// A new, not yet registered, line.
    pub fn new() -> Result<Self, Error> {
        EventFd::new(libc::EFD_NONBLOCK)
            .map(IrqLine)
            .map_err(Error::EventFd)
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The i8042's CPU-reset line: the guest's way to power off.
#[derive(Debug)]
pub struct ResetLine(pub ExitSender);

impl Trigger for ResetLine {
    type E = std::sync::mpsc::SendError<VmExit>;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(VmExit::PowerOff)
    }
}

/// Where the guest console goes: a log file (line buffered) and, optionally, our stdout.
#[derive(Debug)]
pub struct SerialOut {
    log: Option<LineWriter<File>>,
    stdout: bool,
}

impl SerialOut {
    /// Creates (truncates) the log at `log`, if given.
    pub fn new(log: Option<&Path>, stdout: bool) -> Result<Self, Error> {
        let log = log
            .map(|p| {
                File::create(p)
                    .map(LineWriter::new)
                    .map_err(|source| Error::SerialLog {
                        path: p.to_path_buf(),
                        source,
                    })
            })
            .transpose()?;
        Ok(SerialOut { log, stdout })
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(l) = &mut self.log {
            l.write_all(buf)?;
        }
        if self.stdout {
            std::io::stdout().write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(l) = &mut self.log {
            l.flush()?;
        }
        if self.stdout {
            std::io::stdout().flush()?;
        }
        Ok(())
    }
}

/// The serial device type.
pub type SerialDevice = Serial<IrqLine, NoEvents, SerialOut>;

/// COM1 and the i8042.
#[derive(Debug)]
pub struct LegacyDevices {
    /// COM1.
    pub serial: Mutex<SerialDevice>,
    /// The i8042 reset line.
    pub i8042: Mutex<I8042Device<ResetLine>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a vCPU thread panicked mid-access; the VM is ending anyway and
    // the device state is plain registers, so keep serving the other threads.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// COM1's registers and receive FIFO, for snapshots (vm-superio's `SerialState` as plain
/// serde data). The i8042 has no state worth keeping: it only forwards the reset line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl LegacyDevices {
    /// Builds the devices; `serial_irq` must be registered on GSI 4 by the caller. With `saved`
    /// (a restore) COM1 continues from that state; an invalid one (overfull FIFO) is refused.
    pub fn new(
        serial_irq: IrqLine,
        out: SerialOut,
        exit: ExitSender,
        saved: Option<&SerialSnapshot>,
    ) -> Result<Self, Error> {
        let serial = match saved {
            None => Serial::new(serial_irq, out),
            Some(s) => Serial::from_state(&SerialState::from(s), serial_irq, NoEvents, out)
                .map_err(|e| Error::SerialState(format!("{e:?}")))?,
        };
        Ok(LegacyDevices {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042Device::new(ResetLine(exit))),
        })
    }

    /// COM1's state (vCPUs paused).
    pub fn save_serial(&self) -> SerialSnapshot {
        lock(&self.serial).state().into()
    }

    /// A port read; returns false if no device is at `port`. Registers are byte wide: a wider
    /// access reads the register at `port` into the first byte and zeroes the rest.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        let Some(first) = data.first_mut() else {
            return false;
        };
        if let Some(off) = offset(port, SERIAL_PORT_BASE, SERIAL_PORT_LEN) {
            *first = lock(&self.serial).read(off);
        } else if let Some(off) = offset(port, I8042_PORT_BASE, I8042_PORT_LEN) {
            *first = lock(&self.i8042).read(off);
        } else {
            return false;
        }
        data[1..].fill(0);
        true
    }

    /// A port write; returns false if no device is at `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        let Some(&value) = data.first() else {
            return false;
        };
        if let Some(off) = offset(port, SERIAL_PORT_BASE, SERIAL_PORT_LEN) {
            if let Err(e) = lock(&self.serial).write(off, value) {
                tracing::warn!("serial write: {e:?}");
            }
        } else if let Some(off) = offset(port, I8042_PORT_BASE, I8042_PORT_LEN) {
            if let Err(e) = lock(&self.i8042).write(off, value) {
                tracing::warn!("i8042 reset: {e}");
            }
        } else {
            return false;
        }
        true
    }
}

fn offset(port: u16, base: u16, len: u16) -> Option<u8> {
    let off = port.checked_sub(base)?;
    (off < len).then(|| u8::try_from(off).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn devices(log: &Path) -> (LegacyDevices, mpsc::Receiver<crate::exit::Event>) {
        let (tx, rx) = mpsc::channel();
        let d = LegacyDevices::new(
            IrqLine::new().unwrap(),
            SerialOut::new(Some(log), false).unwrap(),
            ExitSender(tx),
            None,
        )
        .unwrap();
        (d, rx)
    }

    #[test]
    fn serial_state_round_trips_and_an_overfull_fifo_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (d, _rx) = devices(&dir.path().join("s"));
        assert!(d.pio_write(0x3f8 + 1, &[0x03])); // IER: THR + RDA interrupts
        assert!(d.pio_write(0x3f8 + 7, &[0x5a])); // scratch
        let saved = d.save_serial();
        assert_eq!((saved.interrupt_enable, saved.scratch), (0x03, 0x5a));
        let (tx, _rx2) = mpsc::channel();
        let again = LegacyDevices::new(
            IrqLine::new().unwrap(),
            SerialOut::new(None, false).unwrap(),
            ExitSender(tx.clone()),
            Some(&saved),
        )
        .unwrap();
        assert_eq!(again.save_serial(), saved);
        let mut bad = saved;
        bad.in_buffer = vec![0; 1 << 16];
        assert!(matches!(
            LegacyDevices::new(
                IrqLine::new().unwrap(),
                SerialOut::new(None, false).unwrap(),
                ExitSender(tx),
                Some(&bad),
            ),
            Err(Error::SerialState(_))
        ));
    }

    #[test]
    fn serial_bytes_reach_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let (d, _rx) = devices(&log);
        for b in b"hi\n" {
            assert!(d.pio_write(0x3f8, &[*b]));
        }
        assert_eq!(std::fs::read(&log).unwrap(), b"hi\n");
    }

    #[test]
    fn i8042_reset_command_reports_power_off() {
        let dir = tempfile::tempdir().unwrap();
        let (d, rx) = devices(&dir.path().join("s"));
        assert!(d.pio_write(0x64, &[0xfe]));
        assert!(matches!(
            rx.try_recv().unwrap(),
            crate::exit::Event::Exit(VmExit::PowerOff)
        ));
        assert!(d.pio_write(0x64, &[0x01]));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn unknown_ports_and_empty_accesses_are_not_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let (d, _rx) = devices(&dir.path().join("s"));
        assert!(!d.pio_write(0x80, &[1]));
        assert!(!d.pio_write(0x3f8, &[]));
        let mut buf = [0u8; 0];
        assert!(!d.pio_read(0x3f8, &mut buf));
        let mut wide = [0xaau8; 4];
        assert!(d.pio_read(0x3fd, &mut wide));
        assert_eq!(&wide[1..], &[0, 0, 0]);
    }

    proptest::proptest! {
        #[test]
        fn any_port_access_never_panics(port: u16, data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8), write: bool) {
            let dir = tempfile::tempdir().unwrap();
            let (d, _rx) = devices(&dir.path().join("s"));
            let mut data = data;
            if write { d.pio_write(port, &data); } else { d.pio_read(port, &mut data); }
        }
    }
}

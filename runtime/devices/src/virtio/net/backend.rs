//! Frame transports between the device and the host network.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// Largest frame accepted from a backend: 64 KiB plus an Ethernet header (passt's own limit is
/// its 65520-byte MTU plus the header).
pub(super) const MAX_FRAME: usize = 65536 + 14;

/// How to run passt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasstConfig {
    /// The passt binary (`passt` from Debian's package when found on PATH).
    pub binary: PathBuf,
    /// Log file for passt (`-l`); without one passt's output is discarded.
    pub log_file: Option<PathBuf>,
    /// Further arguments (port forwards `-t`, `-u`, addresses, ...).
    pub extra_args: Vec<String>,
}

impl Default for PasstConfig {
    fn default() -> Self {
        PasstConfig {
            binary: PathBuf::from("passt"),
            log_file: None,
            extra_args: Vec::new(),
        }
    }
}

/// Where the device's frames go.
#[derive(Debug)]
pub enum NetBackend {
    /// Spawn passt on one end of a socketpair (`passt --fd`), user-mode, no privileges needed.
    Passt(PasstConfig),
    /// A connected stream socket speaking QEMU's stream protocol (a passt started elsewhere, or
    /// a test).
    Stream(UnixStream),
    /// An existing tap interface, opened with IFF_TAP | IFF_NO_PI (needs CAP_NET_ADMIN or a
    /// persistent tap owned by the user).
    Tap(String),
}

/// An open transport plus its framing state. Kept across device resets so the byte stream
/// never loses its frame boundaries.
#[derive(Debug)]
pub(super) struct Transport {
    io: Io,
    /// Bytes read but not yet split into frames (stream framing only).
    rx_buf: Vec<u8>,
    /// Bytes of frames accepted from the guest but not yet written.
    tx_pending: Vec<u8>,
    /// The helper process (passt), killed when the transport goes away.
    child: Option<Child>,
    /// The backend hung up or broke the framing; frames are dropped from then on.
    pub(super) dead: bool,
}

#[derive(Debug)]
enum Io {
    Stream(UnixStream),
    Tap(File),
}

/// Why a backend could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The socketpair for passt could not be created.
    #[error("creating the passt socket pair")]
    SocketPair(#[source] io::Error),
    /// passt could not be started.
    #[error("starting {0}")]
    Spawn(PathBuf, #[source] io::Error),
    /// The tap device could not be opened.
    #[error("opening tap device {0}")]
    Tap(String, #[source] io::Error),
    /// The socket could not be made non-blocking.
    #[error("configuring the backend socket")]
    Configure(#[source] io::Error),
}

fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor number; it touches no memory of ours. Called in the child
    // between fork and exec, where only async-signal-safe calls are allowed: fcntl is one.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_tap(name: &str) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // struct ifreq: 16-byte name, then a union whose first member we use is `short flags`.
    let mut ifr = [0u8; 40];
    ifr[..bytes.len()].copy_from_slice(bytes);
    let flags = i16::try_from(libc::IFF_TAP | libc::IFF_NO_PI).unwrap_or(0);
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes on Linux), which `ifr` is
    // large enough to hold; the fd is ours.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), 0x4004_54ca, ifr.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, no memory involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Transport {
    pub(super) fn open(backend: NetBackend, mtu: u16) -> Result<Self, BackendError> {
        let (io, child) = match backend {
            NetBackend::Stream(s) => (Io::Stream(s), None),
            NetBackend::Tap(name) => {
                let f = open_tap(&name).map_err(|e| BackendError::Tap(name.clone(), e))?;
                (Io::Tap(f), None)
            }
            NetBackend::Passt(cfg) => {
                let (ours, theirs) = UnixStream::pair().map_err(BackendError::SocketPair)?;
                let fd = theirs.as_raw_fd();
                let mut cmd = Command::new(&cfg.binary);
                cmd.arg("--foreground")
                    .arg("--quiet")
                    .arg("--one-off")
                    .arg("--fd")
                    .arg(fd.to_string())
                    .arg("--mtu")
                    .arg(mtu.to_string());
                if let Some(log) = &cfg.log_file {
                    cmd.arg("--log-file").arg(log);
                }
                cmd.args(&cfg.extra_args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                // SAFETY: the closure only calls fcntl (async-signal-safe) on a descriptor
                // number; it allocates nothing and takes no locks.
                unsafe {
                    cmd.pre_exec(move || clear_cloexec(fd));
                }
                let child = cmd
                    .spawn()
                    .map_err(|e| BackendError::Spawn(cfg.binary.clone(), e))?;
                drop(theirs);
                (Io::Stream(ours), Some(child))
            }
        };
        set_nonblocking(io.raw_fd()).map_err(BackendError::Configure)?;
        Ok(Transport {
            io,
            rx_buf: Vec::new(),
            tx_pending: Vec::new(),
            child,
            dead: false,
        })
    }

    pub(super) fn raw_fd(&self) -> RawFd {
        self.io.raw_fd()
    }

    /// The next complete frame from the backend, reading more if needed; `Ok(None)` = nothing
    /// complete yet.
    pub(super) fn next_frame(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.dead {
            return Ok(None);
        }
        match &mut self.io {
            Io::Tap(f) => {
                let mut buf = vec![0u8; MAX_FRAME];
                match f.read(&mut buf) {
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(Some(buf))
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Io::Stream(s) => loop {
                if self.rx_buf.len() >= 4 {
                    let len = u32::from_be_bytes([
                        self.rx_buf[0],
                        self.rx_buf[1],
                        self.rx_buf[2],
                        self.rx_buf[3],
                    ]) as usize;
                    if len > MAX_FRAME {
                        self.dead = true;
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("backend sent a {len}-byte frame"),
                        ));
                    }
                    if self.rx_buf.len() >= 4 + len {
                        let frame = self.rx_buf[4..4 + len].to_vec();
                        self.rx_buf.drain(..4 + len);
                        return Ok(Some(frame));
                    }
                }
                let mut chunk = [0u8; 16 * 1024];
                match s.read(&mut chunk) {
                    Ok(0) => {
                        self.dead = true;
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "backend closed",
                        ));
                    }
                    Ok(n) => self.rx_buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            },
        }
    }

    /// Whether earlier frames still wait to be written (the device stops taking TX buffers).
    pub(super) fn tx_blocked(&self) -> bool {
        !self.tx_pending.is_empty()
    }

    /// Queue one frame for the backend and write what can be written.
    pub(super) fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.dead {
            return Ok(());
        }
        match &mut self.io {
            Io::Tap(f) => match f.write(frame) {
                Ok(_) => Ok(()),
                // A tap drops frames it cannot take, like a NIC on a full wire.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Err(e) => Err(e),
            },
            Io::Stream(_) => {
                let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
                self.tx_pending.extend_from_slice(&len.to_be_bytes());
                self.tx_pending.extend_from_slice(frame);
                self.flush()
            }
        }
    }

    /// Write pending bytes without blocking.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        let Io::Stream(s) = &mut self.io else {
            return Ok(());
        };
        while !self.tx_pending.is_empty() {
            match s.write(&self.tx_pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.dead = true;
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl Io {
    fn raw_fd(&self) -> RawFd {
        match self {
            Io::Stream(s) => s.as_raw_fd(),
            Io::Tap(f) => f.as_raw_fd(),
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

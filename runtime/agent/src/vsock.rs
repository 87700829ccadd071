//! AF_VSOCK listening through libc (std has no vsock support).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::log::log;

/// Binds and listens on `port` for any CID.
pub fn bind(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is valid and the fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family =
        libc::sa_family_t::try_from(libc::AF_VSOCK).expect("AF_VSOCK fits sa_family_t");
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>())
        .expect("sockaddr_vm size fits socklen_t");
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes that outlives the call.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(sock.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Binds `port`, retrying until the vsock device exists: the virtio-vsock driver may probe
/// after init has started, and until then socket() or bind() fail.
pub fn bind_retrying(port: u32) -> OwnedFd {
    let mut attempt: u64 = 0;
    loop {
        match bind(port) {
            Ok(fd) => {
                log!("listening on vsock port {port}");
                return fd;
            }
            Err(e) => {
                if attempt.is_multiple_of(25) {
                    log!("vsock port {port} not available yet ({e}); retrying");
                }
                attempt += 1;
                std::thread::sleep(Duration::from_millis(if attempt < 50 { 20 } else { 200 }));
            }
        }
    }
}

/// Accepts one connection.
pub fn accept(listener: &OwnedFd) -> io::Result<File> {
    // SAFETY: accept4 on our listening socket; NULL address pointers are allowed.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by accept4 and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

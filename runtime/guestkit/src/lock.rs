//! The cache's builder lock, shared by the kernel and rootfs builders.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// An exclusive `flock(2)` on a lock file, released on drop (and by the kernel if the process
/// dies, so a crashed builder never wedges the cache).
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock on `path` (created if missing) is held. The error names the step
    /// that failed ("opening lock file" or "locking").
    pub(crate) fn acquire(path: &Path) -> Result<Self, (&'static str, io::Error)> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| ("opening lock file", e))?;
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(FileLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(("locking", err));
            }
        }
    }
}

//! A new identity after a snapshot restore or fork: wall clock, kernel RNG, hostname and
//! machine id. Without it every clone of a snapshot would share the RNG state, the hostname
//! and the machine id of the VM the snapshot was taken from, and run with a stale clock.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use specc_protocol::{ErrorInfo, ErrorKind, RestoredAck, RestoredRequest};

use crate::log::log;

/// Largest entropy blob accepted; far more than the pool needs to be reseeded.
pub const MAX_ENTROPY: usize = 4096;

// From <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// What the handler may touch; tests on a host point `etc` elsewhere and leave the clock.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Where `hostname` and `machine-id` are written.
    pub etc: std::path::PathBuf,
    /// Whether `CLOCK_REALTIME` is stepped.
    pub set_clock: bool,
}

fn now_realtime_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

fn set_clock(unix_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(unix_ns / 1_000_000_000).map_err(io::Error::other)?,
        tv_nsec: libc::c_long::try_from(unix_ns % 1_000_000_000).map_err(io::Error::other)?,
    };
    // SAFETY: clock_settime reads the timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mixes `bytes` into the input pool, credits them fully and forces the CRNG to reseed now, so
/// the very next `getrandom` differs between clones. Needs CAP_SYS_ADMIN.
fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    let dev = OpenOptions::new().write(true).open("/dev/urandom")?;
    let len = i32::try_from(bytes.len()).map_err(io::Error::other)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&(len.saturating_mul(8)).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: `info` is a valid rand_pool_info with buf_size bytes of payload after the
    // header; the kernel only reads it.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn valid_hostname(h: &str) -> bool {
    (1..=64).contains(&h.len())
        && h.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn valid_machine_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0')
}

/// Writes a small file atomically (temp + rename), keeping it world-readable.
fn write_small(path: &Path, content: &str) -> io::Result<()> {
    let tmp = path.with_extension("specc-tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

/// Applies a `Restored` message. Validation happens first: a bad field changes nothing.
pub fn apply(req: &RestoredRequest, cfg: &IdentityConfig) -> Result<RestoredAck, ErrorInfo> {
    if req.entropy.len() > MAX_ENTROPY {
        return Err(ErrorInfo::new(
            ErrorKind::InvalidInput,
            format!(
                "entropy is {} bytes, at most {MAX_ENTROPY}",
                req.entropy.len()
            ),
        ));
    }
    if let Some(h) = &req.hostname
        && !valid_hostname(h)
    {
        return Err(ErrorInfo::new(
            ErrorKind::InvalidInput,
            format!("{h:?} is not a valid hostname"),
        ));
    }
    if let Some(id) = &req.machine_id
        && !valid_machine_id(id)
    {
        return Err(ErrorInfo::new(
            ErrorKind::InvalidInput,
            format!("{id:?} is not a machine id (32 lowercase hex digits, not all zero)"),
        ));
    }

    let before = now_realtime_ns();
    let step = i128::from(req.unix_time_ns) - before;
    if cfg.set_clock {
        set_clock(req.unix_time_ns).map_err(|e| ErrorInfo::from_io("clock_settime", &e))?;
    }
    if !req.entropy.is_empty() {
        add_entropy(&req.entropy).map_err(|e| ErrorInfo::from_io("reseed kernel RNG", &e))?;
    }
    if let Some(h) = &req.hostname {
        // SAFETY: sethostname reads len bytes from the string we own.
        if unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } != 0 {
            let e = io::Error::last_os_error();
            return Err(ErrorInfo::from_io("sethostname", &e));
        }
        write_small(&cfg.etc.join("hostname"), &format!("{h}\n"))
            .map_err(|e| ErrorInfo::from_io("write hostname", &e))?;
    }
    if let Some(id) = &req.machine_id {
        write_small(&cfg.etc.join("machine-id"), &format!("{id}\n"))
            .map_err(|e| ErrorInfo::from_io("write machine-id", &e))?;
    }
    let clock_step_ns = i64::try_from(step).unwrap_or(if step < 0 { i64::MIN } else { i64::MAX });
    log!(
        "restored: clock stepped by {:.3} s, {} entropy bytes, hostname {:?}",
        clock_step_ns as f64 / 1e9,
        req.entropy.len(),
        req.hostname.as_deref().unwrap_or("(unchanged)")
    );
    Ok(RestoredAck {
        clock_step_ns,
        entropy_bytes: u32::try_from(req.entropy.len()).unwrap_or(u32::MAX),
        gateway: None,
    })
}

/// The current hostname.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_validation_follows_rfc1123_labels() {
        assert!(valid_hostname("vm-1.example"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("-bad"));
        assert!(!valid_hostname("a..b"));
        assert!(!valid_hostname("has space"));
        assert!(!valid_hostname(&"a".repeat(65)));
    }

    #[test]
    fn machine_id_must_be_32_lowercase_hex_and_not_zero() {
        assert!(valid_machine_id("0123456789abcdef0123456789abcdef"));
        assert!(!valid_machine_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!valid_machine_id("00000000000000000000000000000000"));
        assert!(!valid_machine_id("abc"));
    }

    #[test]
    fn apply_with_invalid_hostname_changes_nothing() {
        let etc = tempfile::tempdir().unwrap();
        let cfg = IdentityConfig {
            etc: etc.path().to_owned(),
            set_clock: false,
        };
        let req = RestoredRequest {
            unix_time_ns: 0,
            entropy: vec![],
            hostname: Some("bad host".into()),
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
            await_gateway_ms: None,
        };
        let err = apply(&req, &cfg).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert!(!etc.path().join("machine-id").exists());
    }
}

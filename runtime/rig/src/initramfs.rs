//! The rig's initramfs: Debian's static busybox and the init script, as an uncompressed
//! `newc` cpio archive written here (no `cpio` tool, no root for the device node), cached
//! under `$SPECC_HOME/rig/initramfs-<sha256>.cpio`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The init script, PID 1 of the rig.
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// Where Debian's `busybox-static` installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The busybox applets the init script calls.
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "cat", "chroot", "sync", "sleep", "poweroff", "reboot",
];

/// Errors while preparing the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// The static busybox is not installed.
    #[error("cannot read {BUSYBOX} (install Debian's busybox-static)")]
    Busybox(#[source] io::Error),
    /// Writing the archive into the cache failed.
    #[error("cannot write the rig initramfs {0}")]
    Write(PathBuf, #[source] io::Error),
}

/// One entry of a `newc` archive.
#[derive(Debug)]
struct Entry<'a> {
    name: &'a str,
    mode: u32,
    data: &'a [u8],
    rdev: (u32, u32),
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn write_entry(out: &mut Vec<u8>, ino: u32, e: &Entry<'_>) {
    let namesize = e.name.len() + 1;
    let fields = [
        ino,
        e.mode,
        0, // uid
        0, // gid
        if e.mode & S_IFDIR != 0 { 2 } else { 1 },
        0, // mtime: fixed, so the archive and its digest are reproducible
        u32::try_from(e.data.len()).expect("initramfs entry under 4 GiB"),
        0,
        0,
        e.rdev.0,
        e.rdev.1,
        u32::try_from(namesize).expect("short name"),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(e.name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(e.data);
    pad4(out);
}

/// The archive bytes for this init script and busybox binary.
pub fn archive(init: &str, busybox: &[u8]) -> Vec<u8> {
    let dir = |name| Entry {
        name,
        mode: S_IFDIR | 0o755,
        data: &[],
        rdev: (0, 0),
    };
    let mut entries = vec![
        dir("bin"),
        dir("dev"),
        dir("proc"),
        dir("sys"),
        dir("host"),
        dir("tmp"),
        // The kernel opens /dev/console for PID 1 before init mounts devtmpfs.
        Entry {
            name: "dev/console",
            mode: S_IFCHR | 0o600,
            data: &[],
            rdev: (5, 1),
        },
        Entry {
            name: "init",
            mode: S_IFREG | 0o755,
            data: init.as_bytes(),
            rdev: (0, 0),
        },
        Entry {
            name: "bin/busybox",
            mode: S_IFREG | 0o755,
            data: busybox,
            rdev: (0, 0),
        },
    ];
    let links: Vec<String> = APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    for l in &links {
        entries.push(Entry {
            name: l,
            mode: S_IFLNK | 0o777,
            data: b"busybox",
            rdev: (0, 0),
        });
    }
    let mut out = Vec::with_capacity(busybox.len() + 4096);
    for (i, e) in entries.iter().enumerate() {
        write_entry(&mut out, u32::try_from(i + 1).expect("few entries"), e);
    }
    write_entry(
        &mut out,
        0,
        &Entry {
            name: "TRAILER!!!",
            mode: 0,
            data: &[],
            rdev: (0, 0),
        },
    );
    out
}

/// The cached initramfs for the current init script and the installed busybox, written on
/// first use (temp file + rename, so concurrent rigs never read half an archive).
pub fn ensure_initramfs(cache_dir: &Path) -> Result<PathBuf, InitramfsError> {
    let busybox = fs::read(BUSYBOX).map_err(InitramfsError::Busybox)?;
    let bytes = archive(INIT_SCRIPT, &busybox);
    let digest = hex::encode(Sha256::digest(&bytes));
    let path = cache_dir.join(format!("initramfs-{}.cpio", &digest[..16]));
    if path.is_file() {
        return Ok(path);
    }
    let write = || -> io::Result<()> {
        fs::create_dir_all(cache_dir)?;
        let tmp = cache_dir.join(format!(".initramfs-{}.tmp", std::process::id()));
        fs::write(&tmp, &bytes)?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|e| InitramfsError::Write(path.clone(), e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_reproducible_and_aligned() {
        let a = archive("#!/bin/sh\n", b"\x7fELFbusy");
        assert_eq!(a, archive("#!/bin/sh\n", b"\x7fELFbusy"));
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let trailer = a.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(trailer.is_some());
    }

    #[test]
    fn archive_lists_init_console_and_applets_as_cpio_reads_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cpio = dir.path().join("x.cpio");
        fs::write(&cpio, archive("#!/bin/sh\necho hi\n", b"BUSYBOX")).expect("write");
        let out = std::process::Command::new("cpio")
            .args(["-itv", "-F"])
            .arg(&cpio)
            .output()
            .expect("run cpio (Debian package cpio)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        for want in [
            "init",
            "dev/console",
            "bin/busybox",
            "bin/sh -> busybox",
            "bin/chroot",
        ] {
            assert!(listing.contains(want), "missing {want} in:\n{listing}");
        }
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with('c') && l.contains("dev/console"))
        );
    }
}

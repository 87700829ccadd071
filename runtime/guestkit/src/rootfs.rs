//! Root filesystem images: `scratch`, `busybox` and `debian` bases rendered to ext4 with
//! `mkfs.ext4 -d` (no loop mounts), cached by the digest of everything that goes into them.
//!
//! Cache layout under `$SPECC_HOME`:
//!
//! ```text
//! rootfs/<key>/rootfs.ext4         the image (sparse, the spec's disk size)
//! rootfs/<key>/digest              sha256 of the image's bytes (what layers above refer to)
//! rootfs/<key>/inputs              the inputs the key was computed from, one per line
//! rootfs/<key>.lock                held while building <key>
//! debootstrap/<tree-key>/          a debootstrap tree, shared by every debian image
//! debootstrap/<tree-key>.lock      held while bootstrapping
//! ```
//!
//! Architecture invariant: `rootfs/<key>/` and `debootstrap/<tree-key>/` only ever appear
//! complete: each is assembled in a temporary directory beside it and renamed into place, and
//! builders of one key serialize on its lock file.
//!
//! The image digest is the sha256 of the image file, not the key: a memory snapshot is only
//! valid over the exact blocks it was taken with, and `mkfs` output is not bit-reproducible, so
//! a rebuilt image (same key) must not pass for the old one.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::lock::FileLock;

use crate::kernel::specc_home;

/// Bumped whenever the build steps change in a way that changes the output.
pub const BUILDER_VERSION: &str = "specc-rootfs-builder 1";

/// Default disk size of an image, when the spec gives none.
pub const DEFAULT_DISK_BYTES: u64 = 1 << 30;

/// Where the agent lives in every image.
pub const AGENT_GUEST_PATH: &str = "/sbin/specc-agent";
/// Where the agent lives in debian images (a systemd service, not init).
pub const AGENT_DEBIAN_PATH: &str = "/usr/local/sbin/specc-agent";

/// Packages added to debootstrap's minbase. `udev`: systemd-networkd configures a link only
/// once udev has processed it (outside a container it waits for udev's database entry), so
/// without udev every link stays "pending" and the guest never asks for a DHCP lease. The
/// list is part of the tree's cache key, so changing it makes a new tree and new images.
pub const DEBIAN_INCLUDE: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "iproute2",
    "procps",
    "ca-certificates",
];

/// Installed with apt-get in the debootstrap chroot after debootstrap: systemd-resolved fails
/// to configure inside debootstrap's own base configuration (it needs dbus set up first),
/// and it is what turns the DNS servers of the DHCP lease into `/etc/resolv.conf`.
pub const DEBIAN_SECOND_STAGE: &[&str] = &["systemd-resolved"];

/// Units masked in debian images: timers and gettys that only cost boot time and wake idle
/// sandboxes (and so spoil memory snapshots) without doing anything useful in a microVM.
pub const DEBIAN_MASKED_UNITS: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty-static.service",
    "getty@tty1.service",
    "systemd-timesyncd.service",
];

pub(crate) const AGENT_UNIT: &str = include_str!("../../agent/specc-agent.service");
pub(crate) const PASSWD: &str = include_str!("../rootfs/minimal/passwd");
pub(crate) const GROUP: &str = include_str!("../rootfs/minimal/group");
const SHADOW: &str = include_str!("../rootfs/minimal/shadow");
pub(crate) const HOSTS: &str = include_str!("../rootfs/minimal/hosts");
pub(crate) const DHCP_NETWORK: &str = include_str!("../rootfs/debian/80-specc-dhcp.network");

/// The base of a root filesystem (`base "..."` in a spec).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Base {
    /// Only the agent (as init) and the directories it mounts on.
    Scratch,
    /// Debian's static busybox with every applet linked, and the agent as init.
    Busybox,
    /// A debootstrap minbase of `suite` with systemd, the agent as a systemd service.
    Debian {
        /// Debian suite, e.g. `bookworm`.
        suite: String,
    },
    /// An OCI image (`base oci="REF"`): its linux/amd64 layers unpacked with whiteouts, the
    /// agent as PID 1 or, if the image boots systemd, a systemd service. `reference` is read
    /// by [`crate::oci::ImageRef::parse`].
    Oci {
        /// `oci-layout:DIR[:TAG|@DIGEST]`, a path to a layout, or a registry reference.
        reference: String,
    },
}

impl Base {
    /// The spec name of the base.
    pub fn kind(&self) -> &'static str {
        match self {
            Base::Scratch => "scratch",
            Base::Busybox => "busybox",
            Base::Debian { .. } => "debian",
            Base::Oci { .. } => "oci",
        }
    }
}

/// How to build an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsOptions {
    /// Size of the image (the guest's disk), in bytes; rounded down to 4 KiB blocks.
    pub disk_bytes: u64,
    /// The static agent binary to install (see [`agent_binary`]).
    pub agent_path: PathBuf,
}

/// A built (or cached) image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsImage {
    /// `$SPECC_HOME/rootfs/<key>/rootfs.ext4`.
    pub path: PathBuf,
    /// `sha256:<hex>` of the image file's bytes.
    pub digest: String,
    /// The cache key (hex sha256 of the inputs).
    pub key: String,
    /// Whether this call built the image (false: it came from the cache).
    pub built: bool,
}

/// Errors of the rootfs builder.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A file system operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An external tool could not be started.
    #[error("cannot run {tool} (is it installed? testsuite/scripts/setup-host.sh installs it)")]
    Spawn {
        /// The program.
        tool: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An external tool failed.
    #[error("{tool} failed ({status}): {output}")]
    Tool {
        /// The command line, shortened.
        tool: String,
        /// Its exit status.
        status: String,
        /// The tail of its output.
        output: String,
    },
    /// The agent binary is not usable in a guest.
    #[error("agent binary {} is not a static x86_64 ELF executable: {why}", path.display())]
    BadAgent {
        /// The binary.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// No agent binary could be found or built.
    #[error("cannot find the specc-agent binary: {0}")]
    NoAgent(String),
    /// The options are not valid.
    #[error("invalid rootfs options: {0}")]
    Invalid(String),
    /// Building a debian base needs root (debootstrap chroots).
    #[error("base \"debian\" needs root: debootstrap runs chroot and creates device nodes")]
    NeedsRoot,
    /// Reading or unpacking an OCI base failed.
    #[error(transparent)]
    Oci(#[from] crate::oci::OciError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io { what, path, source }
}

/// Takes the builder lock on `path`.
fn lock(path: &Path) -> Result<FileLock, RootfsError> {
    FileLock::acquire(path).map_err(|(what, e)| io_err(what, path)(e))
}

fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    text[start..].trim().to_owned()
}

/// Runs a command to completion; a failure carries the tail of its output.
fn run(cmd: &mut Command) -> Result<Vec<u8>, RootfsError> {
    let tool = format!("{cmd:?}").chars().take(200).collect::<String>();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RootfsError::Spawn {
            tool: tool.clone(),
            source,
        })?;
    if !out.status.success() {
        let mut all = out.stdout.clone();
        all.extend_from_slice(&out.stderr);
        return Err(RootfsError::Tool {
            tool,
            status: out.status.to_string(),
            output: tail(&all, 2000),
        });
    }
    let mut all = out.stdout;
    all.extend_from_slice(&out.stderr);
    Ok(all)
}

fn sha256_file(path: &Path) -> Result<String, RootfsError> {
    let mut f = File::open(path).map_err(io_err("opening", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err("reading", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Block size of [`sparse_digest`].
pub const SPARSE_DIGEST_BLOCK: u64 = 64 << 10;

/// The digest of a (sparse) disk image: `sparse-sha256:<hex>` where hex is the sha256 of
/// `size as u64 LE`, then for every 64 KiB block (the last one possibly short) that is not all
/// zero, in order, `index as u64 LE` followed by the block's bytes.
///
/// It identifies the bytes exactly (omitted blocks are zero) but costs time in proportion to
/// the data, not the disk size: holes are skipped with `SEEK_DATA`/`SEEK_HOLE` without being
/// read, and a hole and a written block of zeros hash the same, so copying the image
/// (densely or sparsely) keeps its digest. A 1 GiB image holding 40 MiB hashes in about
/// 0.1 s instead of 2.6 s for a plain sha256.
pub fn sparse_digest(path: &Path) -> Result<String, RootfsError> {
    let mut f = File::open(path).map_err(io_err("opening", path))?;
    let size = f.metadata().map_err(io_err("stat", path))?.len();
    let mut h = Sha256::new();
    h.update(size.to_le_bytes());
    let mut buf = vec![0u8; usize::try_from(SPARSE_DIGEST_BLOCK).expect("64 KiB fits usize")];
    let mut next_block = 0u64;
    let blocks = size.div_ceil(SPARSE_DIGEST_BLOCK);
    while next_block < blocks {
        let from = next_block * SPARSE_DIGEST_BLOCK;
        let (data, hole) = match (
            seek_data(&f, from, libc::SEEK_DATA),
            seek_data(&f, from, libc::SEEK_HOLE),
        ) {
            (Ok(Some(d)), Ok(Some(_))) => {
                let hole = seek_data(&f, d, libc::SEEK_HOLE)
                    .map_err(io_err("seeking", path))?
                    .unwrap_or(size);
                (d, hole)
            }
            // ENXIO: no data after `from`.
            (Ok(None), _) => break,
            // No SEEK_DATA support: everything is data.
            _ => (from, size),
        };
        let first = (data / SPARSE_DIGEST_BLOCK).max(next_block);
        let end = hole.div_ceil(SPARSE_DIGEST_BLOCK).min(blocks);
        for index in first..end {
            let off = index * SPARSE_DIGEST_BLOCK;
            let len = usize::try_from(SPARSE_DIGEST_BLOCK.min(size - off)).expect("fits");
            io::Seek::seek(&mut f, io::SeekFrom::Start(off)).map_err(io_err("seeking", path))?;
            f.read_exact(&mut buf[..len])
                .map_err(io_err("reading", path))?;
            if buf[..len].iter().any(|&b| b != 0) {
                h.update(index.to_le_bytes());
                h.update(&buf[..len]);
            }
        }
        next_block = end.max(first + 1);
    }
    Ok(format!("sparse-sha256:{}", hex::encode(h.finalize())))
}

/// `lseek` with SEEK_DATA or SEEK_HOLE; `Ok(None)` when there is no such region (ENXIO).
fn seek_data(f: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(from).map_err(io::Error::other)?;
    // SAFETY: lseek on a file descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(u64::try_from(r).map_err(io::Error::other)?))
}

/// Checks that `path` is a 64-bit x86 ELF executable without a program interpreter (static).
pub fn check_static_elf(path: &Path) -> Result<(), RootfsError> {
    let bad = |why: &str| RootfsError::BadAgent {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let mut f = File::open(path).map_err(io_err("opening", path))?;
    let mut hdr = [0u8; 64];
    f.read_exact(&mut hdr)
        .map_err(|_| bad("shorter than an ELF header"))?;
    if &hdr[..4] != b"\x7fELF" || hdr[4] != 2 || hdr[5] != 1 {
        return Err(bad("not a little-endian 64-bit ELF file"));
    }
    let u16_at = |o: usize| u16::from_le_bytes([hdr[o], hdr[o + 1]]);
    if u16_at(18) != 62 {
        return Err(bad("not an x86_64 binary"));
    }
    if !matches!(u16_at(16), 2 | 3) {
        return Err(bad("not an executable"));
    }
    let phoff = u64::from_le_bytes(hdr[32..40].try_into().expect("8 bytes"));
    let phentsize = usize::from(u16_at(54));
    let phnum = usize::from(u16_at(56));
    if phentsize < 4 || phnum > 4096 {
        return Err(bad("implausible program header table"));
    }
    let mut table = vec![0u8; phentsize * phnum];
    io::Seek::seek(&mut f, io::SeekFrom::Start(phoff)).map_err(io_err("reading", path))?;
    f.read_exact(&mut table)
        .map_err(|_| bad("truncated program header table"))?;
    const PT_INTERP: u32 = 3;
    let dynamic = table
        .chunks_exact(phentsize)
        .any(|ph| u32::from_le_bytes(ph[..4].try_into().expect("4 bytes")) == PT_INTERP);
    if dynamic {
        return Err(bad(
            "it is dynamically linked (build it with RUSTFLAGS=\"-C target-feature=+crt-static\")",
        ));
    }
    Ok(())
}

/// The target triple the agent is built for.
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Finds the static agent binary, building it if needed:
///
/// 1. `$SPECC_AGENT_BIN`, if set (must be a static binary);
/// 2. in a source checkout (this crate's workspace): `cargo build -p specc-agent --release
///    --target x86_64-unknown-linux-gnu` with `RUSTFLAGS="-C target-feature=+crt-static"`
///    (incremental: a no-op when up to date), into `$CARGO_TARGET_DIR` or `<workspace>/target`;
///    the result is `<target dir>/x86_64-unknown-linux-gnu/release/specc-agent`;
/// 3. otherwise `specc-agent` beside the running executable (an installed release).
pub fn agent_binary() -> Result<PathBuf, RootfsError> {
    if let Some(p) = std::env::var_os("SPECC_AGENT_BIN").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        check_static_elf(&p)?;
        return Ok(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if workspace.join("runtime/agent/Cargo.toml").is_file() {
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .filter(|v| !v.is_empty())
            .map_or_else(|| workspace.join("target"), PathBuf::from);
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run(Command::new(cargo)
            .current_dir(&workspace)
            .args([
                "build",
                "-q",
                "-p",
                "specc-agent",
                "--release",
                "--target",
                AGENT_TARGET,
            ])
            .env("CARGO_TARGET_DIR", &target_dir)
            // CARGO_ENCODED_RUSTFLAGS would take precedence over RUSTFLAGS.
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
        let bin = target_dir.join(AGENT_TARGET).join("release/specc-agent");
        check_static_elf(&bin)?;
        return Ok(bin);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("specc-agent")));
    match beside {
        Some(p) if p.is_file() => {
            check_static_elf(&p)?;
            Ok(p)
        }
        _ => Err(RootfsError::NoAgent(
            "set SPECC_AGENT_BIN, or run from a source checkout, or install specc-agent beside specc"
                .into(),
        )),
    }
}

/// The agent binary [`agent_binary`] would return, without building anything: for computing
/// cache keys cheaply (what matters for an image is the agent that goes into it, and this is
/// the one that would). `None` when no agent is built yet (then call [`agent_binary`]).
pub fn installed_agent_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPECC_AGENT_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if workspace.join("runtime/agent/Cargo.toml").is_file() {
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .filter(|v| !v.is_empty())
            .map_or_else(|| workspace.join("target"), PathBuf::from);
        let bin = target_dir.join(AGENT_TARGET).join("release/specc-agent");
        return bin.is_file().then_some(bin);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("specc-agent")))?;
    beside.is_file().then_some(beside)
}

/// `$SPECC_HOME/rootfs`.
pub fn rootfs_dir() -> PathBuf {
    specc_home().join("rootfs")
}

fn tool_version(cmd: &str, args: &[&str]) -> Result<String, RootfsError> {
    let out = run(Command::new(cmd).args(args))?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

fn dpkg_version(package: &str) -> Result<String, RootfsError> {
    tool_version("dpkg-query", &["-W", "-f=${Version}", package])
}

/// The Debian mirror: `$SPECC_DEBIAN_MIRROR`, else the first non-security `deb` source of the
/// host's apt configuration (deb822 `.sources` files or `sources.list`).
pub fn debian_mirror() -> String {
    if let Some(m) = std::env::var_os("SPECC_DEBIAN_MIRROR").filter(|v| !v.is_empty()) {
        return m.to_string_lossy().into_owned();
    }
    let mut texts = Vec::new();
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            if p.extension().is_some_and(|e| e == "sources" || e == "list") {
                texts.push(fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    texts.insert(
        0,
        fs::read_to_string("/etc/apt/sources.list").unwrap_or_default(),
    );
    mirror_from_sources(&texts).unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

fn mirror_from_sources(texts: &[String]) -> Option<String> {
    let usable = |u: &str| u.starts_with("http") && !u.contains("security");
    for text in texts {
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') {
                continue;
            }
            if let Some(rest) = line.strip_prefix("URIs:") {
                if let Some(u) = rest.split_whitespace().find(|u| usable(u)) {
                    return Some(u.trim_end_matches('/').to_owned());
                }
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // deb [options] URI suite components
                let u = rest.split_whitespace().find(|w| w.contains("://"));
                if let Some(u) = u.filter(|u| usable(u)) {
                    return Some(u.trim_end_matches('/').to_owned());
                }
            }
        }
    }
    None
}

fn valid_suite(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The inputs of the debootstrap tree of `suite`.
fn debootstrap_inputs(suite: &str) -> Result<Vec<(String, String)>, RootfsError> {
    Ok(vec![
        ("tree".into(), "debootstrap minbase 2".into()),
        ("then".into(), DEBIAN_SECOND_STAGE.join(",")),
        ("suite".into(), suite.into()),
        ("mirror".into(), debian_mirror()),
        ("include".into(), DEBIAN_INCLUDE.join(",")),
        ("debootstrap".into(), dpkg_version("debootstrap")?),
        ("arch".into(), "amd64".into()),
    ])
}

fn digest_of(inputs: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    for (k, v) in inputs {
        // Length-prefixed, so no two input lists encode alike.
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Everything the image of `base` depends on, in a fixed order. For an OCI base this reads
/// the image (or pulls it into `$SPECC_HOME`) to learn its manifest digest.
pub fn key_inputs(base: &Base, opts: &RootfsOptions) -> Result<Vec<(String, String)>, RootfsError> {
    let oci = open_oci(&specc_home(), base, &|_| {})?;
    key_inputs_with(base, opts, oci.as_ref())
}

/// The resolved image of an OCI base (`None` for the other bases).
fn open_oci(
    home: &Path,
    base: &Base,
    progress: &dyn Fn(&str),
) -> Result<Option<crate::oci::OciImage>, RootfsError> {
    match base {
        Base::Oci { reference } => Ok(Some(crate::oci::open(home, reference, progress)?)),
        _ => Ok(None),
    }
}

fn key_inputs_with(
    base: &Base,
    opts: &RootfsOptions,
    oci: Option<&crate::oci::OciImage>,
) -> Result<Vec<(String, String)>, RootfsError> {
    let mut inputs = vec![
        ("builder".into(), BUILDER_VERSION.into()),
        ("kind".into(), base.kind().into()),
        ("disk_bytes".into(), opts.disk_bytes.to_string()),
        ("agent".into(), sha256_file(&opts.agent_path)?),
        ("mke2fs".into(), tool_version("mke2fs", &["-V"])?),
        ("passwd".into(), PASSWD.into()),
        ("group".into(), GROUP.into()),
        ("shadow".into(), SHADOW.into()),
        ("hosts".into(), HOSTS.into()),
    ];
    match base {
        Base::Scratch => {}
        Base::Busybox => {
            inputs.push(("busybox".into(), sha256_file(Path::new("/bin/busybox"))?));
        }
        Base::Debian { suite } => {
            inputs.push((
                "debootstrap-tree".into(),
                digest_of(&debootstrap_inputs(suite)?),
            ));
            inputs.push(("unit".into(), AGENT_UNIT.into()));
            inputs.push(("network".into(), DHCP_NETWORK.into()));
            inputs.push(("masked".into(), DEBIAN_MASKED_UNITS.join(",")));
        }
        Base::Oci { .. } => {
            let image = oci.ok_or_else(|| RootfsError::Invalid("OCI base not resolved".into()))?;
            inputs.extend(image.key_inputs());
        }
    }
    Ok(inputs)
}

/// The cache key of the image of `base` (hex sha256 of [`key_inputs`]): the same as
/// [`RootfsImage::key`] of the image [`ensure_rootfs`] builds for these options. For an OCI
/// base this resolves the reference to its manifest digest (see [`key_inputs`]).
pub fn key(base: &Base, opts: &RootfsOptions) -> Result<String, RootfsError> {
    Ok(digest_of(&key_inputs(base, opts)?))
}

/// Builds the image of `base` into `$SPECC_HOME/rootfs`, or returns the cached one.
pub fn ensure_rootfs(base: &Base, opts: &RootfsOptions) -> Result<RootfsImage, RootfsError> {
    ensure_rootfs_in(&specc_home(), base, opts, &|_| {})
}

/// [`ensure_rootfs`] with an explicit cache home (`<home>/rootfs`, `<home>/debootstrap`) and
/// a progress callback for the slow steps.
pub fn ensure_rootfs_in(
    home: &Path,
    base: &Base,
    opts: &RootfsOptions,
    progress: &dyn Fn(&str),
) -> Result<RootfsImage, RootfsError> {
    if opts.disk_bytes < 16 << 20 {
        return Err(RootfsError::Invalid(format!(
            "disk of {} bytes is below the 16 MiB minimum",
            opts.disk_bytes
        )));
    }
    if let Base::Debian { suite } = base
        && !valid_suite(suite)
    {
        return Err(RootfsError::Invalid(format!(
            "{suite:?} is not a Debian suite name"
        )));
    }
    check_static_elf(&opts.agent_path)?;
    let oci = open_oci(home, base, progress)?;
    let inputs = key_inputs_with(base, opts, oci.as_ref())?;
    let key = digest_of(&inputs);
    let root = home.join("rootfs");
    let dir = root.join(&key);
    let cached = |built| -> Result<RootfsImage, RootfsError> {
        let digest_path = dir.join("digest");
        let digest = fs::read_to_string(&digest_path).map_err(io_err("reading", &digest_path))?;
        Ok(RootfsImage {
            path: dir.join("rootfs.ext4"),
            digest: digest.trim().to_owned(),
            key: key.clone(),
            built,
        })
    };
    if dir.is_dir() {
        return cached(false);
    }
    fs::create_dir_all(&root).map_err(io_err("creating", &root))?;
    let _lock = lock(&root.join(format!("{key}.lock")))?;
    // Another builder may have finished while this one waited for the lock.
    if dir.is_dir() {
        return cached(false);
    }
    let tmp = root.join(format!(".tmp-{key}-{}", std::process::id()));
    if tmp.exists() {
        remove_tree(&tmp)?;
    }
    fs::create_dir_all(&tmp).map_err(io_err("creating", &tmp))?;
    let result = build_image(home, base, opts, oci.as_ref(), &key, &tmp, progress);
    if let Err(e) = result {
        let _ = remove_tree(&tmp);
        return Err(e);
    }
    let mut text = String::new();
    for (k, v) in &inputs {
        let v = if v.contains('\n') {
            format!("sha256:{}", hex::encode(Sha256::digest(v.as_bytes())))
        } else {
            v.clone()
        };
        let _ = writeln!(text, "{k}={v}");
    }
    fs::write(tmp.join("inputs"), text).map_err(io_err("writing", &tmp.join("inputs")))?;
    fs::rename(&tmp, &dir).map_err(io_err("renaming into place", &dir))?;
    cached(true)
}

fn remove_tree(p: &Path) -> Result<(), RootfsError> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", p)(e)),
    }
}

fn build_image(
    home: &Path,
    base: &Base,
    opts: &RootfsOptions,
    oci: Option<&crate::oci::OciImage>,
    key: &str,
    out: &Path,
    progress: &dyn Fn(&str),
) -> Result<(), RootfsError> {
    let started = Instant::now();
    let staging = out.join("tree");
    let image = out.join("rootfs.ext4");
    // Fix-ups mkfs cannot take from a tree built without root: owners and device nodes.
    let mut debugfs_script = String::new();
    match base {
        Base::Scratch => {
            minimal_tree(&staging, opts)?;
            root_owned(&staging, &mut debugfs_script)?;
            device_nodes(&mut debugfs_script);
        }
        Base::Busybox => {
            minimal_tree(&staging, opts)?;
            busybox_into(&staging)?;
            root_owned(&staging, &mut debugfs_script)?;
            device_nodes(&mut debugfs_script);
        }
        Base::Debian { suite } => {
            let tree = ensure_debootstrap(home, suite, progress)?;
            progress("linking the debootstrap tree");
            run(Command::new("cp").arg("-al").arg(&tree).arg(&staging))?;
            debian_additions(&staging, opts)?;
        }
        Base::Oci { .. } => {
            let image = oci.ok_or_else(|| RootfsError::Invalid("OCI base not resolved".into()))?;
            crate::oci::stage(image, out, &staging, opts, progress)?;
        }
    }
    progress("rendering ext4 with mkfs.ext4 -d");
    let f = File::create(&image).map_err(io_err("creating", &image))?;
    f.set_len(opts.disk_bytes / 4096 * 4096)
        .map_err(io_err("sizing", &image))?;
    drop(f);
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &key[0..8],
        &key[8..12],
        &key[12..16],
        &key[16..20],
        &key[20..32]
    );
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-L", "specc-root", "-U", &uuid])
        .arg("-E")
        .arg(format!("root_owner=0:0,hash_seed={uuid}"))
        .arg("-d")
        .arg(&staging)
        .arg(&image))?;
    if !debugfs_script.is_empty() {
        let script = out.join("fixups.debugfs");
        fs::write(&script, &debugfs_script).map_err(io_err("writing", &script))?;
        run(Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(&image))?;
        fs::remove_file(&script).map_err(io_err("removing", &script))?;
    }
    run(Command::new("e2fsck").arg("-fn").arg(&image))?;
    remove_tree(&staging)?;
    progress("hashing the image");
    let digest = sparse_digest(&image)?;
    fs::write(out.join("digest"), format!("{digest}\n"))
        .map_err(io_err("writing", &out.join("digest")))?;
    progress(&format!(
        "{} image built in {:.1} s",
        base.kind(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn mkdirs(root: &Path, dirs: &[(&str, u32)]) -> Result<(), RootfsError> {
    for (d, mode) in dirs {
        let p = root.join(d.trim_start_matches('/'));
        fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).map_err(io_err("chmod", &p))?;
    }
    Ok(())
}

/// Writes a file into a staging tree, replacing (never writing through) what is there: in a
/// debian staging tree the old file is a hard link into the shared debootstrap cache.
fn put(root: &Path, path: &str, content: &[u8], mode: u32) -> Result<(), RootfsError> {
    let p = root.join(path.trim_start_matches('/'));
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    }
    match fs::symlink_metadata(&p) {
        Ok(_) => fs::remove_file(&p).map_err(io_err("replacing", &p))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("stat", &p)(e)),
    }
    fs::write(&p, content).map_err(io_err("writing", &p))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &p))
}

fn put_symlink(root: &Path, path: &str, target: &str) -> Result<(), RootfsError> {
    let p = root.join(path.trim_start_matches('/'));
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    }
    if fs::symlink_metadata(&p).is_ok() {
        fs::remove_file(&p).map_err(io_err("replacing", &p))?;
    }
    symlink(target, &p).map_err(io_err("symlinking", &p))
}

fn copy_agent(root: &Path, guest_path: &str, opts: &RootfsOptions) -> Result<(), RootfsError> {
    let bytes = fs::read(&opts.agent_path).map_err(io_err("reading", &opts.agent_path))?;
    put(root, guest_path, &bytes, 0o755)
}

/// The tree shared by scratch and busybox: the agent as init and the mount points.
fn minimal_tree(root: &Path, opts: &RootfsOptions) -> Result<(), RootfsError> {
    mkdirs(
        root,
        &[
            ("/", 0o755),
            ("/dev", 0o755),
            ("/proc", 0o555),
            ("/sys", 0o555),
            ("/run", 0o755),
            ("/tmp", 0o1777),
            ("/root", 0o700),
            ("/etc", 0o755),
            ("/sbin", 0o755),
            ("/var", 0o755),
            ("/var/tmp", 0o1777),
            ("/home", 0o755),
            ("/mnt", 0o755),
        ],
    )?;
    copy_agent(root, AGENT_GUEST_PATH, opts)?;
    put_symlink(root, "/sbin/init", "specc-agent")?;
    put(root, "/etc/passwd", PASSWD.as_bytes(), 0o644)?;
    put(root, "/etc/group", GROUP.as_bytes(), 0o644)?;
    put(root, "/etc/shadow", SHADOW.as_bytes(), 0o640)?;
    put(root, "/etc/hosts", HOSTS.as_bytes(), 0o644)?;
    put(root, "/etc/hostname", b"specc\n", 0o644)?;
    Ok(())
}

/// Debian's static busybox as /bin/busybox with every applet linked to it, except those the
/// agent replaces (init).
fn busybox_into(root: &Path) -> Result<(), RootfsError> {
    let src = Path::new("/bin/busybox");
    check_static_elf(src).map_err(|_| RootfsError::BadAgent {
        path: src.to_owned(),
        why: "Debian's busybox-static must provide /bin/busybox (apt-get install busybox-static)"
            .into(),
    })?;
    mkdirs(
        root,
        &[("/bin", 0o755), ("/usr/bin", 0o755), ("/usr/sbin", 0o755)],
    )?;
    let bytes = fs::read(src).map_err(io_err("reading", src))?;
    put(root, "/bin/busybox", &bytes, 0o755)?;
    let list = run(Command::new(src).arg("--list-full"))?;
    for applet in String::from_utf8_lossy(&list).lines() {
        let applet = applet.trim();
        if applet.is_empty() || matches!(applet, "sbin/init" | "linuxrc" | "bin/busybox") {
            continue;
        }
        if applet.contains("..") || applet.starts_with('/') {
            continue;
        }
        put_symlink(root, applet, "/bin/busybox")?;
    }
    Ok(())
}

/// debugfs commands setting every inode of the tree to root:root.
fn root_owned(root: &Path, script: &mut String) -> Result<(), RootfsError> {
    fn walk(root: &Path, dir: &Path, script: &mut String) -> Result<(), RootfsError> {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .map_err(io_err("listing", dir))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(fs::DirEntry::file_name);
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).expect("walk stays under root");
            let guest = format!("/{}", rel.display());
            let _ = writeln!(script, "sif \"{guest}\" uid 0\nsif \"{guest}\" gid 0");
            if e.file_type().map_err(io_err("stat", &p))?.is_dir() {
                walk(root, &p, script)?;
            }
        }
        Ok(())
    }
    walk(root, root, script)
}

/// The device nodes the kernel needs before devtmpfs is mounted: init's console.
fn device_nodes(script: &mut String) {
    script.push_str("cd /dev\nmknod console c 5 1\nsif console mode 020600\nmknod null c 1 3\nsif null mode 020666\ncd /\n");
}

fn ensure_debootstrap(
    home: &Path,
    suite: &str,
    progress: &dyn Fn(&str),
) -> Result<PathBuf, RootfsError> {
    let inputs = debootstrap_inputs(suite)?;
    let key = digest_of(&inputs);
    let root = home.join("debootstrap");
    let dir = root.join(&key);
    if dir.is_dir() {
        return Ok(dir);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(RootfsError::NeedsRoot);
    }
    fs::create_dir_all(&root).map_err(io_err("creating", &root))?;
    let _lock = lock(&root.join(format!("{key}.lock")))?;
    if dir.is_dir() {
        return Ok(dir);
    }
    let tmp = root.join(format!(".tmp-{key}-{}", std::process::id()));
    remove_tree(&tmp)?;
    let mirror = inputs
        .iter()
        .find(|(k, _)| k == "mirror")
        .map(|(_, v)| v.clone())
        .expect("debootstrap_inputs has a mirror");
    progress(&format!(
        "debootstrap --variant=minbase {suite} from {mirror} (takes minutes, cached after)"
    ));
    let started = Instant::now();
    let result = run(Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", DEBIAN_INCLUDE.join(",")))
        .arg("--components=main")
        .arg(suite)
        .arg(&tmp)
        .arg(&mirror));
    if let Err(e) = result {
        let _ = remove_tree(&tmp);
        return Err(e);
    }
    progress(&format!(
        "apt-get install {}",
        DEBIAN_SECOND_STAGE.join(" ")
    ));
    let second = run(Command::new("chroot")
        .arg(&tmp)
        .args([
            "/usr/bin/apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
        ])
        .args(DEBIAN_SECOND_STAGE)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    .and_then(|_| {
        run(Command::new("chroot")
            .arg(&tmp)
            .args(["/usr/bin/apt-get", "clean"]))
    });
    if let Err(e) = second {
        let _ = remove_tree(&tmp);
        return Err(e);
    }
    // Downloaded packages are not part of the system.
    let archives = tmp.join("var/cache/apt/archives");
    if let Ok(rd) = fs::read_dir(&archives) {
        for e in rd.filter_map(Result::ok) {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    fs::rename(&tmp, &dir).map_err(io_err("renaming into place", &dir))?;
    progress(&format!(
        "debootstrap took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(dir)
}

/// The agent as a systemd service, DHCP on ethernet links, an identity to replace.
fn debian_additions(root: &Path, opts: &RootfsOptions) -> Result<(), RootfsError> {
    copy_agent(root, AGENT_DEBIAN_PATH, opts)?;
    put(
        root,
        "/etc/systemd/system/specc-agent.service",
        AGENT_UNIT.as_bytes(),
        0o644,
    )?;
    let wants = [
        (
            "/etc/systemd/system/multi-user.target.wants/specc-agent.service",
            "/etc/systemd/system/specc-agent.service",
        ),
        (
            "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
            "/lib/systemd/system/systemd-networkd.service",
        ),
    ];
    for (link, target) in wants {
        put_symlink(root, link, target)?;
    }
    put(
        root,
        "/etc/systemd/network/80-specc-dhcp.network",
        DHCP_NETWORK.as_bytes(),
        0o644,
    )?;
    for unit in DEBIAN_MASKED_UNITS {
        put_symlink(root, &format!("/etc/systemd/system/{unit}"), "/dev/null")?;
    }
    put(root, "/etc/hostname", b"specc\n", 0o644)?;
    put(root, "/etc/hosts", HOSTS.as_bytes(), 0o644)?;
    // Empty: systemd makes a transient id at boot; `Restored` writes a fresh one per clone.
    put(root, "/etc/machine-id", b"", 0o444)?;
    put(
        root,
        "/etc/fstab",
        b"# the root filesystem is mounted by the kernel (root=, rw)\n",
        0o644,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(request)
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs) must be installed");
        assert!(out.status.success(), "debugfs {request}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The names in the output of debugfs `ls` (entries look like `12  (12) name`).
    fn ls_names(out: &str) -> Vec<String> {
        out.split_whitespace()
            .filter(|t| !t.starts_with('(') && t.parse::<u64>().is_err())
            .map(str::to_owned)
            .collect()
    }

    fn e2fsck_clean(image: &Path) {
        let out = Command::new("e2fsck")
            .arg("-fn")
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "e2fsck -fn: {out:?}");
    }

    /// A static ELF that is not the agent, for tests about keys and caching (busybox-static is
    /// one). Copied so each test can change its content.
    fn fake_agent(dir: &Path, extra: &[u8]) -> PathBuf {
        let p = dir.join("fake-agent");
        let mut bytes = fs::read("/bin/busybox").expect("busybox-static provides /bin/busybox");
        bytes.extend_from_slice(extra);
        fs::write(&p, bytes).unwrap();
        p
    }

    fn small(agent: PathBuf) -> RootfsOptions {
        RootfsOptions {
            disk_bytes: 64 << 20,
            agent_path: agent,
        }
    }

    #[test]
    fn busybox_image_has_the_agent_as_init_applets_and_a_console() {
        let home = tempfile::tempdir().unwrap();
        let agent = agent_binary().expect("building the static agent");
        let opts = RootfsOptions {
            disk_bytes: DEFAULT_DISK_BYTES,
            agent_path: agent.clone(),
        };
        let img = ensure_rootfs_in(home.path(), &Base::Busybox, &opts, &|_| {}).unwrap();
        assert!(img.built);
        assert_eq!(
            img.path,
            home.path()
                .join("rootfs")
                .join(&img.key)
                .join("rootfs.ext4")
        );
        assert_eq!(fs::metadata(&img.path).unwrap().len(), DEFAULT_DISK_BYTES);
        assert_eq!(img.digest, sparse_digest(&img.path).unwrap());
        e2fsck_clean(&img.path);

        let root = debugfs(&img.path, "ls -l /");
        for d in [
            "bin", "sbin", "etc", "dev", "proc", "sys", "run", "tmp", "usr", "root",
        ] {
            assert!(
                root.split_whitespace().any(|w| w == d),
                "/{d} missing:\n{root}"
            );
        }
        let init = debugfs(&img.path, "stat /sbin/init");
        assert!(
            init.contains("Type: symlink") && init.contains("\"specc-agent\""),
            "{init}"
        );
        let sh = debugfs(&img.path, "stat /bin/sh");
        assert!(sh.contains("\"/bin/busybox\""), "{sh}");
        let console = debugfs(&img.path, "stat /dev/console");
        assert!(console.contains("Type: character special"), "{console}");
        let agent_stat = debugfs(&img.path, "stat /sbin/specc-agent");
        assert!(
            agent_stat.contains("User:     0   Group:     0"),
            "{agent_stat}"
        );
        assert!(agent_stat.contains("Mode:  0755"), "{agent_stat}");
        let passwd = debugfs(&img.path, "cat /etc/passwd");
        assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");

        // The agent in the image is byte for byte the one given.
        let dumped = home.path().join("dumped");
        debugfs(
            &img.path,
            &format!("dump /sbin/specc-agent {}", dumped.display()),
        );
        assert_eq!(sha256_file(&dumped).unwrap(), sha256_file(&agent).unwrap());

        // Second call: from the cache.
        let again = ensure_rootfs_in(home.path(), &Base::Busybox, &opts, &|_| {}).unwrap();
        assert!(!again.built);
        assert_eq!((again.path, again.digest), (img.path, img.digest));
    }

    #[test]
    fn scratch_image_holds_only_the_agent_and_mount_points() {
        let home = tempfile::tempdir().unwrap();
        let opts = small(fake_agent(home.path(), b""));
        let img = ensure_rootfs_in(home.path(), &Base::Scratch, &opts, &|_| {}).unwrap();
        e2fsck_clean(&img.path);
        let mut root = ls_names(&debugfs(&img.path, "ls /"));
        root.sort();
        assert_eq!(
            root,
            [
                ".",
                "..",
                "dev",
                "etc",
                "home",
                "lost+found",
                "mnt",
                "proc",
                "root",
                "run",
                "sbin",
                "sys",
                "tmp",
                "var"
            ]
        );
        let mut sbin = ls_names(&debugfs(&img.path, "ls /sbin"));
        sbin.sort();
        assert_eq!(sbin, [".", "..", "init", "specc-agent"]);
        let tmp = debugfs(&img.path, "stat /tmp");
        assert!(tmp.contains("Mode:  01777"), "{tmp}");
    }

    #[test]
    fn key_changes_with_the_agent_the_kind_and_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let a = small(fake_agent(dir.path(), b""));
        let k = |base: &Base, o: &RootfsOptions| digest_of(&key_inputs(base, o).unwrap());
        let base = k(&Base::Scratch, &a);
        assert_eq!(base, k(&Base::Scratch, &a), "key must be deterministic");
        assert_ne!(base, k(&Base::Busybox, &a));
        assert_ne!(
            base,
            k(
                &Base::Scratch,
                &RootfsOptions {
                    disk_bytes: 128 << 20,
                    ..a.clone()
                }
            )
        );
        let b = small(fake_agent(dir.path(), b"changed"));
        assert_ne!(base, k(&Base::Scratch, &b));
    }

    #[test]
    fn concurrent_builders_of_one_key_build_once() {
        let home = tempfile::tempdir().unwrap();
        let opts = small(fake_agent(home.path(), b""));
        let results: Vec<RootfsImage> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        ensure_rootfs_in(home.path(), &Base::Scratch, &opts, &|_| {}).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|r| r.built).count(), 1);
        assert!(results.iter().all(|r| r.digest == results[0].digest));
        let leftovers: Vec<_> = fs::read_dir(home.path().join("rootfs"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn dynamic_binaries_are_refused_as_agents() {
        let err = check_static_elf(Path::new("/bin/ls")).unwrap_err();
        assert!(matches!(err, RootfsError::BadAgent { .. }), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let not_elf = dir.path().join("script");
        fs::write(&not_elf, "#!/bin/sh\n").unwrap();
        assert!(check_static_elf(&not_elf).is_err());
        check_static_elf(Path::new("/bin/busybox")).unwrap();
    }

    #[test]
    fn tiny_disks_and_bad_suites_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RootfsOptions {
            disk_bytes: 1 << 20,
            agent_path: fake_agent(dir.path(), b""),
        };
        assert!(matches!(
            ensure_rootfs_in(dir.path(), &Base::Scratch, &opts, &|_| {}),
            Err(RootfsError::Invalid(_))
        ));
        let opts = small(opts.agent_path);
        assert!(matches!(
            ensure_rootfs_in(
                dir.path(),
                &Base::Debian {
                    suite: "../etc".into()
                },
                &opts,
                &|_| {}
            ),
            Err(RootfsError::Invalid(_))
        ));
    }

    #[test]
    fn mirror_is_read_from_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\n# comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n".to_owned();
        assert_eq!(
            mirror_from_sources(&[String::new(), deb822]).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let list = "# x\ndeb http://security.debian.org/ bookworm-security main\ndeb [arch=amd64] http://mirror.example/debian/ bookworm main\n".to_owned();
        assert_eq!(
            mirror_from_sources(&[list]).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(mirror_from_sources(&[String::new()]), None);
    }

    /// Slow the first time (debootstrap from the Debian mirror, minutes); then the tree and the
    /// image are cached under the real `$SPECC_HOME`, so later runs only re-check the image.
    #[test]
    fn debian_image_has_systemd_and_the_agent_service() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "base \"debian\" runs debootstrap, which needs root: run this test as root"
        );
        let opts = RootfsOptions {
            disk_bytes: DEFAULT_DISK_BYTES,
            agent_path: agent_binary().expect("building the static agent"),
        };
        let base = Base::Debian {
            suite: "bookworm".into(),
        };
        let img =
            ensure_rootfs_in(&specc_home(), &base, &opts, &|m| eprintln!("rootfs: {m}")).unwrap();
        e2fsck_clean(&img.path);
        let init = debugfs(&img.path, "stat /sbin/init");
        assert!(init.contains("/lib/systemd/systemd"), "{init}");
        let agent = debugfs(&img.path, "stat /usr/local/sbin/specc-agent");
        assert!(
            agent.contains("Mode:  0755") && agent.contains("User:     0"),
            "{agent}"
        );
        let unit = debugfs(&img.path, "cat /etc/systemd/system/specc-agent.service");
        assert!(
            unit.contains("ExecStart=/usr/local/sbin/specc-agent"),
            "{unit}"
        );
        let wants = debugfs(
            &img.path,
            "stat /etc/systemd/system/multi-user.target.wants/specc-agent.service",
        );
        assert!(wants.contains("Type: symlink"), "{wants}");
        let systemd = debugfs(&img.path, "stat /lib/systemd/systemd");
        assert!(systemd.contains("Type: regular"), "{systemd}");
        // Files keep their real owners (not everything is root in Debian).
        let shadow = debugfs(&img.path, "stat /etc/shadow");
        assert!(
            shadow.contains("Group:    42"),
            "/etc/shadow should belong to group shadow: {shadow}"
        );
        let resolv = debugfs(&img.path, "stat /etc/resolv.conf");
        assert!(resolv.contains("stub-resolv.conf"), "{resolv}");
        let resolved = debugfs(&img.path, "stat /lib/systemd/systemd-resolved");
        assert!(resolved.contains("Type: regular"), "{resolved}");
        // Without udev, systemd-networkd leaves every link pending (no DHCP, no network).
        // (`systemd-udevd` is a link to `udevadm`; its unit is started from sysinit.target.)
        let udevadm = debugfs(&img.path, "stat /usr/bin/udevadm");
        assert!(udevadm.contains("Type: regular"), "{udevadm}");
        let udevd = debugfs(
            &img.path,
            "stat /lib/systemd/system/sysinit.target.wants/systemd-udevd.service",
        );
        assert!(udevd.contains("Type: symlink"), "{udevd}");
        let masked = debugfs(&img.path, "stat /etc/systemd/system/apt-daily.timer");
        assert!(masked.contains("\"/dev/null\""), "{masked}");
        let mid = debugfs(&img.path, "stat /etc/machine-id");
        assert!(mid.contains("Size: 0"), "{mid}");
    }

    #[test]
    fn sparse_digest_ignores_hole_layout_but_not_content() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("sparse");
        let dense = dir.path().join("dense");
        let size = 10 * SPARSE_DIGEST_BLOCK + 123;
        let mut content = vec![0u8; usize::try_from(size).unwrap()];
        content[5] = 1;
        content[usize::try_from(7 * SPARSE_DIGEST_BLOCK + 9).unwrap()] = 2;
        *content.last_mut().unwrap() = 3;
        fs::write(&dense, &content).unwrap();
        {
            use std::os::unix::fs::FileExt;
            let f = File::create(&sparse).unwrap();
            f.set_len(size).unwrap();
            for (i, b) in content.iter().enumerate() {
                if *b != 0 {
                    f.write_at(&[*b], i as u64).unwrap();
                }
            }
        }
        let d = sparse_digest(&dense).unwrap();
        assert!(d.starts_with("sparse-sha256:"));
        assert_eq!(d, sparse_digest(&sparse).unwrap());
        // Same bytes, different size: different digest. One changed byte: different digest.
        fs::write(
            dir.path().join("longer"),
            [content.as_slice(), &[0]].concat(),
        )
        .unwrap();
        assert_ne!(d, sparse_digest(&dir.path().join("longer")).unwrap());
        content[usize::try_from(3 * SPARSE_DIGEST_BLOCK).unwrap()] = 9;
        fs::write(&dense, &content).unwrap();
        assert_ne!(d, sparse_digest(&dense).unwrap());
        // The definition, recomputed naively.
        let mut h = Sha256::new();
        h.update(size.to_le_bytes());
        for (i, block) in content
            .chunks(usize::try_from(SPARSE_DIGEST_BLOCK).unwrap())
            .enumerate()
        {
            if block.iter().any(|&b| b != 0) {
                h.update((i as u64).to_le_bytes());
                h.update(block);
            }
        }
        assert_eq!(
            sparse_digest(&dense).unwrap(),
            format!("sparse-sha256:{}", hex::encode(h.finalize()))
        );
    }

    /// Kills the VM when a test fails half way.
    struct Qemu(std::process::Child);

    impl Drop for Qemu {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The busybox image with the real static agent, booted by QEMU (TCG, `-M microvm`) on the
    /// project's guest kernel; the agent is reached over a virtio-serial port
    /// (`--listen serial:...` after `--` on the kernel command line), since this host has no
    /// vhost-vsock. Exercises PID 1 on a real kernel, exec, files, a pty, `restored` (clock,
    /// RNDADDENTROPY, hostname, machine id) and power off through a reset.
    #[test]
    fn busybox_image_boots_in_qemu_and_the_agent_serves_it() {
        use specc_protocol::{
            Client, ExecRequest, PtySize, RestoredRequest, User, WriteFileRequest,
        };

        let kernel = crate::kernel::ensure_kernel(crate::kernel::KernelKind::Guest, &|m| {
            eprintln!("kernel: {m}")
        })
        .expect("building the guest kernel (linux-source-6.1)");
        let home = tempfile::tempdir().unwrap();
        let opts = RootfsOptions {
            disk_bytes: 256 << 20,
            agent_path: agent_binary().expect("building the static agent"),
        };
        let img = ensure_rootfs_in(home.path(), &Base::Busybox, &opts, &|_| {}).unwrap();
        let sock = home.path().join("agent.sock");
        let serial = home.path().join("serial.log");
        let qemu = Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,acpi=off",
                "-cpu",
                "max",
                "-m",
                "256",
                "-smp",
                "1",
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&kernel.bzimage)
            .arg("-append")
            // Not `-- --listen ...`: QEMU appends its virtio_mmio.device= parameters, which
            // would then go to init instead of the kernel.
            .arg(concat!(
                "console=ttyS0 root=/dev/vda rw reboot=k panic=-1 ",
                "SPECC_AGENT_LISTEN=virtio-port:specc.agent"
            ))
            .arg("-drive")
            .arg(format!(
                "id=root,file={},format=raw,if=none",
                img.path.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"])
            .args(["-device", "virtio-serial-device"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                sock.display()
            ))
            .args(["-device", "virtserialport,chardev=agent,name=specc.agent"])
            .args(["-device", "virtio-rng-device"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (Debian's qemu-system-x86) must be installed");
        let mut qemu = Qemu(qemu);
        // Boot under TCG on a busy machine can be slow; give up only when QEMU has exited or
        // after 10 minutes, with the guest's console in the message either way.
        let mut c = None;
        for _ in 0..30 {
            if let Some(status) = qemu.0.try_wait().unwrap() {
                panic!(
                    "qemu exited ({status}) before the agent answered:\n{}",
                    fs::read_to_string(&serial).unwrap_or_default()
                );
            }
            if let Ok(client) = Client::connect_unix(&sock, Duration::from_secs(20)) {
                c = Some(client);
                break;
            }
        }
        let mut c = c.unwrap_or_else(|| {
            panic!(
                "the agent never answered:\n{}",
                fs::read_to_string(&serial).unwrap_or_default()
            )
        });
        assert!(c.info().pid1);
        assert_eq!(c.info().hostname, "specc");

        let sh = |c: &mut Client<_>, req: ExecRequest| {
            let out = c.exec_output(&req).unwrap();
            assert!(out.status.success(), "{req:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let cmd = |s: &str| ExecRequest::new(["sh", "-c", s]);
        assert!(sh(&mut c, cmd("uname -r")).starts_with("6.1"));
        let mounts = sh(&mut c, cmd("cat /proc/mounts"));
        assert!(mounts.contains("/dev/root / ext4 rw"), "{mounts}");
        assert!(mounts.contains("devpts /dev/pts"), "{mounts}");
        let nobody = ExecRequest {
            user: Some(User::Name("nobody".into())),
            ..cmd("id -u; id -g")
        };
        assert_eq!(sh(&mut c, nobody), "65534\n65534\n");

        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i % 251).to_le_bytes()[0])
            .collect();
        let req = WriteFileRequest {
            create_parents: true,
            mode: 0o600,
            ..WriteFileRequest::new("/root/deep/blob")
        };
        c.write_file(&req, &data).unwrap();
        assert_eq!(c.read_file("/root/deep/blob").unwrap(), data);
        assert_eq!(c.stat("/root/deep/blob", false).unwrap().mode, 0o600);

        let tty = ExecRequest {
            pty: Some(PtySize { rows: 30, cols: 90 }),
            ..cmd("tty; stty size")
        };
        let tty = sh(&mut c, tty);
        assert!(
            tty.contains("/dev/pts/") && tty.contains("30 90"),
            "{tty:?}"
        );

        let mut restored = RestoredRequest::fresh(Some("clone-1".into())).unwrap();
        restored.unix_time_ns = 1_900_000_000 * 1_000_000_000;
        let ack = c.restored(&restored).unwrap();
        assert_eq!(ack.entropy_bytes, 64);
        let now: u64 = sh(&mut c, cmd("date +%s")).trim().parse().unwrap();
        assert!(
            (1_900_000_000..1_900_003_600).contains(&now),
            "guest clock {now}"
        );
        assert_eq!(sh(&mut c, cmd("hostname")), "clone-1\n");
        assert_eq!(
            c.read_file("/etc/machine-id").unwrap(),
            format!("{}\n", restored.machine_id.unwrap()).into_bytes()
        );

        c.power_off().unwrap();
        // Without ACPI the agent powers off through a reset. QEMU's microvm does not end on
        // that reset even with -no-reboot (it boots again), so the proof is the kernel's
        // restart line on the console (or QEMU having exited).
        let mut reset = false;
        for _ in 0..6000 {
            let log = fs::read_to_string(&serial).unwrap_or_default();
            if log.contains("reboot: Restarting system") || qemu.0.try_wait().unwrap().is_some() {
                reset = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(reset, "the guest never reset after power_off");
        drop(qemu);
        let log = fs::read_to_string(&serial).unwrap();
        for line in [
            "specc-agent: starting as PID 1",
            "lo is up",
            "powering off through a reset",
        ] {
            assert!(log.contains(line), "serial log lacks {line:?}:\n{log}");
        }
    }
}

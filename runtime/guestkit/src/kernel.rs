//! Kernel builds: Debian's `linux-source-6.1` on `make tinyconfig` plus one of the project's
//! config fragments, cached under `$SPECC_HOME/kernels/<digest>/`.
//!
//! One mechanism builds both kernels: the guest kernel that the VMM boots, and the rig kernel
//! (the emulated KVM host that runs the VMM on machines without hardware virtualization).
//!
//! Cache layout under `$SPECC_HOME/kernels/`:
//!
//! ```text
//! src/<dpkg version>/          the extracted source tree, shared by every build
//! src.lock                     held while extracting
//! <digest>/vmlinux             ELF, 64-bit boot protocol (and a PVH note)
//! <digest>/bzImage             the same kernel, compressed, bzImage boot protocol
//! <digest>/config              the final .config
//! <digest>/fragment.config     the fragment it was built from
//! <digest>/build-info          kind, source version, builder version
//! <digest>.lock                held while building <digest>
//! build/<digest>/              the O= build tree (removed after success)
//! build/<digest>.log           the build's output (kept for failures)
//! ```
//!
//! Architecture invariant: `<digest>/` only ever appears complete. It is assembled in a
//! temporary directory beside it and renamed into place, and builders of one digest serialize on
//! `<digest>.lock`, so a crash or a concurrent builder never leaves or sees half a kernel.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::lock::FileLock;

/// Bumped whenever the build steps change in a way that changes the output.
pub const BUILDER_VERSION: &str = "specc-kernel-builder 1";

/// The Debian package the kernels are built from.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";

/// Where Debian's `linux-source-6.1` package puts its tarball.
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

const GUEST_FRAGMENT: &str = include_str!("../kernel/guest.config");
const RIG_FRAGMENT: &str = include_str!("../kernel/rig.config");

/// Symbols the guest kernel must have, independent of how the fragment spells them: what the VMM's
/// devices, the agent, systemd and containers rely on.
pub const GUEST_REQUIRED: &[&str] = &[
    "64BIT",
    "SMP",
    "X86_MPPARSE",
    "VIRTIO_MMIO",
    "VIRTIO_MMIO_CMDLINE_DEVICES",
    "VIRTIO_BLK",
    "VIRTIO_NET",
    "VSOCKETS",
    "VIRTIO_VSOCKETS",
    "HW_RANDOM_VIRTIO",
    "VIRTIO_CONSOLE",
    "EXT4_FS",
    "OVERLAY_FS",
    "SERIAL_8250",
    "SERIAL_8250_CONSOLE",
    "DEVTMPFS",
    "DEVTMPFS_MOUNT",
    "UNIX",
    "INET",
    "CGROUPS",
    "MEMCG",
    "CGROUP_BPF",
    "NAMESPACES",
    "USER_NS",
    "PID_NS",
    "NET_NS",
    "SECCOMP",
    "SECCOMP_FILTER",
    "KVM_GUEST",
    "PARAVIRT",
    "PARAVIRT_CLOCK",
    "INOTIFY_USER",
    "SIGNALFD",
    "TIMERFD",
    "EPOLL",
    "FHANDLE",
    "PROC_FS",
    "SYSFS",
    "TMPFS_POSIX_ACL",
    "TMPFS_XATTR",
    "AUTOFS_FS",
    "BINFMT_ELF",
    "BINFMT_SCRIPT",
];

/// Symbols the guest kernel must not have.
pub const GUEST_FORBIDDEN: &[&str] = &["MODULES"];

/// Symbols the rig kernel must have: a hardware-style `/dev/kvm` under QEMU TCG, the host tree
/// over virtio-9p and the host channel over virtio-serial.
pub const RIG_REQUIRED: &[&str] = &[
    "64BIT",
    "SMP",
    "KVM",
    "KVM_AMD",
    "KVM_INTEL",
    "HIGH_RES_TIMERS",
    "X86_LOCAL_APIC",
    "SECCOMP",
    "SECCOMP_FILTER",
    "VIRTIO_MMIO",
    "VIRTIO_MMIO_CMDLINE_DEVICES",
    "NET_9P",
    "NET_9P_VIRTIO",
    "9P_FS",
    "9P_FS_POSIX_ACL",
    "VIRTIO_CONSOLE",
    "TMPFS",
    "DEVTMPFS",
    "VIRTIO_BLK",
    "UNIX",
    "INET",
    "VIRTIO_NET",
    "TUN",
    "BINFMT_ELF",
    "BINFMT_SCRIPT",
    "BLK_DEV_INITRD",
    "RTC_DRV_CMOS",
    "RTC_HCTOSYS",
    "TRANSPARENT_HUGEPAGE",
    "EVENTFD",
];

/// Which of the project's kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// The microVM guest kernel the VMM boots.
    Guest,
    /// The kernel of the emulated KVM host (the rig).
    Rig,
}

impl KernelKind {
    /// The name used in messages and in `build-info`.
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Guest => "guest",
            KernelKind::Rig => "rig",
        }
    }

    /// The config fragment merged onto `tinyconfig` for this kernel.
    pub fn fragment(self) -> &'static str {
        match self {
            KernelKind::Guest => GUEST_FRAGMENT,
            KernelKind::Rig => RIG_FRAGMENT,
        }
    }

    /// Symbols that must be `=y` in the final `.config`.
    pub fn required_symbols(self) -> &'static [&'static str] {
        match self {
            KernelKind::Guest => GUEST_REQUIRED,
            KernelKind::Rig => RIG_REQUIRED,
        }
    }

    /// Symbols that must be unset in the final `.config`.
    pub fn forbidden_symbols(self) -> &'static [&'static str] {
        GUEST_FORBIDDEN
    }
}

/// A built kernel in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelArtifacts {
    /// The uncompressed ELF kernel.
    pub vmlinux: PathBuf,
    /// The compressed bzImage of the same build.
    pub bzimage: PathBuf,
    /// The final `.config`.
    pub config: PathBuf,
    /// The cache digest (hex sha256 of source version, fragment and builder version).
    pub digest: String,
}

/// Errors of the kernel builder.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// `dpkg-query` could not tell the version of `linux-source-6.1`.
    #[error(
        "cannot find the Debian package {SOURCE_PACKAGE} (install it: apt-get install {SOURCE_PACKAGE})"
    )]
    SourceMissing(#[source] io::Error),
    /// A file system operation in the cache failed.
    #[error("{what} {path}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A build step exited unsuccessfully.
    #[error("kernel build step `{step}` failed ({status}); log: {log}\n{tail}")]
    StepFailed {
        /// The step, as a command line.
        step: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The full log.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// The final `.config` lacks symbols the fragment or the requirements ask for.
    #[error("the {kind} kernel's final .config does not match its fragment: {}", .problems.join(", "))]
    ConfigMismatch {
        /// Which kernel.
        kind: &'static str,
        /// One entry per symbol, e.g. `CONFIG_KVM=y wanted, not set`.
        problems: Vec<String>,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KernelError {
    let path = path.to_path_buf();
    move |source| KernelError::Io { what, path, source }
}

/// `$SPECC_HOME`, or `$XDG_CACHE_HOME/specc`, or `~/.cache/specc`.
pub fn specc_home() -> PathBuf {
    if let Some(home) = std::env::var_os("SPECC_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(cache).join("specc");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache").join("specc")
}

/// The installed version of Debian's `linux-source-6.1`.
pub fn source_version() -> Result<String, KernelError> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", SOURCE_PACKAGE])
        .stderr(Stdio::null())
        .output()
        .map_err(KernelError::SourceMissing)?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version.is_empty() || !Path::new(SOURCE_TARBALL).is_file() {
        return Err(KernelError::SourceMissing(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{SOURCE_PACKAGE} not installed or {SOURCE_TARBALL} missing"),
        )));
    }
    Ok(version)
}

/// The cache digest of a kernel: sha256 over builder version, kind, source version and fragment.
pub fn digest_for(kind: KernelKind, source_version: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        BUILDER_VERSION,
        kind.name(),
        source_version,
        kind.fragment(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The kernel cache directory, `$SPECC_HOME/kernels`.
pub fn kernels_dir() -> PathBuf {
    specc_home().join("kernels")
}

fn artifacts_in(dir: &Path, digest: &str) -> KernelArtifacts {
    KernelArtifacts {
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        config: dir.join("config"),
        digest: digest.to_string(),
    }
}

/// The cached kernel of this kind, if it was built already. Never builds.
pub fn cached_kernel(kind: KernelKind) -> Result<Option<KernelArtifacts>, KernelError> {
    let digest = digest_for(kind, &source_version()?);
    let dir = kernels_dir().join(&digest);
    Ok(dir.is_dir().then(|| artifacts_in(&dir, &digest)))
}

/// Returns the cached kernel of this kind, building it first if needed (about 3 minutes on
/// 2 cores). `progress` receives one line per build step.
pub fn ensure_kernel(
    kind: KernelKind,
    progress: &dyn Fn(&str),
) -> Result<KernelArtifacts, KernelError> {
    let version = source_version()?;
    let digest = digest_for(kind, &version);
    let root = kernels_dir();
    let dir = root.join(&digest);
    if dir.is_dir() {
        return Ok(artifacts_in(&dir, &digest));
    }
    fs::create_dir_all(&root).map_err(io_err("creating", &root))?;
    let _lock = lock(&root.join(format!("{digest}.lock")))?;
    // Another builder may have finished while this one waited for the lock.
    if dir.is_dir() {
        return Ok(artifacts_in(&dir, &digest));
    }
    let src = ensure_source(&root, &version, progress)?;
    build(kind, &root, &src, &digest, &version, progress)?;
    Ok(artifacts_in(&dir, &digest))
}

/// Takes the builder lock on `path`.
fn lock(path: &Path) -> Result<FileLock, KernelError> {
    FileLock::acquire(path).map_err(|(what, e)| io_err(what, path)(e))
}

fn ensure_source(
    root: &Path,
    version: &str,
    progress: &dyn Fn(&str),
) -> Result<PathBuf, KernelError> {
    let src_root = root.join("src");
    let src = src_root.join(version);
    if src.is_dir() {
        return Ok(src);
    }
    fs::create_dir_all(&src_root).map_err(io_err("creating", &src_root))?;
    let _lock = lock(&root.join("src.lock"))?;
    if src.is_dir() {
        return Ok(src);
    }
    progress(&format!("extracting {SOURCE_TARBALL} (once)"));
    let tmp = src_root.join(format!(".tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err("removing", &tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err("creating", &tmp))?;
    let log = root.join("src-extract.log");
    run_step(
        Command::new("tar")
            .arg("-xf")
            .arg(SOURCE_TARBALL)
            .current_dir(&tmp),
        &log,
    )?;
    let top = tmp.join(SOURCE_PACKAGE);
    fs::rename(&top, &src).map_err(io_err("renaming into place", &src))?;
    fs::remove_dir_all(&tmp).map_err(io_err("removing", &tmp))?;
    Ok(src)
}

fn build(
    kind: KernelKind,
    root: &Path,
    src: &Path,
    digest: &str,
    version: &str,
    progress: &dyn Fn(&str),
) -> Result<(), KernelError> {
    let build_root = root.join("build");
    let out = build_root.join(digest);
    let log = build_root.join(format!("{digest}.log"));
    if out.exists() {
        // Left over from a builder that died; this process holds the digest's lock now.
        fs::remove_dir_all(&out).map_err(io_err("removing stale build dir", &out))?;
    }
    fs::create_dir_all(&out).map_err(io_err("creating", &out))?;
    File::create(&log).map_err(io_err("creating", &log))?;
    let fragment_path = out.join("specc-fragment.config");
    fs::write(&fragment_path, kind.fragment()).map_err(io_err("writing", &fragment_path))?;

    let make = |target: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.arg("-C")
            .arg(src)
            .arg(format!("O={}", out.display()))
            .arg("ARCH=x86_64");
        cmd.args(target);
        // A jobserver inherited from cargo would make this make wait on tokens it never gets.
        for var in ["MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CARGO_MAKEFLAGS"] {
            cmd.env_remove(var);
        }
        cmd
    };
    progress(&format!(
        "configuring the {} kernel (tinyconfig + fragment)",
        kind.name()
    ));
    run_step(&mut make(&["tinyconfig"]), &log)?;
    let config = out.join(".config");
    run_step(
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .arg("-m")
            .arg("-O")
            .arg(&out)
            .arg(&config)
            .arg(&fragment_path)
            .current_dir(src),
        &log,
    )?;
    run_step(&mut make(&["olddefconfig"]), &log)?;
    let final_config = fs::read_to_string(&config).map_err(io_err("reading", &config))?;
    check_config(kind, &final_config)?;

    let jobs = std::env::var("SPECC_KERNEL_JOBS").unwrap_or_else(|_| "2".to_string());
    progress(&format!(
        "compiling the {} kernel (make -j{jobs}, about 3 minutes)",
        kind.name()
    ));
    run_step(
        &mut make(&[&format!("-j{jobs}"), "vmlinux", "bzImage"]),
        &log,
    )?;

    let tmp = root.join(format!(".tmp-{digest}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err("removing", &tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err("creating", &tmp))?;
    for (from, to) in [
        (out.join("vmlinux"), "vmlinux"),
        (out.join("arch/x86/boot/bzImage"), "bzImage"),
        (config.clone(), "config"),
        (fragment_path.clone(), "fragment.config"),
    ] {
        fs::copy(&from, tmp.join(to)).map_err(io_err("copying", &from))?;
    }
    let info = format!(
        "kind={}\nsource={SOURCE_PACKAGE} {version}\nbuilder={BUILDER_VERSION}\n",
        kind.name()
    );
    fs::write(tmp.join("build-info"), info).map_err(io_err("writing build-info in", &tmp))?;
    let dir = root.join(digest);
    fs::rename(&tmp, &dir).map_err(io_err("renaming into place", &dir))?;
    fs::remove_dir_all(&out).map_err(io_err("removing", &out))?;
    progress(&format!(
        "{} kernel cached at {}",
        kind.name(),
        dir.display()
    ));
    Ok(())
}

fn run_step(cmd: &mut Command, log: &Path) -> Result<(), KernelError> {
    let file = File::options()
        .append(true)
        .create(true)
        .open(log)
        .map_err(io_err("opening", log))?;
    let err_file = file.try_clone().map_err(io_err("opening", log))?;
    let step = format!("{cmd:?}");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err_file)
        .status()
        .map_err(io_err("running a build step, logging to", log))?;
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    File::open(log)
        .and_then(|mut f| f.read_to_string(&mut text))
        .ok();
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    Err(KernelError::StepFailed {
        step,
        status,
        log: log.to_path_buf(),
        tail,
    })
}

/// A `.config` as symbol (without `CONFIG_`) → value; unset symbols are absent.
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("CONFIG_"))
        .filter_map(|rest| rest.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What a fragment asks for: symbol → `Some(value)` or `None` for "is not set".
pub fn parse_fragment(text: &str) -> BTreeMap<String, Option<String>> {
    let mut wanted = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some((k, v)) = line.strip_prefix("CONFIG_").and_then(|r| r.split_once('=')) {
            wanted.insert(k.to_string(), (v != "n").then(|| v.to_string()));
        } else if let Some(k) = line
            .strip_prefix("# CONFIG_")
            .and_then(|r| r.strip_suffix(" is not set"))
        {
            wanted.insert(k.to_string(), None);
        }
    }
    wanted
}

/// Problems of a final `.config` against the kind's fragment and its required and forbidden
/// symbols; empty when the kernel has everything.
pub fn config_problems(kind: KernelKind, final_config: &str) -> Vec<String> {
    let have = parse_config(final_config);
    let mut problems = Vec::new();
    let show = |v: Option<&String>| v.map_or_else(|| "not set".to_string(), |v| format!("={v}"));
    for (sym, want) in parse_fragment(kind.fragment()) {
        let got = have.get(&sym);
        if want.as_ref() != got {
            let want = want.map_or_else(|| "unset".to_string(), |v| format!("={v}"));
            problems.push(format!("CONFIG_{sym}{want} wanted, {}", show(got)));
        }
    }
    for sym in kind.required_symbols() {
        let got = have.get(*sym);
        if got.map(String::as_str) != Some("y") {
            problems.push(format!("CONFIG_{sym}=y required, {}", show(got)));
        }
    }
    for sym in kind.forbidden_symbols() {
        if let Some(v) = have.get(*sym) {
            problems.push(format!("CONFIG_{sym} must be unset, is ={v}"));
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

fn check_config(kind: KernelKind, final_config: &str) -> Result<(), KernelError> {
    let problems = config_problems(kind, final_config);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(KernelError::ConfigMismatch {
            kind: kind.name(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_differs_by_kind_and_source_version() {
        let a = digest_for(KernelKind::Guest, "6.1.1-1");
        assert_eq!(a, digest_for(KernelKind::Guest, "6.1.1-1"));
        assert_ne!(a, digest_for(KernelKind::Rig, "6.1.1-1"));
        assert_ne!(a, digest_for(KernelKind::Guest, "6.1.1-2"));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn parse_fragment_reads_set_and_unset_symbols() {
        let f = parse_fragment("# c\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=n\nCONFIG_D=64\n");
        assert_eq!(f.get("A"), Some(&Some("y".to_string())));
        assert_eq!(f.get("B"), Some(&None));
        assert_eq!(f.get("C"), Some(&None));
        assert_eq!(f.get("D"), Some(&Some("64".to_string())));
    }

    #[test]
    fn config_problems_lists_each_missing_symbol() {
        let problems = config_problems(KernelKind::Rig, "CONFIG_64BIT=y\nCONFIG_MODULES=y\n");
        assert!(
            problems.iter().any(|p| p.starts_with("CONFIG_KVM_AMD=y")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("CONFIG_MODULES must be unset"))
        );
        assert!(
            !problems.iter().any(|p| p.starts_with("CONFIG_64BIT=")),
            "{problems:?}"
        );
    }

    #[test]
    fn every_required_symbol_is_asked_for_by_the_fragment() {
        for kind in [KernelKind::Guest, KernelKind::Rig] {
            let fragment = parse_fragment(kind.fragment());
            for sym in kind.required_symbols() {
                assert_eq!(
                    fragment.get(*sym),
                    Some(&Some("y".to_string())),
                    "{} fragment lacks CONFIG_{sym}=y",
                    kind.name()
                );
            }
        }
    }

    fn assert_built_kernel(kind: KernelKind) {
        let k = ensure_kernel(kind, &|m| eprintln!("{m}")).expect("kernel build");
        let config = fs::read_to_string(&k.config).expect("read final .config");
        let problems = config_problems(kind, &config);
        assert!(
            problems.is_empty(),
            "{} kernel lacks: {problems:#?}",
            kind.name()
        );
        let elf = fs::read(&k.vmlinux).expect("read vmlinux");
        assert_eq!(&elf[..5], b"\x7fELF\x02", "vmlinux is not a 64-bit ELF");
        let bz = fs::read(&k.bzimage).expect("read bzImage");
        assert_eq!(
            &bz[0x202..0x206],
            b"HdrS",
            "bzImage lacks the boot protocol header"
        );
        assert_eq!(
            k.digest,
            digest_for(kind, &source_version().expect("version"))
        );
    }

    #[test]
    fn guest_kernel_builds_with_every_required_symbol() {
        assert_built_kernel(KernelKind::Guest);
    }

    #[test]
    fn rig_kernel_builds_with_every_required_symbol() {
        assert_built_kernel(KernelKind::Rig);
    }

    #[test]
    fn file_lock_serializes_holders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.lock");
        let held = lock(&path).expect("first lock");
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let t = std::thread::spawn(move || {
            let _second = lock(&p).expect("second lock");
            tx.send(()).expect("send");
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err()
        );
        drop(held);
        rx.recv().expect("second holder got the lock after release");
        t.join().expect("join");
    }
}

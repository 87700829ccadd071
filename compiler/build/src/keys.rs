//! The cache-key inputs only the guest kit knows: digests of what the default kernel and each
//! root filesystem are made from ([`GuestKeys`], a [`specc_plan::KeyInputs`]). Every `specc`
//! command compiles with [`default_resolver`], so `plan`, `build` and `run` (and the
//! benchmarks) key layers alike.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use specc_guestkit::kernel::{self, KernelKind};
use specc_guestkit::rootfs;
use specc_plan::{Digest, KeyInputs, KeyResolver, ir};

/// The cache-key inputs of the guest kit:
///
/// - kernel: [`kernel::digest_for`] of the guest kernel, i.e. sha256 of the kernel builder's
///   version, the kind, the installed `linux-source-6.1` version and the config fragment, the
///   very digest the kernel cache is keyed by;
/// - root filesystem: [`rootfs::key`], the digest the image cache is keyed by: builder version,
///   kind, disk size, sha256 of the agent binary, `mke2fs` version, the image's fixed files,
///   and per kind the sha256 of `/bin/busybox`, the debootstrap recipe (suite, mirror, package
///   list, debootstrap version) plus the systemd units, or the OCI image's resolved manifest
///   digest (never the tag).
///
/// The agent is the one already built ([`rootfs::installed_agent_binary`]): hashing it costs
/// milliseconds, where asking cargo whether it is up to date costs a second. `specc build`
/// makes sure of it before building and re-keys if it changed (`rekey_if_agent_changed` in `specc`).
///
/// Answers for the kernel and the local bases are remembered in `cache` by the `stat` of every
/// file they were computed from (the specc executable, the agent, busybox, mke2fs, dpkg's
/// status file, apt's sources, the kernel tarball) and the mirror setting, the way the copy
/// digest cache remembers file digests; an OCI base is resolved every time (a tag may move).
#[derive(Debug)]
pub struct GuestKeys {
    cache: PathBuf,
    memo: Mutex<Option<BTreeMap<String, String>>>,
}

impl GuestKeys {
    /// Key inputs remembered in the JSON file `cache`.
    pub fn new(cache: PathBuf) -> Self {
        GuestKeys {
            cache,
            memo: Mutex::new(None),
        }
    }

    /// The hex digest for `fingerprint`, computing (and remembering) it with `compute` when
    /// unknown. `fingerprint` is `None` when a file it depends on cannot be stat'ed: then
    /// nothing is remembered.
    fn cached(
        &self,
        fingerprint: Option<String>,
        compute: impl FnOnce() -> Result<String, String>,
    ) -> Result<Digest, String> {
        let mut memo = self
            .memo
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let map = memo.get_or_insert_with(|| {
            std::fs::read(&self.cache)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default()
        });
        let hex = match fingerprint.as_ref().and_then(|f| map.get(f)) {
            Some(hex) => hex.clone(),
            None => {
                let hex = compute()?;
                if let Some(f) = fingerprint {
                    map.insert(f, hex.clone());
                    // Best effort, like the digest cache: failing to remember only costs time.
                    let _ = save_json(&self.cache, map);
                }
                hex
            }
        };
        Digest::parse(&hex).ok_or_else(|| format!("not a sha256 digest: {hex}"))
    }
}

fn save_json(path: &Path, map: &BTreeMap<String, String>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(
        &tmp,
        serde_json::to_vec(map).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

/// `dev:ino:size:mtime:ctime` of `path`, or `None` if it cannot be stat'ed.
fn stat_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}:{}:{}:{}.{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// The first `name` on `$PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A fingerprint line: `what`, then the stat of each file (a missing file makes it `None`),
/// then the extra words.
fn fingerprint(what: &str, files: &[PathBuf], extra: &[String]) -> Option<String> {
    let mut s = what.to_owned();
    let exe = std::env::current_exe().ok()?;
    for f in std::iter::once(&exe).chain(files) {
        s.push_str(&format!("|{}={}", f.display(), stat_of(f)?));
    }
    for e in extra {
        s.push('|');
        s.push_str(e);
    }
    Some(s)
}

const DPKG_STATUS: &str = "/var/lib/dpkg/status";

impl KeyInputs for GuestKeys {
    fn kernel(&self) -> Result<Digest, String> {
        let fp = fingerprint(
            "kernel-guest",
            &[DPKG_STATUS.into(), kernel::SOURCE_TARBALL.into()],
            &[],
        );
        self.cached(fp, || {
            let version = kernel::source_version().map_err(|e| error_chain(&e))?;
            Ok(kernel::digest_for(KernelKind::Guest, &version))
        })
    }

    fn rootfs(&self, base: &ir::Base, spec_dir: &Path, disk_bytes: u64) -> Result<Digest, String> {
        let base = guest_base(base, spec_dir)?;
        let agent = match rootfs::installed_agent_binary() {
            Some(a) => a,
            None => rootfs::agent_binary().map_err(|e| error_chain(&e))?,
        };
        let opts = rootfs::RootfsOptions {
            disk_bytes,
            agent_path: agent.clone(),
        };
        let compute = || rootfs::key(&base, &opts).map_err(|e| error_chain(&e));
        let fp = match &base {
            rootfs::Base::Oci { .. } => None,
            local => {
                let mut files = vec![agent.clone()];
                files.extend(on_path("mke2fs"));
                match local {
                    rootfs::Base::Busybox => files.push("/bin/busybox".into()),
                    rootfs::Base::Debian { .. } => {
                        files.push(DPKG_STATUS.into());
                        files.push("/etc/apt/sources.list".into());
                        files.extend(
                            std::fs::read_dir("/etc/apt/sources.list.d")
                                .into_iter()
                                .flatten()
                                .flatten()
                                .map(|e| e.path()),
                        );
                    }
                    _ => {}
                }
                let mirror = std::env::var("SPECC_DEBIAN_MIRROR").unwrap_or_default();
                fingerprint(
                    "rootfs",
                    &files,
                    &[format!("{local:?}"), disk_bytes.to_string(), mirror],
                )
            }
        };
        self.cached(fp, compute)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The root filesystem builder's base for a spec's base: a `base spec=` is followed to the
/// base it ultimately stands on, and a relative OCI layout path is relative to the directory
/// of the spec that names it.
pub fn guest_base(base: &ir::Base, spec_dir: &Path) -> Result<rootfs::Base, String> {
    Ok(match base {
        ir::Base::Scratch => rootfs::Base::Scratch,
        ir::Base::Busybox => rootfs::Base::Busybox,
        ir::Base::Debian { suite } => rootfs::Base::Debian {
            suite: suite.clone(),
        },
        ir::Base::Spec { spec, path } => {
            guest_base(&spec.base, path.parent().unwrap_or(Path::new(".")))?
        }
        ir::Base::Oci { reference } => rootfs::Base::Oci {
            reference: specc_guestkit::oci::ImageRef::parse(reference)
                .map_err(|e| error_chain(&e))?
                .relative_to(spec_dir)
                .to_reference(),
        },
    })
}

/// A resolver of [`GuestKeys`] remembering its answers at the default place,
/// `$SPECC_HOME/cache/key-inputs-v1.json`: what every `specc` command keys layers with.
pub fn default_resolver() -> KeyResolver {
    KeyResolver(Arc::new(GuestKeys::new(
        specc_plan::store::specc_home()
            .join("cache")
            .join("key-inputs-v1.json"),
    )))
}

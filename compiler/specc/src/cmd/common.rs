//! What the spec-reading subcommands share: compile options (with the one way every command
//! computes cache keys), and diagnostic output.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use specc_guestkit::kernel::{self, KernelKind};
use specc_guestkit::rootfs;
use specc_plan::{Digest, KeyInputs, KeyOverrides, KeyResolver, Options, ir};
use specc_syntax::{Diagnostic, Files};

/// Options that change how a spec compiles.
#[derive(Debug, Clone, clap::Args)]
pub struct CompileArgs {
    /// Set a param: `--param node_version=22` (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Search this directory for `<name>.kdl` integrations before the standard library.
    #[arg(long = "integrations", value_name = "DIR")]
    pub integration_dirs: Vec<PathBuf>,
    /// Digest of the default guest kernel in the keys (default: of its build inputs).
    #[arg(long, value_name = "SHA256")]
    pub kernel_digest: Option<String>,
    /// Digest of the base root filesystem in the keys (default: of its build inputs).
    #[arg(long, value_name = "SHA256")]
    pub base_digest: Option<String>,
}

impl CompileArgs {
    /// The library options. Every subcommand compiles with these, so `plan`, `build` and `run`
    /// key layers alike: by the digests of the kernel's and the root filesystem's real inputs
    /// ([`GuestKeys`]).
    pub fn options(&self) -> anyhow::Result<Options> {
        let mut params = Vec::new();
        for p in &self.params {
            let Some((k, v)) = p.split_once('=') else {
                bail!("--param wants NAME=VALUE, got `{p}`");
            };
            params.push((k.to_owned(), v.to_owned()));
        }
        let digest = |s: &Option<String>, what: &str| -> anyhow::Result<Option<Digest>> {
            s.as_deref()
                .map(|s| {
                    Digest::parse(s)
                        .with_context(|| format!("--{what} wants 64 hex digits, got `{s}`"))
                })
                .transpose()
        };
        Ok(Options {
            params,
            integration_dirs: self.integration_dirs.clone(),
            keys: KeyOverrides {
                kernel: digest(&self.kernel_digest, "kernel-digest")?,
                base: digest(&self.base_digest, "base-digest")?,
            },
            resolver: Some(KeyResolver(Arc::new(GuestKeys::new(
                specc_plan::store::specc_home()
                    .join("cache")
                    .join("key-inputs-v1.json"),
            )))),
            ..Options::with_default_cache()
        })
    }
}

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
/// makes sure of it before building and re-keys if it changed ([`rekey_if_agent_changed`]).
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
        let base = guest_base(base, spec_dir).map_err(|e| format!("{e:#}"))?;
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
pub fn guest_base(base: &ir::Base, spec_dir: &Path) -> anyhow::Result<rootfs::Base> {
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
            reference: specc_guestkit::oci::ImageRef::parse(reference)?
                .relative_to(spec_dir)
                .to_reference(),
        },
    })
}

/// The base digest of the spec that `spec` ultimately stands on (following `base spec=`): the
/// one [`GuestKeys::rootfs`] gave, unless overridden.
fn root_base_digest(spec: &ir::Spec) -> Digest {
    match &spec.base {
        ir::Base::Spec { spec, .. } => root_base_digest(spec),
        _ => spec.base_digest,
    }
}

/// After `specc build` prepared the guest (which builds the agent if its sources changed), the
/// spec's keys are re-computed if the root filesystem just prepared is not the one they were
/// computed for: the keys always describe the image the layers are really built on. Returns
/// the compilation to build from.
pub fn rekey_if_agent_changed(
    file: &Path,
    opts: &Options,
    compiled: specc_plan::Compilation,
    rootfs_key: &str,
) -> anyhow::Result<specc_plan::Compilation> {
    let Some(spec) = &compiled.spec else {
        return Ok(compiled);
    };
    if opts.keys.base.is_some() || Digest::parse(rootfs_key) == Some(root_base_digest(spec)) {
        return Ok(compiled);
    }
    Ok(specc_plan::compile(file, opts)?)
}

/// How diagnostics are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// miette reports with source snippets, on stderr.
    #[default]
    Human,
    /// One JSON object per line, on stdout.
    Json,
}

/// Prints diagnostics in the chosen format.
pub fn print_diagnostics(
    diags: &[Diagnostic],
    files: &Files,
    format: Format,
) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            let mut out = std::io::stdout().lock();
            for d in diags {
                serde_json::to_writer(&mut out, &d.to_record(files))?;
                out.write_all(b"\n")?;
            }
        }
        Format::Human => {
            let theme = if std::io::stderr().is_terminal() {
                miette::GraphicalTheme::unicode()
            } else {
                miette::GraphicalTheme::unicode_nocolor()
            };
            let handler = miette::GraphicalReportHandler::new_themed(theme);
            let mut err = std::io::stderr().lock();
            for d in diags {
                let mut s = String::new();
                handler.render_report(&mut s, &d.to_miette(files))?;
                err.write_all(s.as_bytes())?;
            }
        }
    }
    Ok(())
}

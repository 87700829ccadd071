//! What the spec-reading subcommands share: compile options (with the one way every command
//! computes cache keys), and diagnostic output.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use specc_plan::{Digest, KeyOverrides, Options, ir};
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
    /// ([`specc_build::keys::GuestKeys`]).
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
            resolver: Some(specc_build::keys::default_resolver()),
            ..Options::with_default_cache()
        })
    }
}

/// The base digest of the spec that `spec` ultimately stands on (following `base spec=`): the
/// one `GuestKeys::rootfs` gave, unless overridden.
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

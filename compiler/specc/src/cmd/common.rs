//! What the spec-reading subcommands share: compile options and diagnostic output.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use specc_plan::{Digest, KeyOverrides, Options};
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
    /// Digest of the guest kernel (default: digest of the default kernel description).
    #[arg(long, value_name = "SHA256")]
    pub kernel_digest: Option<String>,
    /// Digest of the base root filesystem (default: digest of the canonical base description).
    #[arg(long, value_name = "SHA256")]
    pub base_digest: Option<String>,
}

impl CompileArgs {
    /// The library options.
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
            ..Options::with_default_cache()
        })
    }
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

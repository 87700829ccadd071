//! `specc fmt`: canonical formatting, comments kept.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use specc_syntax::Files;

use super::common::{Format, print_diagnostics};

/// Arguments of `specc fmt`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Spec files, rewritten in place.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Change nothing; exit 1 if any file is not formatted.
    #[arg(long)]
    pub check: bool,
}

/// Formats each file; exit 1 on invalid KDL or (with `--check`) an unformatted file.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for path in &args.files {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut files = Files::new();
        let id = files.add(path.display().to_string(), text.as_str());
        match specc_syntax::format::format(id, &text) {
            Err(diags) => {
                print_diagnostics(&diags, &files, Format::Human)?;
                failed = true;
            }
            Ok(formatted) if formatted == text => {}
            Ok(formatted) => {
                if args.check {
                    println!("{}: not formatted", path.display());
                    failed = true;
                } else {
                    std::fs::write(path, formatted)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    println!("{}: formatted", path.display());
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

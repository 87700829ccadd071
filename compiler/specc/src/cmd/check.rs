//! `specc check`.

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `specc check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Spec files.
    pub files: Vec<PathBuf>,
}

/// Runs `specc check`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "specc check is being written (issue 3); got {} file(s)",
        args.files.len()
    )
}

//! `specc fmt`.

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `specc fmt`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Spec files.
    pub files: Vec<PathBuf>,
}

/// Runs `specc fmt`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "specc fmt is being written (issue 3); got {} file(s)",
        args.files.len()
    )
}

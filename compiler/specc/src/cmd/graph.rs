//! `specc graph`.

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `specc graph`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Spec files.
    pub files: Vec<PathBuf>,
}

/// Runs `specc graph`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "specc graph is being written (issue 3); got {} file(s)",
        args.files.len()
    )
}

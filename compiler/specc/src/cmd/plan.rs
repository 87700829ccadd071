//! `specc plan`.

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `specc plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Spec files.
    pub files: Vec<PathBuf>,
}

/// Runs `specc plan`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "specc plan is being written (issue 3); got {} file(s)",
        args.files.len()
    )
}

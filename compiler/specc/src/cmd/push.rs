//! `specc push DIR REF`: upload an OCI layout's snapshot to a registry.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use specc_store::registry::{self, Options};

/// Arguments of `specc push`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The OCI image layout (`specc build -o DIR`).
    dir: PathBuf,
    /// Where to: `host[:port]/repository[:tag|@digest]`.
    reference: String,
    /// Plain HTTP even if the registry is not on loopback.
    #[arg(long)]
    insecure: bool,
}

/// Runs `specc push`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let t = Instant::now();
    let report = registry::push(
        &args.dir,
        &args.reference,
        &Options {
            insecure: args.insecure,
            ..Options::default()
        },
    )
    .with_context(|| format!("push {} to {}", args.dir.display(), args.reference))?;
    println!(
        "pushed {} to {}: {} blobs uploaded ({:.1} MiB), {} already there, {:.2?}",
        report.manifest_digest,
        args.reference,
        report.uploaded.len(),
        report.bytes_uploaded as f64 / f64::from(1u32 << 20),
        report.skipped.len(),
        t.elapsed()
    );
    Ok(ExitCode::SUCCESS)
}

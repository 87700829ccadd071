//! `specc pull REF`: download a snapshot from a registry into the store (or a layout).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use specc_store::Store;
use specc_store::oci;
use specc_store::registry::{self, Options};

/// Arguments of `specc pull`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What: `host[:port]/repository[:tag|@digest]`.
    reference: String,
    /// Write the OCI image layout here instead of importing it into the store.
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    output: Option<PathBuf>,
    /// Plain HTTP even if the registry is not on loopback.
    #[arg(long)]
    insecure: bool,
}

/// Runs `specc pull`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let opts = Options {
        insecure: args.insecure,
        ..Options::default()
    };
    let t = Instant::now();
    if let Some(dir) = &args.output {
        let pulled = registry::pull(&args.reference, dir, &opts)
            .with_context(|| format!("pull {}", args.reference))?;
        println!(
            "pulled {} into {}: {} blobs fetched ({:.1} MiB), {:.2?}",
            pulled.manifest.digest(),
            dir.display(),
            pulled.fetched,
            pulled.bytes_fetched as f64 / f64::from(1u32 << 20),
            t.elapsed()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let store = Store::open_default().context("open the store")?;
    let layout = store.temp_dir("pull")?;
    let pulled = registry::pull(&args.reference, layout.path(), &opts)
        .with_context(|| format!("pull {}", args.reference))?;
    let head = oci::import_artifact(layout.path(), &store)
        .with_context(|| format!("import {}", args.reference))?;
    println!(
        "pulled {} ({} blobs fetched, {:.1} MiB, {:.2?}); head layer {}",
        pulled.manifest.digest(),
        pulled.fetched,
        pulled.bytes_fetched as f64 / f64::from(1u32 << 20),
        t.elapsed(),
        head
    );
    Ok(ExitCode::SUCCESS)
}

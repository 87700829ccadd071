//! `specc store ls|verify|import`: what the local store holds.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use specc_store::Store;

use super::gc::human;

/// Arguments of `specc store`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// List the complete layers: key, parents, parts, size, last use.
    Ls,
    /// Re-hash every blob of every layer; exit 1 if any is corrupt or missing.
    Verify,
    /// Import the snapshot of an OCI image layout (`specc pull -o DIR`, `specc build -o DIR`).
    Import {
        /// The layout directory.
        dir: std::path::PathBuf,
    },
}

/// Runs `specc store`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let store = Store::open_default().context("open the store")?;
    if let Sub::Import { dir } = &args.command {
        let head = specc_store::oci::import_artifact(dir, &store)
            .with_context(|| format!("import {}", dir.display()))?;
        println!("imported {}: head layer {head}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let layers = store.layers()?;
    match args.command {
        Sub::Ls => {
            println!(
                "store {} ({} on disk)",
                store.root().display(),
                human(store.usage()?)
            );
            for e in &layers {
                let size: u64 = e.record.parts.iter().map(|p| p.size).sum();
                let ago = SystemTime::now()
                    .duration_since(e.last_used)
                    .map(|d| format!("{}s ago", d.as_secs()))
                    .unwrap_or_else(|_| "now".into());
                let parts: Vec<&str> = e.record.parts.iter().map(|p| p.role.name()).collect();
                let parents: Vec<String> = e
                    .record
                    .parents
                    .iter()
                    .map(|p| p.to_hex()[..12].to_owned())
                    .collect();
                println!(
                    "{}  parents [{}]  {}  {}  used {ago}",
                    &e.record.key.to_hex()[..12],
                    parents.join(" "),
                    parts.join(","),
                    human(size),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Sub::Verify => {
            let mut bad = 0;
            for e in &layers {
                for p in &e.record.parts {
                    if let Err(err) = store.verify_blob(&p.digest) {
                        bad += 1;
                        println!("layer {} {}: {err}", e.record.key, p.role);
                    }
                }
            }
            println!("{} layers checked, {bad} bad blobs", layers.len());
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Sub::Import { .. } => unreachable!("handled above"),
    }
}

//! `specc-bench`: benchmark scenarios, one subcommand each (see `specc_testsuite::bench`).
//! Each prints one JSON line with `--json`: `{"scenario","mode","figures":{...}}`.

use clap::{Parser, Subcommand};
use specc_testsuite::bench;

#[derive(Debug, Parser)]
#[command(name = "specc-bench", about = "specc benchmarks")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// `specc plan` on a 1000-layer spec with 200 copied files, cold and warm.
    Plan(bench::plan::Args),
    /// Cold boot of the busybox guest to agent-ready: median and p95, VMM RSS.
    Boot(bench::boot::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Plan(args) => bench::plan::run(args),
        Scenario::Boot(args) => bench::boot::run(args),
    }
}

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
    /// Snapshot restore of a count guest: VMM side and until the guest runs (p50/p95).
    Restore(bench::restore::Args),
    /// Live fork: source pause at 256 MiB and 2 GiB, child ready/running, 20 children.
    Fork(bench::fork::Args),
    /// Pause and resume of a running count guest, 100 cycles (p50/p95).
    Pause(bench::pause::Args),
    /// Host memory per additional forked VM of an idle 512 MiB guest.
    Density(bench::density::Args),
    /// Fully cached `specc build` of a 10-layer spec (whole process and in-process).
    BuildNoop(bench::build::NoopArgs),
    /// Per-layer restore + snapshot + store time beyond the step, and memory written per layer.
    LayerOverhead(bench::build::OverheadArgs),
    /// specd: API request to an exec-able VM from a cached layer.
    ApiCreate(bench::daemon::Args),
    /// specd: suspended VM, exec → wake → first exec result.
    Wake(bench::daemon::Args),
    /// specd: many VMs, many concurrent exec calls (errors, p50, p99).
    Load(bench::daemon::Args),
    /// specd: restores one after another, one exec each: how many guests ended, and where.
    Restores(bench::daemon::Args),
}

fn main() -> anyhow::Result<()> {
    // The in-process scenarios run the VMM library, whose debug log has per-step timings.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("SPECC_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    match Cli::parse().scenario {
        Scenario::Plan(args) => bench::plan::run(args),
        Scenario::Boot(args) => bench::boot::run(args),
        Scenario::Restore(args) => bench::restore::run(args),
        Scenario::Fork(args) => bench::fork::run(args),
        Scenario::Pause(args) => bench::pause::run(args),
        Scenario::Density(args) => bench::density::run(args),
        Scenario::BuildNoop(args) => bench::build::run_noop(args),
        Scenario::LayerOverhead(args) => bench::build::run_overhead(args),
        Scenario::ApiCreate(args) => bench::daemon::run(bench::daemon::Scenario::Create, &args),
        Scenario::Wake(args) => bench::daemon::run(bench::daemon::Scenario::Wake, &args),
        Scenario::Load(args) => bench::daemon::run(bench::daemon::Scenario::Load, &args),
        Scenario::Restores(args) => bench::daemon::run(bench::daemon::Scenario::Restores, &args),
    }
}

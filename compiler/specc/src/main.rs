//! The specc command line: check, plan, graph, fmt, build, run.
//!
//! Each subcommand lives in its own module under `cmd/` and exposes `Args` (clap derive) and
//! `run(args) -> anyhow::Result<ExitCode>`. Adding a subcommand is one variant here and one arm
//! in `main`.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "specc",
    version,
    about = "Compile KDL VM specs into snapshot artifacts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse and validate specs; report every diagnostic.
    Check(cmd::check::Args),
    /// Show the layer plan: cache keys, parents, cached or not.
    Plan(cmd::plan::Args),
    /// Print the layer DAG as Graphviz DOT.
    Graph(cmd::graph::Args),
    /// Format specs canonically, keeping comments.
    Fmt(cmd::fmt::Args),
    /// Build the guest or rig kernel, or print where it is cached.
    Kernel(cmd::kernel::Args),
    /// Run a command inside the rig (emulated KVM host), or show the detected KVM mode.
    Rig(cmd::rig::Args),
    /// Boot a spec's VM, run a command in it through the agent, exit with its exit code.
    Run(cmd::run::Args),
    /// Build every uncached layer of a spec into snapshots in the store.
    Build(cmd::build::Args),
    /// Upload an OCI layout's snapshot to a registry (blobs it has are skipped).
    Push(cmd::push::Args),
    /// Download a snapshot from a registry into the store, or into an OCI layout with -o.
    Pull(cmd::pull::Args),
    /// Remove leftovers and unreferenced blobs; evict least recently used layers to a budget.
    Gc(cmd::gc::Args),
    /// Inspect the local store: list layers, verify blobs.
    Store(cmd::store::Args),
    /// Manage VMs on a specd daemon: create, ls, fork, suspend, wake, exec, cp, rm, ...
    Vm(cmd::vm::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => cmd::check::run(args),
        Command::Plan(args) => cmd::plan::run(args),
        Command::Graph(args) => cmd::graph::run(args),
        Command::Fmt(args) => cmd::fmt::run(args),
        Command::Kernel(args) => cmd::kernel::run(args),
        Command::Rig(args) => cmd::rig::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Build(args) => cmd::build::run(args),
        Command::Push(args) => cmd::push::run(args),
        Command::Pull(args) => cmd::pull::run(args),
        Command::Gc(args) => cmd::gc::run(args),
        Command::Store(args) => cmd::store::run(args),
        Command::Vm(args) => cmd::vm::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("specc: error: {err:#}");
            // 2 = usage or I/O problem, the same code clap uses for bad arguments.
            ExitCode::from(2)
        }
    }
}

//! `specc rig`: run a command inside the emulated KVM host, or show what this host offers.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use specc_rig::{BootImage, Rig, RigCommand, RigConfig};

/// Arguments of `specc rig`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Boot the rig, run CMD inside it as root (host tree visible, /dev/kvm available), stream
    /// its output and exit with its exit code.
    Run(RunArgs),
    /// Print whether /dev/kvm here is hardware-backed, PVM or absent, and where the VMM runs.
    Detect,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Print the start-up overhead when CMD ends.
    #[arg(long)]
    timings: bool,
    /// vCPUs of the rig.
    #[arg(long)]
    smp: Option<u32>,
    /// Memory of the rig in MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Another host directory to make writable inside (repeatable).
    #[arg(long = "share", value_name = "DIR")]
    shares: Vec<PathBuf>,
    /// Boot the bzImage instead of the vmlinux (PVH) image.
    #[arg(long)]
    bzimage: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    cmd: Vec<OsString>,
}

/// Runs `specc rig`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Sub::Detect => {
            let d = specc_rig::decide()?;
            println!("{}", d.detection);
            println!("{}", d.line);
            Ok(ExitCode::SUCCESS)
        }
        Sub::Run(a) => {
            let mut config = RigConfig::default();
            if let Some(n) = a.smp {
                config.smp = n;
            }
            if let Some(m) = a.memory_mib {
                config.memory_mib = m;
            }
            config.extra_shares = a.shares;
            if a.bzimage {
                config.boot = BootImage::BzImage;
            }
            let mut cmd = RigCommand::new(a.cmd)?;
            cmd.timings = a.timings;
            let outcome = Rig::new(config).run(&cmd)?;
            let code = outcome.status.code().unwrap_or(255);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
        }
    }
}

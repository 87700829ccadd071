//! `specc kernel`: build the project's guest and rig kernels, or print where they are cached.

use std::process::ExitCode;

use specc_guestkit::kernel::{KernelKind, cached_kernel, ensure_kernel};

/// Arguments of `specc kernel`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Build the kernel (from Debian's linux-source-6.1) unless it is cached; print its paths.
    Build(Which),
    /// Print the cached kernel's path; fails if it is not built yet.
    Path {
        #[command(flatten)]
        which: Which,
        /// Print the bzImage instead of the ELF vmlinux.
        #[arg(long)]
        bzimage: bool,
    },
}

#[derive(Debug, clap::Args)]
struct Which {
    /// The rig kernel (emulated KVM host) instead of the guest kernel.
    #[arg(long)]
    rig: bool,
}

impl Which {
    fn kind(&self) -> KernelKind {
        if self.rig {
            KernelKind::Rig
        } else {
            KernelKind::Guest
        }
    }
}

/// Runs `specc kernel`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Sub::Build(which) => {
            let k = ensure_kernel(which.kind(), &|m| eprintln!("specc: {m}"))?;
            println!("digest  {}", k.digest);
            println!("vmlinux {}", k.vmlinux.display());
            println!("bzImage {}", k.bzimage.display());
            println!("config  {}", k.config.display());
            Ok(ExitCode::SUCCESS)
        }
        Sub::Path { which, bzimage } => match cached_kernel(which.kind())? {
            Some(k) => {
                println!("{}", if bzimage { k.bzimage } else { k.vmlinux }.display());
                Ok(ExitCode::SUCCESS)
            }
            None => {
                let flag = if which.rig { " --rig" } else { "" };
                anyhow::bail!(
                    "the {} kernel is not built yet; run `specc kernel build{flag}`",
                    which.kind().name()
                )
            }
        },
    }
}

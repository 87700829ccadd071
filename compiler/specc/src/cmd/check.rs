//! `specc check`: validate specs, report every diagnostic.

use std::path::PathBuf;
use std::process::ExitCode;

use super::common::{CompileArgs, Format, print_diagnostics};

/// Arguments of `specc check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Spec files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Diagnostic format.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
    #[command(flatten)]
    pub compile: CompileArgs,
}

/// Exit 0 when every file is valid, 1 when any has an error, 2 when a file cannot be read.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let opts = args.compile.options()?;
    let (mut errors, mut unreadable) = (false, false);
    for file in &args.files {
        match specc_plan::compile(file, &opts) {
            Ok(c) => {
                print_diagnostics(&c.diagnostics, &c.files, args.format)?;
                errors |= c.has_errors();
            }
            Err(e) => {
                eprintln!(
                    "specc: error: {}",
                    anyhow::Error::from(e)
                        .chain()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(": ")
                );
                unreadable = true;
            }
        }
    }
    Ok(if unreadable {
        ExitCode::from(2)
    } else if errors {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

//! `specc graph`: the layer DAG as Graphviz DOT.

use std::path::PathBuf;
use std::process::ExitCode;

use specc_plan::report;

use super::common::{CompileArgs, Format, print_diagnostics};

/// Arguments of `specc graph`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Spec file.
    pub file: PathBuf,
    #[command(flatten)]
    pub compile: CompileArgs,
}

/// Prints DOT on stdout (`specc graph spec.kdl | dot -Tsvg > layers.svg`).
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let opts = args.compile.options()?;
    let c = specc_plan::compile(&args.file, &opts)?;
    print_diagnostics(&c.diagnostics, &c.files, Format::Human)?;
    let Some(spec) = c.spec else {
        return Ok(ExitCode::from(1));
    };
    print!("{}", report::render_dot(&spec));
    Ok(ExitCode::SUCCESS)
}

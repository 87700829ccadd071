//! `specc graph`: the layer DAG as Graphviz DOT.

use std::path::PathBuf;
use std::process::ExitCode;

use specc_plan::plancache::{self, Planned};
use specc_plan::report::{self, Outline};

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
    let outline = match plancache::plan(&args.file, &opts, &plancache::default_dir())? {
        Planned::Hit(outline) => outline,
        Planned::Fresh(c) => {
            print_diagnostics(&c.diagnostics, &c.files, Format::Human)?;
            let Some(spec) = &c.spec else {
                return Ok(ExitCode::from(1));
            };
            Outline::of(spec)
        }
    };
    print!("{}", report::render_dot(&outline));
    Ok(ExitCode::SUCCESS)
}

//! `specc plan`: layers, cache keys, parents, cached or not.

use std::path::PathBuf;
use std::process::ExitCode;

use specc_plan::plancache::{self, Planned};
use specc_plan::report::{self, Outline};
use specc_plan::store::DirStore;

use super::common::{CompileArgs, Format, print_diagnostics};

/// Arguments of `specc plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Spec file.
    pub file: PathBuf,
    /// Print `{"spec": NAME, "layers": [{"name","key","parents","cached"}]}`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compile: CompileArgs,
}

/// Prints the plan; exit 1 (and diagnostics) when the spec has errors.
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
    let store = DirStore::open_default();
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report::plan_report(&outline, &store))?
        );
    } else {
        print!("{}", report::render_tree(&outline, &store));
    }
    Ok(ExitCode::SUCCESS)
}

//! `specc-bench plan`: `specc plan` on a generated 1000-layer spec with 200 copied files.
//!
//! Cold = no digest cache and no plan cache: every copied file is read and hashed and the spec
//! is parsed and lowered (the OS page cache is warm: dropping it would disturb everything else
//! on the machine). Warm = nothing changed since the last plan: a plan-cache hit, which still
//! re-reads the spec and its imports and `stat`s every copied file. Edited = the spec text
//! changed but the copied files did not: a full parse and lowering, files not re-read. Each run
//! is the whole of `specc plan --json` in-process (read, parse, lower, hash, key, store lookup,
//! JSON). When the `specc` binary sits next to this one, the warm case is also timed as a
//! separate process, start-up included.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use specc_plan::Options;
#[cfg(test)]
use specc_plan::compile;
use specc_plan::plancache::{self, Planned};
use specc_plan::report::{Outline, plan_report};
use specc_plan::store::DirStore;

use super::{Mode, Report, median, ms};

/// Arguments of the `plan` scenario.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Layers in the generated spec.
    #[arg(long, default_value_t = 1000)]
    pub layers: usize,
    /// Copied files in the generated spec.
    #[arg(long, default_value_t = 200)]
    pub files: usize,
    /// Timed runs per case (the median is reported).
    #[arg(long, default_value_t = 11)]
    pub runs: usize,
}

/// Writes the spec and its files under `dir`; returns (spec path, copied bytes).
pub fn generate(dir: &Path, layers: usize, files: usize) -> anyhow::Result<(PathBuf, u64)> {
    ensure!(
        layers >= files && files > 0,
        "need at least one file and no more files than layers"
    );
    let src = dir.join("src");
    std::fs::create_dir_all(&src)?;
    let mut bytes = 0u64;
    // Sizes from 1 KiB to 128 KiB (mean about 64 KiB): lockfiles, sources, small assets.
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for i in 0..files {
        let size = 1024 * (1 + (i * 37) % 128);
        let content: Vec<u8> = (0..size)
            .map(|j| u8::try_from((i * 31 + j * 7) % 251).unwrap_or(0))
            .collect();
        let p = src.join(format!("file-{i:04}.bin"));
        std::fs::write(&p, &content)?;
        File::options().write(true).open(&p)?.set_modified(old)?;
        bytes += size as u64;
    }
    let mut s = String::from(
        "spec \"bench\" {\n    base \"debian\" suite=\"bookworm\"\n    vm vcpus=2 memory=\"1GiB\" disk=\"4GiB\"\n    param \"tag\" default=\"v1\"\n",
    );
    let every = layers / files;
    for l in 0..layers {
        // Mostly a chain (the common case), with a side branch every 50 layers.
        let after = if l > 0 && l % 50 == 0 {
            format!(" after=\"l{}\"", l - 25)
        } else {
            String::new()
        };
        let _ = writeln!(s, "    layer \"l{l}\"{after} {{");
        if l % every == 0 && l / every < files {
            let f = l / every;
            let _ = writeln!(
                s,
                "        copy \"src/file-{f:04}.bin\" \"/opt/data/file-{f:04}.bin\""
            );
        }
        let _ = writeln!(s, "        env \"STEP\" \"{l}\"");
        let _ = writeln!(
            s,
            "        run \"echo layer {l} ${{tag}} >> /var/log/bench.log\""
        );
        let _ = writeln!(s, "    }}");
    }
    s.push_str("}\n");
    let spec = dir.join("bench.kdl");
    std::fs::write(&spec, s)?;
    Ok((spec, bytes))
}

/// What `specc plan --json` does, in-process. Returns the time, the files hashed on a fresh
/// compile (`None` on a plan-cache hit) and the JSON.
fn plan_once(
    spec: &Path,
    opts: &Options,
    cache: &Path,
    store: &DirStore,
) -> anyhow::Result<(Duration, Option<usize>, String)> {
    let t = Instant::now();
    let (outline, hashed) = match plancache::plan(spec, opts, cache)? {
        Planned::Hit(o) => (o, None),
        Planned::Fresh(c) => {
            let Some(planned) = &c.spec else {
                bail!("the generated spec does not plan: {:?}", c.diagnostics)
            };
            (Outline::of(planned), Some(c.files_hashed))
        }
    };
    let json = serde_json::to_string(&plan_report(&outline, store))?;
    Ok((t.elapsed(), hashed, json))
}

/// Runs the scenario.
pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (spec, bytes) = generate(dir.path(), args.layers, args.files)?;
    let home = dir.path().join("home");
    let cache = home.join("cache/file-digests-v1.json");
    let opts = Options {
        digest_cache: Some(cache.clone()),
        ..Options::default()
    };
    let store = DirStore::at(home.join("store"));
    // The digest cache ignores files changed in the last two seconds (they could change again
    // within one timestamp tick); the generator's chmod/utime just did that.
    std::thread::sleep(Duration::from_millis(2200));

    let plans = home.join("cache/plans");
    let mut cold = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let _ = std::fs::remove_file(&cache);
        let _ = std::fs::remove_dir_all(&plans);
        let (d, hashed, _) = plan_once(&spec, &opts, &plans, &store)?;
        ensure!(
            hashed == Some(args.files),
            "a cold run hashed {hashed:?} files, expected {}",
            args.files
        );
        cold.push(d);
    }
    let mut warm = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let (d, hashed, _) = plan_once(&spec, &opts, &plans, &store)?;
        ensure!(hashed.is_none(), "a warm run missed the plan cache");
        warm.push(d);
    }
    // The editor loop: the spec itself changed (a comment here), copied files did not.
    let original = std::fs::read_to_string(&spec)?;
    let mut edited = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        std::fs::write(&spec, format!("{original}// edit {i}\n"))?;
        let (d, hashed, _) = plan_once(&spec, &opts, &plans, &store)?;
        ensure!(
            hashed == Some(0),
            "an edited-spec run hashed {hashed:?} files, expected none"
        );
        edited.push(d);
    }
    std::fs::write(&spec, original)?;

    let mut report = Report::new("plan", Mode::detect());
    report
        .figure("layers_count", args.layers as f64)
        .figure("copied_files_count", args.files as f64)
        .figure("copied_bytes", bytes as f64)
        .figure("runs_count", args.runs as f64)
        .figure("cold_median_ms", ms(median(&mut cold)))
        .figure("warm_median_ms", ms(median(&mut warm)))
        .figure("edited_median_ms", ms(median(&mut edited)));

    let exe = std::env::current_exe()?.with_file_name("specc");
    if exe.is_file() {
        let mut proc_warm = Vec::with_capacity(args.runs);
        for _ in 0..args.runs {
            let t = Instant::now();
            let out = Command::new(&exe)
                .args(["plan", "--json"])
                .arg(&spec)
                .env("SPECC_HOME", &home)
                .output()
                .with_context(|| format!("running {}", exe.display()))?;
            proc_warm.push(t.elapsed());
            ensure!(
                out.status.success(),
                "specc plan failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        report.figure("warm_process_median_ms", ms(median(&mut proc_warm)));
    }
    report.print(args.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_spec_plans_with_the_requested_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spec, bytes) = generate(dir.path(), 40, 8).expect("generate");
        assert!(bytes >= 8 * 1024);
        let c = compile(&spec, &Options::default()).expect("read");
        let planned = c.spec.expect("plans");
        assert_eq!(planned.layers.len(), 41, "40 layers and base");
        assert_eq!(c.files_hashed, 8);
    }
}

//! Benchmark scenarios of `specc-bench`, one module each, and the shared output format.
//!
//! Every scenario prints exactly one JSON line:
//! `{"scenario": NAME, "mode": "kvm"|"rig"|"pvm", "figures": {"<name>_<unit>": number, ...}}`
//! (with `--json`), or the same figures as a readable table. Figures are named with their unit
//! as the suffix (`_ms`, `_count`, `_bytes`) so tools can read them without a schema.

pub mod boot;
pub mod build;
pub mod count;
pub mod daemon;
pub mod density;
pub mod fork;
pub mod pause;
pub mod plan;
pub mod restore;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

/// The virtualization mode a benchmark ran under (DESIGN section 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Hardware-assisted KVM.
    Kvm,
    /// Inside the rig (QEMU TCG with a KVM-enabled kernel).
    Rig,
    /// The PVM-backed `/dev/kvm` of these machines.
    Pvm,
}

impl Mode {
    /// What this host offers: `kvm_pvm` loaded means PVM, else `/dev/kvm` means hardware
    /// KVM, else VMs would run in the rig.
    pub fn detect() -> Mode {
        if Path::new("/sys/module/kvm_pvm").exists() {
            Mode::Pvm
        } else if Path::new("/dev/kvm").exists() {
            Mode::Kvm
        } else {
            Mode::Rig
        }
    }
}

/// One scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name (the subcommand).
    pub scenario: &'static str,
    /// Virtualization mode.
    pub mode: Mode,
    /// `name_unit` -> value.
    pub figures: BTreeMap<String, f64>,
}

impl Report {
    /// An empty report for `scenario` in `mode`.
    pub fn new(scenario: &'static str, mode: Mode) -> Self {
        Report {
            scenario,
            mode,
            figures: BTreeMap::new(),
        }
    }

    /// Adds a figure; `name` must end in its unit (`_ms`, `_count`, ...).
    pub fn figure(&mut self, name: &str, value: f64) -> &mut Self {
        self.figures.insert(name.to_owned(), value);
        self
    }

    /// Prints the report: one JSON line, or a table.
    pub fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string(self)?);
        } else {
            println!("scenario {} (mode {:?})", self.scenario, self.mode);
            for (k, v) in &self.figures {
                println!("  {k:<28} {v:>12.3}");
            }
        }
        Ok(())
    }
}

/// Milliseconds with microsecond resolution.
pub fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// The median of `samples` (the mean of the middle two for an even count).
pub fn median(samples: &mut [Duration]) -> Duration {
    assert!(!samples.is_empty(), "median of no samples");
    samples.sort();
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2
    }
}

/// The `p`th percentile (nearest rank) of `samples`.
pub fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    assert!(!samples.is_empty(), "percentile of no samples");
    samples.sort();
    let rank = (samples.len() * p).div_ceil(100).max(1);
    samples[rank - 1]
}

/// Adds `<name>_p50_ms` and `<name>_p95_ms` of `samples` to `report`.
pub fn p50_p95(report: &mut Report, name: &str, samples: &mut [Duration]) {
    report.figure(&format!("{name}_p50_ms"), ms(median(samples)));
    report.figure(&format!("{name}_p95_ms"), ms(percentile(samples, 95)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let d = Duration::from_millis;
        assert_eq!(median(&mut [d(5), d(1), d(3)]), d(3));
        assert_eq!(
            median(&mut [d(4), d(1), d(3), d(2)]),
            Duration::from_micros(2500)
        );
    }

    #[test]
    fn p50_p95_names_both_figures_with_their_unit() {
        let mut v: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        let mut r = Report::new("pause", Mode::Pvm);
        p50_p95(&mut r, "pause", &mut v);
        assert_eq!(r.figures["pause_p50_ms"], 10.5);
        assert_eq!(r.figures["pause_p95_ms"], 19.0);
    }

    #[test]
    fn report_json_has_the_shared_shape() {
        let mut r = Report::new("plan", Mode::Pvm);
        r.figure("warm_median_ms", 1.5);
        let v: serde_json::Value = serde_json::to_value(&r).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"scenario": "plan", "mode": "pvm", "figures": {"warm_median_ms": 1.5}})
        );
    }
}

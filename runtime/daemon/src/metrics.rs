//! Counters and latency histograms for `GET /metrics` (Prometheus text format 0.0.4).
//!
//! Written out by hand: a handful of metric families do not justify a metrics registry crate, and the
//! text format is a few lines of `format!`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use crate::api::VmState;

/// Bucket upper bounds of every latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The daemon's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    latency: BTreeMap<&'static str, Histogram>,
    transitions: BTreeMap<(&'static str, bool), u64>,
    evictions: u64,
    vmm_ended: u64,
    compactions: BTreeMap<&'static str, u64>,
    compacted_diffs: u64,
}

impl Metrics {
    /// Records one lifecycle operation (`create`, `wake`, `suspend`, `fork`, `exec`, ...).
    pub fn observe(&self, op: &'static str, took: Duration, ok: bool) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *m.transitions.entry((op, ok)).or_default() += 1;
        if ok {
            let h = m.latency.entry(op).or_default();
            let s = took.as_secs_f64();
            for (i, b) in BUCKETS.iter().enumerate() {
                if s <= *b {
                    h.counts[i] += 1;
                }
            }
            h.count += 1;
            h.sum += s;
        }
    }

    /// Counts one eviction.
    pub fn evicted(&self) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .evictions += 1;
    }

    /// Counts one VMM that ended by itself (its VM failed, or stopped if it had cold-booted).
    pub fn vmm_ended(&self) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .vmm_ended += 1;
    }

    /// Counts one compaction of a VM's snapshot chain by how it ended (`merged`: the VM now
    /// restores from the merged snapshot; `discarded`: the VM left the suspended state
    /// meanwhile, so the old chain stays; `error`) and, when merged, the diffs it merged.
    pub fn compaction(&self, result: &'static str, diffs: u64) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *m.compactions.entry(result).or_default() += 1;
        m.compacted_diffs += diffs;
    }

    /// The text exposition, with the current count of VMs per state.
    pub fn render(&self, states: &BTreeMap<VmState, usize>) -> String {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        out.push_str("# HELP specd_vms VMs by lifecycle state.\n# TYPE specd_vms gauge\n");
        for s in VmState::ALL {
            let n = states.get(&s).copied().unwrap_or(0);
            let _ = writeln!(out, "specd_vms{{state=\"{}\"}} {n}", s.as_str());
        }
        out.push_str(
            "# HELP specd_operations_total Lifecycle operations by result.\n\
             # TYPE specd_operations_total counter\n",
        );
        for ((op, ok), n) in &m.transitions {
            let result = if *ok { "ok" } else { "error" };
            let _ = writeln!(
                out,
                "specd_operations_total{{op=\"{op}\",result=\"{result}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP specd_operation_seconds Latency of successful lifecycle operations.\n\
             # TYPE specd_operation_seconds histogram\n",
        );
        for (op, h) in &m.latency {
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "specd_operation_seconds_bucket{{op=\"{op}\",le=\"{b}\"}} {c}"
                );
            }
            let _ = writeln!(
                out,
                "specd_operation_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "specd_operation_seconds_sum{{op=\"{op}\"}} {}", h.sum);
            let _ = writeln!(
                out,
                "specd_operation_seconds_count{{op=\"{op}\"}} {}",
                h.count
            );
        }
        out.push_str(
            "# HELP specd_evictions_total Sticky VMs evicted under the storage budget.\n\
             # TYPE specd_evictions_total counter\n",
        );
        let _ = writeln!(out, "specd_evictions_total {}", m.evictions);
        out.push_str(
            "# HELP specd_vmm_ended_total VMM processes that ended by themselves (guest crash, killed).\n\
             # TYPE specd_vmm_ended_total counter\n",
        );
        let _ = writeln!(out, "specd_vmm_ended_total {}", m.vmm_ended);
        out.push_str(
            "# HELP specd_compactions_total Compactions of suspended VMs' snapshot chains by result.\n\
             # TYPE specd_compactions_total counter\n",
        );
        for result in ["merged", "discarded", "error"] {
            let n = m.compactions.get(result).copied().unwrap_or(0);
            let _ = writeln!(out, "specd_compactions_total{{result=\"{result}\"}} {n}");
        }
        out.push_str(
            "# HELP specd_compacted_diffs_total Memory and disk diffs merged away by compactions.\n\
             # TYPE specd_compacted_diffs_total counter\n",
        );
        let _ = writeln!(out, "specd_compacted_diffs_total {}", m.compacted_diffs);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_errors_are_counted_apart() {
        let m = Metrics::default();
        m.observe("wake", Duration::from_millis(30), true);
        m.observe("wake", Duration::from_millis(700), true);
        m.observe("wake", Duration::from_millis(1), false);
        m.evicted();
        m.vmm_ended();
        m.compaction("merged", 10);
        m.compaction("discarded", 0);
        m.compaction("merged", 6);
        let states = BTreeMap::from([(VmState::Running, 2)]);
        let text = m.render(&states);
        assert!(text.contains("specd_vms{state=\"running\"} 2"), "{text}");
        assert!(text.contains("specd_vms{state=\"suspended\"} 0"), "{text}");
        assert!(text.contains("op=\"wake\",le=\"0.025\"} 0"), "{text}");
        assert!(text.contains("op=\"wake\",le=\"0.05\"} 1"), "{text}");
        assert!(text.contains("op=\"wake\",le=\"1\"} 2"), "{text}");
        assert!(
            text.contains("specd_operation_seconds_count{op=\"wake\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("specd_operations_total{op=\"wake\",result=\"error\"} 1"),
            "{text}"
        );
        assert!(text.contains("specd_evictions_total 1"), "{text}");
        assert!(text.contains("specd_vmm_ended_total 1"), "{text}");
        assert!(text.contains("specd_vms{state=\"failed\"} 0"), "{text}");
        assert!(
            text.contains("specd_compactions_total{result=\"merged\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("specd_compactions_total{result=\"discarded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("specd_compactions_total{result=\"error\"} 0"),
            "{text}"
        );
        assert!(text.contains("specd_compacted_diffs_total 16"), "{text}");
    }
}

//! The host's TSC rate, handed to the rig kernel as `tsc_early_khz=`.
//!
//! QEMU TCG gives its guest the host's TSC (plus an offset), so the rig's TSC ticks at the
//! host's rate. The rig kernel cannot find that rate itself: `-M microvm` has no HPET and no ACPI
//! PM timer, and PIT calibration fails under TCG's timing ("Marking TSC unstable due to could
//! not calculate TSC khz"). With `tsc_khz == 0` the rig's KVM never enters a guest:
//! `kvm_guest_time_update` finds no TSC rate for the CPU, re-requests `KVM_REQ_CLOCK_UPDATE` and
//! returns, forever, so the first KVM_RUN spins in the rig kernel and never returns.

use std::time::{Duration, Instant};

/// How long the rate is measured over: the TSC/clock pairs are bracketed to well under a
/// microsecond, so 20 ms gives a rate good to about 1e-4, far inside what Linux needs.
const SPAN: Duration = Duration::from_millis(20);
/// Attempts at reading one tightly bracketed (TSC, clock) pair.
const PAIR_TRIES: usize = 16;

#[cfg(target_arch = "x86_64")]
fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects and exists on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// One (TSC, instant) pair, taken with the least TSC distance between the readings around the
/// clock read, so a preemption in between does not skew it.
#[cfg(target_arch = "x86_64")]
fn pair() -> (u64, Instant) {
    let mut best: Option<(u64, u64, Instant)> = None;
    for _ in 0..PAIR_TRIES {
        let a = rdtsc();
        let t = Instant::now();
        let b = rdtsc();
        let width = b.wrapping_sub(a);
        if best.is_none_or(|(w, _, _)| width < w) {
            best = Some((width, a + width / 2, t));
        }
    }
    let (_, tsc, t) = best.unwrap_or((0, rdtsc(), Instant::now()));
    (tsc, t)
}

/// The host TSC rate in kHz, measured against the monotonic clock; `None` when there is no
/// TSC to measure (not x86_64) or the measurement is nonsense (the TSC did not advance).
pub fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let (tsc0, t0) = pair();
        std::thread::sleep(SPAN);
        let (tsc1, t1) = pair();
        let ns = t1.duration_since(t0).as_nanos();
        let ticks = u128::from(tsc1.checked_sub(tsc0)?);
        if ns == 0 || ticks == 0 {
            return None;
        }
        u64::try_from(ticks * 1_000_000 / ns)
            .ok()
            .filter(|&k| k > 0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// The kernel argument that tells the rig kernel its TSC rate, or nothing when it is unknown.
pub fn kernel_arg() -> Option<String> {
    host_tsc_khz().map(|khz| format!("tsc_early_khz={khz}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_tsc_rate_is_measured_and_consistent() {
        let a = host_tsc_khz().expect("x86_64 host: the TSC rate must be measurable");
        let b = host_tsc_khz().expect("second measurement");
        // Two measurements of one fixed rate agree to a few percent (this is a consistency
        // check of the method, not a timing threshold: the rate is a constant of the host).
        let (lo, hi) = (a.min(b), a.max(b));
        assert!(hi - lo <= hi / 20, "rates {a} and {b} kHz disagree");
        assert_eq!(
            kernel_arg().map(|s| s.starts_with("tsc_early_khz=")),
            Some(true)
        );
    }
}

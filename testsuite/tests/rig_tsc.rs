//! The rig kernel must know its TSC rate. Without it (`tsc_khz == 0`: microvm has no HPET or
//! ACPI PM timer and PIT calibration fails under TCG) the rig's KVM never enters a guest:
//! `kvm_guest_time_update` re-requests a clock update forever and the first KVM_RUN spins in
//! the rig kernel. The rig host passes the rate as `tsc_early_khz=`; with a known rate, and
//! `tsc=reliable`, the rig kernel runs on the TSC clocksource instead of jiffies.
//! (Calibration sometimes succeeds by luck, so only a rig without the argument can pass or fail
//! this; with it the result is deterministic.)

#[cfg(test)]
mod tests {
    use specc_rig::{Rig, RigCommand, RigConfig};

    #[test]
    fn rig_kernel_has_a_tsc_rate_and_runs_on_the_tsc_clocksource() {
        let mut cmd = RigCommand::new([
            "/bin/sh",
            "-c",
            "cat /sys/devices/system/clocksource/clocksource0/current_clocksource; \
             tr ' ' '\\n' < /proc/cmdline | grep '^tsc_early_khz='",
        ])
        .expect("cwd");
        cmd.capture = true;
        let outcome = Rig::new(RigConfig::default())
            .run(&cmd)
            .expect("rig run (needs qemu-system-x86_64 and the rig kernel)");
        let stdout = String::from_utf8_lossy(&outcome.stdout);
        let mut lines = stdout.lines();
        // `tsc-early` until the refinement a second after boot swaps in `tsc`; both mean the rate
        // is known. Without one the rig is on (refined-)jiffies.
        let clocksource = lines.next();
        assert!(
            matches!(clocksource, Some("tsc" | "tsc-early")),
            "rig clocksource {clocksource:?} (stdout {stdout:?}, stderr {:?})",
            String::from_utf8_lossy(&outcome.stderr)
        );
        let khz: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("tsc_early_khz="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no tsc_early_khz= on the rig's cmdline: {stdout:?}"));
        assert!(khz > 0);
        assert_eq!(outcome.status.code(), Some(0));
    }
}

//! For test binaries: run a test inside the rig when this host's KVM cannot run it.
//!
//! ```no_run
//! #[test]
//! fn boots_a_linux_guest() {
//!     if specc_rig::testing::run_in_rig_unless_hardware("boots_a_linux_guest").ran_in_rig() {
//!         return;
//!     }
//!     // ... the body runs here on hardware KVM, or inside the rig ...
//! }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::detect::{Placement, decide, in_rig};
use crate::run::{Rig, RigCommand, RigConfig};

/// Where the test body should run, as decided by [`run_in_rig_unless_hardware`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "the caller must return when the test already ran inside the rig"]
pub enum TestPlace {
    /// Run the body here: hardware KVM, `SPECC_VIRT=kvm`, or already inside the rig.
    Here,
    /// The test ran (and passed) inside the rig; the caller returns.
    RanInRig,
}

impl TestPlace {
    /// True when the caller must return without running its body.
    pub fn ran_in_rig(self) -> bool {
        self == TestPlace::RanInRig
    }
}

/// Rigs of one test binary run one at a time: each takes 2 vCPUs of emulation.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The cargo target directory a test binary lives in (`<target>/<profile>/deps/<bin>`).
fn target_dir_of(exe: &Path) -> Option<PathBuf> {
    let deps = exe.parent()?;
    (deps.file_name()? == "deps").then_some(())?;
    Some(deps.parent()?.parent()?.to_path_buf())
}

/// On hardware KVM (or inside the rig, or with `SPECC_VIRT=kvm`) returns [`TestPlace::Here`].
/// Otherwise re-runs this test binary inside the rig with `--exact <test_name> --nocapture`,
/// prints its output, panics unless exactly that one test ran and passed, and returns
/// [`TestPlace::RanInRig`].
///
/// `test_name` is the libtest name: the function name for a top-level test of an integration
/// test file, `module::name` otherwise.
pub fn run_in_rig_unless_hardware(test_name: &str) -> TestPlace {
    if in_rig() {
        return TestPlace::Here;
    }
    let decision = match decide() {
        Ok(d) => d,
        Err(e) => panic!("cannot decide where {test_name} runs: {e}"),
    };
    if decision.placement == Placement::Direct {
        return TestPlace::Here;
    }
    eprintln!("{}", decision.line);
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let exe = std::env::current_exe().expect("the test binary's own path");
    let mut config = RigConfig::default();
    config.extra_shares.extend(target_dir_of(&exe));
    let mut cmd = RigCommand::new([
        exe.into_os_string(),
        "--exact".into(),
        test_name.into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ])
    .expect("the current directory");
    cmd.capture = true;
    // A hung guest must fail the test, not wedge the suite.
    let secs = std::env::var("SPECC_RIG_TEST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok());
    cmd.timeout = Some(std::time::Duration::from_secs(secs.unwrap_or(900)));
    let outcome = match Rig::new(config).run(&cmd) {
        Ok(o) => o,
        Err(e) => panic!("cannot run {test_name} inside the rig: {e}"),
    };
    let stdout = String::from_utf8_lossy(&outcome.stdout);
    let stderr = String::from_utf8_lossy(&outcome.stderr);
    // Through the harness's capture, so it shows on failure or with --nocapture.
    println!("--- {test_name} inside the rig: stdout ---\n{stdout}");
    eprintln!("--- {test_name} inside the rig: stderr ---\n{stderr}");
    eprintln!("{}", outcome.timings);
    assert!(
        outcome.status.success(),
        "{test_name} failed inside the rig ({}); its output is above",
        outcome.status
    );
    // A misspelt name runs zero tests and exits 0: that must not pass.
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{test_name} did not run inside the rig (no `1 passed` in its output); is the name exact?"
    );
    TestPlace::RanInRig
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_dir_is_found_from_a_deps_binary() {
        let t = target_dir_of(Path::new("/w/target/debug/deps/x-123"));
        assert_eq!(t, Some(PathBuf::from("/w/target")));
        assert_eq!(target_dir_of(Path::new("/usr/bin/true")), None);
    }
}

//! Does this host's `/dev/kvm` give hardware-assisted virtualization, and where should the VMM
//! run: directly, or inside the rig?

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// What kind of KVM this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmMode {
    /// `/dev/kvm` backed by hardware virtualization (VMX/SVM), or the rig's own `/dev/kvm`.
    Hardware,
    /// `/dev/kvm` backed by PVM (`kvm_pvm`): unmodified Linux guests run under the instruction
    /// emulator and stop in early boot.
    Pvm,
    /// No usable `/dev/kvm`.
    Absent,
}

impl KvmMode {
    /// Lower-case name for logs and benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            KvmMode::Hardware => "hardware-kvm",
            KvmMode::Pvm => "pvm",
            KvmMode::Absent => "no-kvm",
        }
    }
}

/// The detected mode and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// The mode.
    pub mode: KvmMode,
    /// One human sentence: what was found.
    pub reason: String,
}

impl fmt::Display for Detection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.mode.name(), self.reason)
    }
}

/// Where the VMM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On this host's `/dev/kvm`.
    Direct,
    /// Inside the rig (QEMU TCG with a KVM-enabled kernel).
    Rig,
}

/// A placement decision and the one line that explains it to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Where the VMM runs.
    pub placement: Placement,
    /// What the host offers.
    pub detection: Detection,
    /// The one clear line to print, e.g.
    /// `specc: /dev/kvm is PVM-backed (kvm_pvm loaded): running the VMM inside the rig ...`.
    pub line: String,
}

/// Errors of the placement decision.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// `SPECC_VIRT` holds something other than `rig`, `kvm` or `auto`.
    #[error("SPECC_VIRT={0:?} is not one of rig, kvm, auto")]
    BadOverride(String),
    /// `SPECC_VIRT=kvm` on a host without `/dev/kvm`.
    #[error("SPECC_VIRT=kvm but this host has no usable /dev/kvm ({0}); unset it to use the rig")]
    KvmForcedButAbsent(String),
}

/// The environment variable that forces a placement: `rig`, `kvm` or `auto` (the default).
pub const VIRT_ENV: &str = "SPECC_VIRT";

/// Set (to `1`) in every command the rig runs.
pub const IN_RIG_ENV: &str = "SPECC_IN_RIG";

/// True inside the rig.
pub fn in_rig() -> bool {
    std::env::var_os(IN_RIG_ENV).is_some_and(|v| v == "1")
}

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

/// Inspects `/dev/kvm` and the loaded KVM modules.
pub fn detect() -> Detection {
    detect_at(
        Path::new("/dev/kvm"),
        Path::new("/sys/module"),
        Path::new("/proc/modules"),
    )
}

fn detect_at(dev: &Path, sys_module: &Path, proc_modules: &Path) -> Detection {
    let absent = |reason: String| Detection {
        mode: KvmMode::Absent,
        reason,
    };
    if !dev.exists() {
        return absent(format!("{} does not exist", dev.display()));
    }
    let file = match File::options().read(true).write(true).open(dev) {
        Ok(f) => f,
        Err(e) => return absent(format!("cannot open {}: {e}", dev.display())),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let api = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if api != 12 {
        return absent(format!(
            "{} answers KVM_GET_API_VERSION with {api}, not 12",
            dev.display()
        ));
    }
    let modules = std::fs::read_to_string(proc_modules).unwrap_or_default();
    let loaded = |name: &str| {
        sys_module.join(name).exists()
            || modules
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name))
    };
    if loaded("kvm_pvm") {
        return Detection {
            mode: KvmMode::Pvm,
            reason: "/dev/kvm is PVM-backed (kvm_pvm is loaded): unmodified Linux guests do not \
                     boot on it"
                .to_string(),
        };
    }
    let vendor = ["kvm_amd", "kvm_intel"].into_iter().find(|m| loaded(m));
    let reason = match (vendor, in_rig()) {
        (_, true) => "inside the rig: its /dev/kvm is emulated hardware KVM".to_string(),
        (Some(m), false) => format!("/dev/kvm is hardware-backed ({m})"),
        // A kernel with KVM built in and no module list still offers hardware KVM if it is not
        // PVM; the VMM's own probe reports anything worse.
        (None, false) => "/dev/kvm answers API 12 and kvm_pvm is not loaded".to_string(),
    };
    Detection {
        mode: KvmMode::Hardware,
        reason,
    }
}

/// Decides where the VMM runs, honouring `SPECC_VIRT=rig|kvm|auto`.
pub fn decide() -> Result<Decision, DetectError> {
    let forced = std::env::var(VIRT_ENV).unwrap_or_default();
    decide_with(detect(), &forced, in_rig())
}

fn decide_with(detection: Detection, forced: &str, inside: bool) -> Result<Decision, DetectError> {
    let (placement, line) = match (forced, detection.mode) {
        // The rig never nests: inside it, its own /dev/kvm is the hardware-style one.
        (_, _) if inside => (Placement::Direct, format!("specc: {}", detection.reason)),
        ("" | "auto", KvmMode::Hardware) => (
            Placement::Direct,
            format!("specc: {}: running the VMM directly", detection.reason),
        ),
        ("" | "auto", KvmMode::Pvm | KvmMode::Absent) => (
            Placement::Rig,
            format!(
                "specc: {}: running the VMM inside the rig (QEMU TCG emulating a KVM host; \
                 slow, set {VIRT_ENV}=kvm to force /dev/kvm)",
                detection.reason
            ),
        ),
        ("rig", _) => (
            Placement::Rig,
            format!(
                "specc: {VIRT_ENV}=rig: running the VMM inside the rig ({})",
                detection.reason
            ),
        ),
        ("kvm", KvmMode::Absent) => {
            return Err(DetectError::KvmForcedButAbsent(detection.reason));
        }
        ("kvm", _) => (
            Placement::Direct,
            format!(
                "specc: {VIRT_ENV}=kvm: running the VMM on /dev/kvm ({})",
                detection.reason
            ),
        ),
        (other, _) => return Err(DetectError::BadOverride(other.to_string())),
    };
    Ok(Decision {
        placement,
        detection,
        line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(mode: KvmMode) -> Detection {
        Detection {
            mode,
            reason: "r".to_string(),
        }
    }

    #[test]
    fn missing_dev_kvm_is_absent() {
        let d = detect_at(
            Path::new("/nonexistent/kvm"),
            Path::new("/nonexistent"),
            Path::new("/nonexistent"),
        );
        assert_eq!(d.mode, KvmMode::Absent);
        assert!(d.reason.contains("does not exist"), "{}", d.reason);
    }

    #[test]
    fn dev_kvm_that_is_not_kvm_is_absent() {
        let d = detect_at(
            Path::new("/dev/null"),
            Path::new("/nonexistent"),
            Path::new("/x"),
        );
        assert_eq!(d.mode, KvmMode::Absent, "{d}");
    }

    #[test]
    fn auto_uses_rig_for_pvm_and_absent_and_direct_for_hardware() {
        let p = |m| decide_with(det(m), "", false).expect("decide").placement;
        assert_eq!(p(KvmMode::Pvm), Placement::Rig);
        assert_eq!(p(KvmMode::Absent), Placement::Rig);
        assert_eq!(p(KvmMode::Hardware), Placement::Direct);
    }

    #[test]
    fn override_forces_either_mode_and_rejects_nonsense() {
        let rig = decide_with(det(KvmMode::Hardware), "rig", false).expect("rig");
        assert_eq!(rig.placement, Placement::Rig);
        let kvm = decide_with(det(KvmMode::Pvm), "kvm", false).expect("kvm");
        assert_eq!(kvm.placement, Placement::Direct);
        assert!(decide_with(det(KvmMode::Absent), "kvm", false).is_err());
        assert!(decide_with(det(KvmMode::Pvm), "fast", false).is_err());
    }

    #[test]
    fn inside_the_rig_never_nests() {
        let d = decide_with(det(KvmMode::Hardware), "rig", true).expect("decide");
        assert_eq!(d.placement, Placement::Direct);
    }

    #[test]
    fn this_host_is_detected_consistently_with_its_module_list() {
        let d = detect();
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        if pvm && Path::new("/dev/kvm").exists() && !in_rig() {
            assert_eq!(d.mode, KvmMode::Pvm, "{d}");
        }
        if !Path::new("/dev/kvm").exists() {
            assert_eq!(d.mode, KvmMode::Absent, "{d}");
        }
    }
}

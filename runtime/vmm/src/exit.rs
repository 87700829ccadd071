//! How a VM ends, and the channel the vCPU threads and devices report it on.

use std::sync::mpsc::Sender;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VmExit {
    /// The guest asked to stop: an i8042 CPU reset (Linux `reboot` with `reboot=k`, what our
    /// guests use to power off) or a KVM system event (shutdown/reset).
    PowerOff,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): the guest crashed.
    TripleFault {
        /// The vCPU.
        vcpu: u8,
    },
    /// KVM could not run the guest (KVM_EXIT_INTERNAL_ERROR), with what we could learn.
    InternalError(InternalErrorReport),
    /// VM entry failed (KVM_EXIT_FAIL_ENTRY).
    FailEntry {
        /// The vCPU.
        vcpu: u8,
        /// hardware_entry_failure_reason.
        reason: u64,
    },
    /// A vCPU ioctl failed or a vCPU thread died; the VMM's fault, not the guest's.
    VcpuError {
        /// The vCPU.
        vcpu: u8,
        /// What failed.
        message: String,
    },
    /// The configured run time limit passed.
    Timeout,
}

impl VmExit {
    /// The `specc-vmm` process exit status for this ending (see docs/vmm.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::PowerOff => 0,
            VmExit::VcpuError { .. } => 1,
            VmExit::TripleFault { .. } => 2,
            VmExit::InternalError(_) | VmExit::FailEntry { .. } => 3,
            VmExit::Timeout => 124,
        }
    }
}

/// What KVM_EXIT_INTERNAL_ERROR said, and where the guest was.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InternalErrorReport {
    /// The vCPU.
    pub vcpu: u8,
    /// `internal.suberror` (1 = emulation failure, 2 = simultaneous exception, 3 = delivery
    /// event, ...).
    pub suberror: u32,
    /// `internal.data[..ndata]`.
    pub data: Vec<u64>,
    /// Guest RIP.
    pub rip: u64,
    /// Guest CR0, CR3, CR4, EFER.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// Physical address of RIP, if it translated.
    pub rip_phys: Option<u64>,
    /// Up to 16 instruction bytes at RIP.
    pub insn: Vec<u8>,
}

impl std::fmt::Display for InternalErrorReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sub = match self.suberror {
            1 => "emulation failure",
            2 => "simultaneous exception",
            3 => "delivery event",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        write!(
            f,
            "vcpu {} KVM_EXIT_INTERNAL_ERROR suberror {} ({sub}), ndata {} [",
            self.vcpu,
            self.suberror,
            self.data.len()
        )?;
        for (i, d) in self.data.iter().enumerate() {
            write!(f, "{}{d:#x}", if i == 0 { "" } else { " " })?;
        }
        write!(f, "], rip {:#x}", self.rip)?;
        match self.rip_phys {
            Some(p) => write!(f, " (phys {p:#x})")?,
            None => write!(f, " (untranslatable)")?,
        }
        write!(
            f,
            ", cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}, bytes at rip:",
            self.cr0, self.cr3, self.cr4, self.efer
        )?;
        for b in &self.insn {
            write!(f, " {b:02x}")?;
        }
        Ok(())
    }
}

/// Where vCPU threads and devices report that the VM ended.
pub type ExitSender = Sender<VmExit>;

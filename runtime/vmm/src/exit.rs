//! How a VM ends, and the channel the vCPU threads and devices report it on.

use std::sync::mpsc::{SendError, Sender};

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

impl InternalErrorReport {
    /// The instruction bytes KVM itself reports with an emulation failure (suberror 1 with
    /// `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`): `data[1..3]` hold one size byte
    /// and up to 15 instruction bytes.
    pub fn kvm_insn_bytes(&self) -> Option<Vec<u8>> {
        if self.suberror != 1 || self.data.len() < 3 || self.data[0] & 1 == 0 {
            return None;
        }
        let mut raw = Vec::with_capacity(16);
        raw.extend_from_slice(&self.data[1].to_le_bytes());
        raw.extend_from_slice(&self.data[2].to_le_bytes());
        let size = usize::from(raw[0]).min(15);
        Some(raw[1..=size].to_vec())
    }
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
        if let Some(k) = self.kvm_insn_bytes() {
            write!(f, "; KVM's instruction bytes:")?;
            for b in k {
                write!(f, " {b:02x}")?;
            }
        }
        Ok(())
    }
}

/// What arrives on the VM's event channel: an ending, or a wake-up of whoever waits on it
/// (the VMM process's control loop, when a request comes in).
#[derive(Debug)]
pub(crate) enum Event {
    Exit(VmExit),
    Wake,
}

/// Where vCPU threads and devices report that the VM ended.
#[derive(Debug, Clone)]
pub struct ExitSender(pub(crate) Sender<Event>);

impl ExitSender {
    /// Reports the VM's end.
    pub fn send(&self, exit: VmExit) -> Result<(), SendError<VmExit>> {
        self.0
            .send(Event::Exit(exit.clone()))
            .map_err(|_| SendError(exit))
    }
}

/// Wakes a thread blocked in [`crate::Vmm::wait_timeout`] (which then returns `None`), so a
/// control loop can serve a request without polling.
#[derive(Debug, Clone)]
pub struct Waker(pub(crate) Sender<Event>);

impl Waker {
    /// Wakes the waiter; false if the VM is gone.
    pub fn wake(&self) -> bool {
        self.0.send(Event::Wake).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(data: Vec<u64>) -> InternalErrorReport {
        InternalErrorReport {
            vcpu: 0,
            suberror: 1,
            data,
            rip: 0xffff_ffff_8119_36e4,
            cr0: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            rip_phys: None,
            insn: vec![0xf0, 0x48],
        }
    }

    #[test]
    fn kvm_instruction_bytes_are_decoded_from_emulation_failure_data() {
        // What PVM reported for `lock cmpxchg16b 0x20(%rbp)` in ___slab_alloc.
        let r = report(vec![
            1,
            0x0f20_4dc7_0f48_f00f,
            0xc789_4d00_0001_6f84,
            0x1000,
        ]);
        let k = r.kvm_insn_bytes().unwrap();
        assert_eq!(&k[..6], &[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20]);
        assert_eq!(k.len(), 15);
        assert!(
            r.to_string()
                .contains("KVM's instruction bytes: f0 48 0f c7 4d 20")
        );
    }

    #[test]
    fn short_or_flagless_data_has_no_kvm_bytes() {
        assert!(report(vec![0, 5, 0]).kvm_insn_bytes().is_none());
        assert!(report(vec![1]).kvm_insn_bytes().is_none());
        assert!(
            report(vec![1, u64::MAX, u64::MAX])
                .kvm_insn_bytes()
                .is_some()
        );
    }

    #[test]
    fn exit_codes_are_distinct_per_kind() {
        assert_eq!(VmExit::PowerOff.exit_code(), 0);
        assert_eq!(VmExit::TripleFault { vcpu: 0 }.exit_code(), 2);
        assert_eq!(VmExit::InternalError(report(vec![])).exit_code(), 3);
        assert_eq!(VmExit::Timeout.exit_code(), 124);
    }
}

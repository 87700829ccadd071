//! What a guest crash leaves to look at.
//!
//! A triple fault (`KVM_EXIT_SHUTDOWN`) destroys the evidence before the VMM hears of it: on
//! AMD SVM, KVM's `shutdown_interception` clears the VMCB and INITs the vCPU
//! (`kvm_vcpu_reset(vcpu, true)`, Linux 6.1 `arch/x86/kvm/svm/svm.c`) before it returns to
//! userspace, so every register, the pending events and the LAPIC read back as after an INIT
//! (RIP 0xfff0). What is still there:
//!
//! - the last exits to userspace, with the registers KVM copied into `kvm_run` at each
//!   (`KVM_CAP_SYNC_REGS`: no extra ioctl per exit), kept here in a small ring per vCPU;
//! - guest memory, intact: with `SPECC_VMM_CRASH_DUMP=<dir>` the vCPU thread writes it to
//!   `<dir>/crash-<unix ms>-<pid>-vcpu<n>.mem` (file offset = guest physical address, zero
//!   pages left as holes) beside a `.txt` copy of the report, before the VM ends. With the
//!   guest's `vmlinux` (symbols, no KASLR) that gives the kernel log buffer and the kernel's
//!   tables.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The environment variable naming the directory crash dumps go to.
pub const CRASH_DUMP_ENV: &str = "SPECC_VMM_CRASH_DUMP";

/// How many exits each vCPU remembers.
pub const HISTORY_LEN: usize = 16;

/// What an exit to userspace was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "at")]
pub enum ExitKind {
    /// Port read.
    IoIn(u16),
    /// Port write.
    IoOut(u16),
    /// MMIO read at a guest physical address.
    MmioRead(u64),
    /// MMIO write.
    MmioWrite(u64),
    /// The kick signal (a pause or another command).
    Kicked,
    /// A triple fault.
    Shutdown,
    /// Anything else, by name.
    Other(&'static str),
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitKind::IoIn(p) => write!(f, "io in {p:#x}"),
            ExitKind::IoOut(p) => write!(f, "io out {p:#x}"),
            ExitKind::MmioRead(a) => write!(f, "mmio read {a:#x}"),
            ExitKind::MmioWrite(a) => write!(f, "mmio write {a:#x}"),
            ExitKind::Kicked => write!(f, "kick"),
            ExitKind::Shutdown => write!(f, "shutdown"),
            ExitKind::Other(s) => write!(f, "{s}"),
        }
    }
}

/// One exit and where the guest was (`None`: KVM gave no registers, no `KVM_CAP_SYNC_REGS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ExitRecord {
    /// The exit's number on this vCPU (1 = the first `KVM_RUN` return).
    pub seq: u64,
    /// Since the vCPU thread started (boot or restore).
    #[serde(serialize_with = "as_us")]
    pub at: Duration,
    /// What it was.
    pub kind: ExitKind,
    /// The guest's registers at the exit.
    pub cpu: Option<CpuSnapshot>,
}

fn as_us<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u128(d.as_micros())
}

/// The registers that say where a guest was and in which context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CpuSnapshot {
    /// RIP.
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CS selector (the low 2 bits are the privilege level).
    pub cs: u16,
    /// CR0.
    pub cr0: u64,
    /// CR2 (the last page fault's address).
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// IDT base.
    pub idt: u64,
    /// GS base (the kernel's per-CPU area while in the kernel).
    pub gs_base: u64,
    /// R12 (free for a test guest to leave a marker in).
    pub r12: u64,
}

impl CpuSnapshot {
    /// From KVM's register structures.
    pub fn new(regs: &kvm_regs, sregs: &kvm_sregs) -> Self {
        CpuSnapshot {
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            cs: sregs.cs.selector,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            idt: sregs.idt.base,
            gs_base: sregs.gs.base,
            r12: regs.r12,
        }
    }
}

impl fmt::Display for CpuSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rip {:#x} rsp {:#x} rflags {:#x} cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} \
             efer {:#x} idt {:#x} gs {:#x}",
            self.rip,
            self.rsp,
            self.rflags,
            self.cs,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.efer,
            self.idt,
            self.gs_base
        )
    }
}

/// The last [`HISTORY_LEN`] exits of one vCPU, a ring without allocation per exit.
#[derive(Debug, Clone)]
pub struct ExitHistory {
    ring: [Option<ExitRecord>; HISTORY_LEN],
    next: usize,
}

impl Default for ExitHistory {
    fn default() -> Self {
        ExitHistory {
            ring: [None; HISTORY_LEN],
            next: 0,
        }
    }
}

impl ExitHistory {
    /// Remembers `r`, forgetting the oldest when full.
    pub fn push(&mut self, r: ExitRecord) {
        self.ring[self.next] = Some(r);
        self.next = (self.next + 1) % HISTORY_LEN;
    }

    /// The remembered exits, oldest first.
    pub fn records(&self) -> Vec<ExitRecord> {
        (0..HISTORY_LEN)
            .filter_map(|i| self.ring[(self.next + i) % HISTORY_LEN])
            .collect()
    }
}

/// What the VMM knows about a triple fault.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CrashReport {
    /// The vCPU.
    pub vcpu: u8,
    /// Exits of this vCPU in all, the shutdown included.
    pub exits: u64,
    /// Since the vCPU thread started (boot or restore).
    #[serde(serialize_with = "as_us")]
    pub after: Duration,
    /// The registers as they read at the shutdown exit (after KVM's reset on SVM; `None`
    /// without sync regs).
    pub at_shutdown: Option<CpuSnapshot>,
    /// The exits before it, oldest first.
    pub last_exits: Vec<ExitRecord>,
    /// Where the memory dump went, if one was asked for and written.
    pub dump: Option<PathBuf>,
}

impl CrashReport {
    /// One line: when, what the registers at the exit say, where the dump went.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "vcpu {} triple fault (KVM_EXIT_SHUTDOWN), exit {} of this vCPU, {:.3} s after it \
             started",
            self.vcpu,
            self.exits,
            self.after.as_secs_f64()
        );
        match &self.at_shutdown {
            Some(c) if c.rip == 0xfff0 => s.push_str(&format!(
                "; KVM had reset the vCPU before the exit (rip {:#x} cr0 {:#x}: an INIT), so \
                 the registers are lost",
                c.rip, c.cr0
            )),
            Some(c) => s.push_str(&format!("; registers at the exit: {c}")),
            None => s.push_str("; no registers (KVM_CAP_SYNC_REGS missing)"),
        }
        if let Some(d) = &self.dump {
            s.push_str(&format!("; guest memory dumped to {}", d.display()));
        }
        s
    }

    /// The exits before the fault, one line each after a heading, oldest first.
    pub fn exits_text(&self) -> String {
        let mut s = format!(
            "vcpu {}: the last {} exits to userspace before the triple fault, oldest first:",
            self.vcpu,
            self.last_exits.len()
        );
        for r in &self.last_exits {
            s.push_str(&format!(
                "\n  #{} at {:.6} s ({:.6} s before the fault): {}",
                r.seq,
                r.at.as_secs_f64(),
                self.after.saturating_sub(r.at).as_secs_f64(),
                r.kind
            ));
            if let Some(c) = &r.cpu {
                s.push_str(&format!(": {c}"));
            }
        }
        s
    }
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n{}", self.summary(), self.exits_text())
    }
}

/// Errors of writing a crash dump.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Creating or writing a file failed.
    #[error("writing {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// Reading guest memory failed.
    #[error("reading guest memory at {0:#x}")]
    Read(u64),
}

/// Writes guest memory to `<dir>/<stem>.mem` (file offset = guest physical address; pages
/// of zeros are left as holes, so the file is sparse) and `report` as text to
/// `<dir>/<stem>.txt`. Returns the memory file's path.
pub fn dump(
    memory: &GuestMemoryMmap,
    dir: &Path,
    stem: &str,
    report: &str,
) -> Result<PathBuf, DumpError> {
    std::fs::create_dir_all(dir).map_err(|e| DumpError::Write(dir.to_owned(), e))?;
    let mem_path = dir.join(format!("{stem}.mem"));
    let txt_path = dir.join(format!("{stem}.txt"));
    std::fs::write(&txt_path, report).map_err(|e| DumpError::Write(txt_path.clone(), e))?;
    let mut file =
        std::fs::File::create(&mem_path).map_err(|e| DumpError::Write(mem_path.clone(), e))?;
    let werr = |e| DumpError::Write(mem_path.clone(), e);
    let mut end = 0u64;
    let mut page = [0u8; 4096];
    for region in memory.iter() {
        let start = region.start_addr().raw_value();
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let gpa = start + off;
            let n = usize::try_from((len - off).min(4096)).unwrap_or(4096);
            memory
                .read_slice(&mut page[..n], vm_memory::GuestAddress(gpa))
                .map_err(|_| DumpError::Read(gpa))?;
            if page[..n].iter().any(|&b| b != 0) {
                std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(gpa)).map_err(werr)?;
                file.write_all(&page[..n]).map_err(werr)?;
            }
            off += n as u64;
        }
        end = end.max(start + len);
    }
    // The file covers all of guest RAM even when its last pages are zero.
    file.set_len(end).map_err(werr)?;
    Ok(mem_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> ExitRecord {
        ExitRecord {
            seq,
            at: Duration::from_millis(seq),
            kind: ExitKind::IoOut(0x3f8),
            cpu: None,
        }
    }

    #[test]
    fn history_keeps_the_last_exits_oldest_first() {
        let mut h = ExitHistory::default();
        assert!(h.records().is_empty());
        for seq in 1..=3 {
            h.push(record(seq));
        }
        let seqs = |h: &ExitHistory| h.records().iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&h), vec![1, 2, 3]);
        for seq in 4..=(HISTORY_LEN as u64 + 5) {
            h.push(record(seq));
        }
        let want: Vec<u64> = (6..=(HISTORY_LEN as u64 + 5)).collect();
        assert_eq!(seqs(&h), want);
    }

    #[test]
    fn report_summary_is_one_line_and_each_exit_has_its_own() {
        let cpu = |rip| CpuSnapshot {
            rip,
            rsp: 0,
            rflags: 2,
            cs: 0x10,
            cr0: 0x10,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            idt: 0,
            gs_base: 0,
            r12: 0,
        };
        let mut last = record(7);
        last.cpu = Some(cpu(0xffff_ffff_8100_1234));
        let r = CrashReport {
            vcpu: 0,
            exits: 9,
            after: Duration::from_millis(20),
            at_shutdown: Some(cpu(0xfff0)),
            last_exits: vec![record(6), last],
            dump: Some(PathBuf::from("/d/crash-1-vcpu0.mem")),
        };
        let summary = r.summary();
        assert_eq!(summary.lines().count(), 1, "{summary}");
        assert!(summary.contains("reset the vCPU"), "{summary}");
        assert!(summary.contains("/d/crash-1-vcpu0.mem"), "{summary}");
        let text = r.exits_text();
        let exits: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(exits.len(), 2);
        assert!(exits[1].starts_with("  #7 at 0.007000 s (0.013000 s before the fault): io out 0x3f8: rip 0xffffffff81001234"), "{}", exits[1]);
    }

    #[test]
    fn dump_writes_memory_at_its_guest_addresses_and_leaves_zero_pages_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[
            (vm_memory::GuestAddress(0), 0x4000),
            (vm_memory::GuestAddress(0x10_0000), 0x2000),
        ])
        .unwrap();
        mem.write_slice(b"low", vm_memory::GuestAddress(0x1000))
            .unwrap();
        mem.write_slice(b"high", vm_memory::GuestAddress(0x10_1ffc))
            .unwrap();
        let path = dump(&mem, dir.path(), "crash-test", "the report").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 0x10_2000);
        assert_eq!(&bytes[0x1000..0x1003], b"low");
        assert_eq!(&bytes[0x10_1ffc..], b"high");
        assert!(bytes[..0x1000].iter().all(|&b| b == 0));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("crash-test.txt")).unwrap(),
            "the report"
        );
        // Only the two written pages take space.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
        assert!(blocks * 512 <= 4 * 4096, "{blocks} blocks");
    }
}

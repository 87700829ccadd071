//! Promotion of a restored VM's guest RAM to anonymous transparent huge pages, done before its
//! first live fork so that the fork's pause does not grow with guest memory.
//!
//! A restored VM's RAM is a `MAP_PRIVATE` mapping of its memory file, which has 4 KiB pages
//! only; `fork(2)` copies one page-table entry per touched page (38 ms at 256 MiB, 194 ms at
//! 2 GiB here, docs/benchmarks.md). Promotion copies RAM into an anonymous `MADV_HUGEPAGE`
//! mapping *while the guest runs*, then, in the fork's pause, copies what changed meanwhile and
//! swaps the mappings in place ([`crate::vstate::memory::Promotion`]).
//!
//! What changed meanwhile: vCPU writes (and KVM's own, such as kvmclock) come from KVM's dirty
//! page log, turned on for the copy. Device emulation writes guest memory through the host
//! mapping, which the dirty log never sees; this host kernel has no soft-dirty bits
//! (`CONFIG_MEM_SOFT_DIRTY` is off), userfaultfd cannot write-protect a private file mapping,
//! and the devices' guest memory carries no dirty bitmap. So after the copy the device
//! workers are stopped and every page is compared with its copy (what differs and is not
//! in the dirty log is what a device wrote): the guest runs on meanwhile and only its I/O
//! waits, for the comparison, which reads resident memory and costs a fraction of the copy
//! (it still grows with memory; the vCPU pause does not).

use std::time::Instant;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::Vmm;
use crate::vstate::fork_image::ForkImage;
use crate::vstate::memory::{CopyStats, Promotion, Retired};

/// Dirty-log rounds after the bulk copy, at most, before the final copy in the pause.
const MAX_ROUNDS: u32 = 8;
/// A round that finds at most this many dirty pages (1 MiB) is the last one before the pause.
const SMALL_ROUND: u64 = 256;

/// Errors of promoting guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Turning KVM's dirty log on or reading it failed.
    #[error("KVM dirty page log")]
    DirtyLog(#[source] crate::vstate::vm::Error),
    /// Mapping, copying or swapping memory failed.
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::Error),
    /// Building a precopy fork's memory image failed.
    #[error(transparent)]
    Image(#[from] crate::vstate::fork_image::Error),
    /// Pausing or resuming the vCPUs failed.
    #[error("pausing the vCPUs for the swap")]
    Vcpus(#[source] crate::Error),
    /// Restarting the device workers failed.
    #[error("restarting the device workers")]
    Devices(#[source] specc_devices::virtio::ActivateError),
    /// The VM is paused (or ended): promotion copies while the guest runs.
    #[error("the VM is not running; promotion copies its memory while it runs")]
    NotRunning,
}

impl Error {
    /// Whether guest memory is lost (the VM must end); otherwise it is intact.
    pub fn memory_lost(&self) -> bool {
        matches!(
            self,
            Error::Memory(crate::vstate::memory::Error::PromoteLost(..))
        )
    }
}

/// What a promotion cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PromotionReport {
    /// From the start until the vCPUs were paused for the swap; the guest ran.
    pub precopy_us: u64,
    /// The bulk copy and the collapse of what it got as 4 KiB pages, part of `precopy_us`
    /// (device workers running).
    pub copy_us: u64,
    /// From stopping the device workers until the vCPUs were paused: the comparison and a
    /// last dirty-log round. The guest ran, its I/O waited (the devices stay stopped through
    /// the pause that follows).
    pub devices_stopped_us: u64,
    /// Pages the comparison found different (device writes, and guest writes it raced).
    pub differing_pages: u64,
    /// Bytes of the bulk copy.
    pub copied_bytes: u64,
    /// 2 MiB chunks left unpopulated (all zero, never written since the restore).
    pub skipped_chunks: u64,
    /// Bytes of the copy in huge pages after the bulk copy (the rest are 4 KiB pages, which a
    /// fork copies entry by entry: the host had no free huge pages).
    pub huge_bytes: u64,
    /// Dirty-log rounds while the guest ran.
    pub rounds: u32,
    /// Pages those rounds copied.
    pub round_pages: u64,
    /// Pages copied with the vCPUs paused.
    pub final_pages: u64,
    /// The final copy and the swap, with the vCPUs paused (part of a fork's pause).
    pub swap_us: u64,
}

/// A promotion between its copy (guest running) and its swap (guest paused), or a precopy
/// fork's image between its copy and the fork.
#[derive(Debug)]
pub(crate) struct Precopied<T> {
    pub(crate) target: T,
    pub(crate) report: PromotionReport,
    pub(crate) t0: Instant,
}

/// What [`Vmm::precopy_into`] copies guest memory into while the guest runs.
pub(crate) trait Target {
    /// The bulk copy; returns its statistics and the bytes of the copy in huge pages.
    fn copy_everything(&mut self) -> Result<(CopyStats, u64), Error>;
    /// Copies the pages a dirty log names; returns how many.
    fn copy_logged(&mut self, log: &[Vec<u64>]) -> u64;
    /// With the device workers stopped: copies what differs (device writes); returns how many.
    fn copy_changed(&mut self) -> Result<u64, Error>;
}

impl Target for Promotion {
    fn copy_everything(&mut self) -> Result<(CopyStats, u64), Error> {
        let stats = self.copy_all()?;
        Ok((stats, self.collapse()))
    }

    fn copy_logged(&mut self, log: &[Vec<u64>]) -> u64 {
        self.copy_pages(log)
    }

    fn copy_changed(&mut self) -> Result<u64, Error> {
        Ok(self.copy_differing())
    }
}

impl Target for ForkImage {
    fn copy_everything(&mut self) -> Result<(CopyStats, u64), Error> {
        // The image is a memfd without huge pages (a child's private mapping of it gets 4 KiB
        // pages whatever the source's are).
        Ok((self.copy_all()?, 0))
    }

    fn copy_logged(&mut self, log: &[Vec<u64>]) -> u64 {
        self.copy_pages(log)
    }

    fn copy_changed(&mut self) -> Result<u64, Error> {
        Ok(self.copy_differing()?)
    }
}

fn micros(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

impl Vmm {
    /// Whether guest RAM is still a private file mapping (a restored VM not yet promoted):
    /// forking it would copy one page-table entry per touched 4 KiB page.
    pub fn needs_promotion(&self) -> bool {
        !self.promoted && self.vm.memory.iter().any(|r| r.file_offset().is_some())
    }

    /// Whether [`Vmm::fork`] promotes a restored VM's memory first (the default). Off, a
    /// restored VM keeps sharing its memory file's pages and every fork copies 4 KiB entries.
    pub fn set_promote_on_fork(&mut self, on: bool) {
        self.promote_on_fork = on;
    }

    /// Promotes guest RAM to anonymous huge pages now (see the module docs), if it needs it:
    /// what the first fork of a restored VM otherwise does first. Running, the vCPUs stop
    /// only for the last dirty pages and the swap, and the device workers for the comparison
    /// after the copy. Paused, the copy is made while it stays paused (no dirty log, no
    /// comparison: nothing writes guest memory with the vCPUs and device workers stopped).
    /// `Ok(None)`: nothing to do.
    pub fn promote_memory(&mut self) -> Result<Option<PromotionReport>, Error> {
        if !self.needs_promotion() {
            return Ok(None);
        }
        if self.ended.is_some() {
            return Err(Error::NotRunning);
        }
        if self.paused {
            let (report, retired) = self.promote_paused()?;
            self.retire_on_thread(retired);
            return Ok(Some(report));
        }
        let pre = self.precopy()?;
        if let Err(e) = self.pause() {
            self.abandon(pre);
            return Err(Error::Vcpus(e));
        }
        let finished = self.finish_promotion(pre);
        let resumed = self.resume().map_err(Error::Vcpus);
        let devices = self.resume_devices().map_err(Error::Devices);
        let (report, retired) = finished?;
        self.retire(retired);
        resumed?;
        devices?;
        Ok(Some(report))
    }

    /// [`Vmm::promote_memory`] of a paused VM: the device workers stop for the copy and the
    /// swap (the vCPUs stay paused throughout). Returns the old mappings to unmap.
    pub(crate) fn promote_paused(&mut self) -> Result<(PromotionReport, Retired), Error> {
        let t0 = Instant::now();
        self.pause_devices();
        let copied = Promotion::new(&self.vm.memory).and_then(|p| {
            let stats = p.copy_all()?;
            Ok((p, stats))
        });
        let (promotion, stats) = match copied {
            Ok(c) => c,
            Err(e) => {
                self.resume_devices().map_err(Error::Devices)?;
                return Err(e.into());
            }
        };
        let mut report = PromotionReport {
            huge_bytes: promotion.collapse(),
            copy_us: micros(t0),
            copied_bytes: stats.copied_bytes,
            skipped_chunks: stats.skipped_chunks,
            ..PromotionReport::default()
        };
        report.precopy_us = report.copy_us;
        let t_swap = Instant::now();
        let swapped = promotion.swap();
        let devices = self.resume_devices().map_err(Error::Devices);
        let retired = swapped?;
        self.promoted = true;
        report.swap_us = micros(t_swap);
        tracing::debug!("promote (paused): {report:?}");
        devices?;
        Ok((report, retired))
    }

    /// Unmaps a promotion's old mappings on a thread of their own (O(pages), tens to
    /// hundreds of ms), remembered so that the next fork can wait for it outside its pause.
    fn retire_on_thread(&mut self, retired: Retired) {
        self.join_retiring();
        match std::thread::Builder::new()
            .name("promote-unmap".into())
            .spawn(move || drop(retired))
        {
            Ok(h) => self.retiring = Some(h),
            Err(e) => tracing::warn!("unmapping the old guest memory mapping on a thread: {e}"),
        }
    }

    /// Waits until the old mappings of an earlier promotion are unmapped: `fork(2)` takes the
    /// `mmap` lock the unmapping holds, and would wait for it inside the pause.
    pub(crate) fn join_retiring(&mut self) {
        if let Some(h) = self.retiring.take() {
            let _ = h.join();
        }
    }

    /// Turns the dirty log on and copies guest memory into a promotion's copy while the vCPUs
    /// and devices run, until a round finds few dirty pages; then stops the device workers
    /// and copies what differs. On an error everything is undone.
    pub(crate) fn precopy(&mut self) -> Result<Precopied<Promotion>, Error> {
        self.precopy_into(|mem| Ok(Promotion::new(mem)?))
    }

    /// [`Vmm::precopy`] into any [`Target`] (a promotion's copy, or a precopy fork's image)
    /// that `make` creates over guest memory.
    pub(crate) fn precopy_into<T: Target>(
        &mut self,
        make: impl FnOnce(&vm_memory::GuestMemoryMmap) -> Result<T, Error>,
    ) -> Result<Precopied<T>, Error> {
        let t0 = Instant::now();
        let undo = |vmm: &mut Vmm| {
            let _ = vmm.vm.set_dirty_logging(false);
            if let Err(e) = vmm.resume_devices() {
                tracing::error!("resuming devices after a failed precopy: {e}");
            }
        };
        let mut target = match make(&self.vm.memory) {
            Ok(p) => p,
            Err(e) => {
                undo(self);
                return Err(e);
            }
        };
        // On before the copy starts: whatever the guest writes after a page was read is in it.
        if let Err(e) = self.vm.set_dirty_logging(true) {
            undo(self);
            return Err(Error::DirtyLog(e));
        }
        tracing::debug!("precopy: dirty log on {:?}", t0.elapsed());
        let mut report = PromotionReport::default();
        let t_copy = Instant::now();
        let (stats, huge) = match target.copy_everything() {
            Ok(s) => s,
            Err(e) => {
                undo(self);
                return Err(e);
            }
        };
        #[cfg(test)]
        if let Some(hook) = *tests::AFTER_BULK_COPY
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            hook(&self.vm.memory);
        }
        report.huge_bytes = huge;
        report.copy_us = micros(t_copy);
        report.copied_bytes = stats.copied_bytes;
        report.skipped_chunks = stats.skipped_chunks;
        tracing::debug!("precopy: copied {stats:?} {:?}", t0.elapsed());
        while report.rounds < MAX_ROUNDS {
            let log = match self.vm.take_dirty_log() {
                Ok(l) => l,
                Err(e) => {
                    undo(self);
                    return Err(Error::DirtyLog(e));
                }
            };
            let pages = target.copy_logged(&log);
            report.rounds += 1;
            report.round_pages += pages;
            tracing::debug!("precopy: round {} {pages} pages", report.rounds);
            if pages <= SMALL_ROUND {
                break;
            }
        }
        let t_dev = Instant::now();
        self.pause_devices();
        report.differing_pages = match target.copy_changed() {
            Ok(n) => n,
            Err(e) => {
                undo(self);
                return Err(e);
            }
        };
        // What the guest wrote during the comparison, so the pause copies little.
        match self.vm.take_dirty_log() {
            Ok(log) => report.round_pages += target.copy_logged(&log),
            Err(e) => {
                undo(self);
                return Err(Error::DirtyLog(e));
            }
        }
        report.devices_stopped_us = micros(t_dev);
        tracing::debug!(
            "precopy: {} pages differed {:?}",
            report.differing_pages,
            t0.elapsed()
        );
        Ok(Precopied { target, report, t0 })
    }

    /// With the vCPUs paused (and the device workers still stopped): copies the last dirty
    /// pages and swaps the copy in. Returns the old mappings, to be [`Vmm::retire`]d once the
    /// VM runs again. On an error the dirty log is turned off again and guest memory is
    /// intact, unless [`Error::memory_lost`].
    pub(crate) fn finish_promotion(
        &mut self,
        pre: Precopied<Promotion>,
    ) -> Result<(PromotionReport, Retired), Error> {
        let Precopied {
            target: promotion,
            mut report,
            t0,
        } = pre;
        report.precopy_us = micros(t0);
        let t_swap = Instant::now();
        let log = match self.vm.take_dirty_log() {
            Ok(l) => l,
            Err(e) => {
                let _ = self.vm.set_dirty_logging(false);
                return Err(Error::DirtyLog(e));
            }
        };
        report.final_pages = promotion.copy_pages(&log);
        match promotion.swap() {
            Ok(retired) => {
                self.promoted = true;
                report.swap_us = micros(t_swap);
                tracing::debug!("promote: swapped {report:?}");
                Ok((report, retired))
            }
            Err(e) => {
                let _ = self.vm.set_dirty_logging(false);
                Err(e.into())
            }
        }
    }

    /// Drops a precopied promotion or image that will not be used (the VM could not be
    /// paused).
    pub(crate) fn abandon<T: Target>(&mut self, pre: Precopied<T>) {
        drop(pre);
        let _ = self.vm.set_dirty_logging(false);
        if let Err(e) = self.resume_devices() {
            tracing::error!("resuming devices after a failed promotion: {e}");
        }
    }

    /// After the VM runs again: turns the dirty log off (a memory-slot update, several ms
    /// here, with the guest running) and unmaps the old mappings on a thread of their own
    /// (O(pages), tens of ms).
    pub(crate) fn retire(&mut self, retired: Retired) {
        if let Err(e) = self.vm.set_dirty_logging(false) {
            tracing::warn!("turning the dirty log off after a promotion: {e}");
        }
        self.retire_on_thread(retired);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    /// Called right after a precopy's bulk copy (the guest still runs, the dirty log is on):
    /// lets a test write guest memory as a device would, through the host mapping, where only
    /// the comparison can find it.
    pub(crate) static AFTER_BULK_COPY: std::sync::Mutex<Option<fn(&vm_memory::GuestMemoryMmap)>> =
        std::sync::Mutex::new(None);
}

//! Snapshots and live fork of a running VM.
//!
//! A [`Captured`] state is everything a restore needs besides guest memory and disk contents:
//! vCPUs, irqchip/PIT/kvmclock, COM1 and every virtio device. A fork keeps it in memory and
//! hands it to `fork(2)` children that share the source's memory copy-on-write; a snapshot
//! writes it to a directory beside the memory file and the frozen disk diffs (see
//! [`crate::snapshot_dir`]).

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::device_manager::legacy::SerialSnapshot;
use crate::virtio::DeviceSnapshot;
use crate::vstate::memory::MemoryBacking;
use crate::{Error, VcpuState, VmState, Vmm};

/// A paused VM's state, minus memory and disk contents.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Captured {
    /// irqchip, PIT, kvmclock.
    pub vm: VmState,
    /// Every vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The virtio devices, in attach order.
    pub devices: Vec<DeviceSnapshot>,
}

/// Errors of forking a VM.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// Pausing or capturing the source failed (the source was resumed).
    #[error("capturing the source VM")]
    Capture(#[source] Error),
    /// Freezing a disk failed.
    #[error("freezing disk {index}")]
    Freeze {
        /// The disk.
        index: usize,
        /// The cause.
        #[source]
        source: specc_devices::disk::DiskError,
    },
    /// A child's run directory could not be created.
    #[error("creating the child's run directory {}", .0.display())]
    ChildDir(PathBuf, #[source] std::io::Error),
    /// pipe(2) or fork(2) failed.
    #[error("{0}")]
    Os(&'static str, #[source] std::io::Error),
    /// Restarting the source's devices failed.
    #[error("resuming the source's devices")]
    Resume(#[source] specc_devices::virtio::ActivateError),
    /// No child directories were given.
    #[error("a fork needs at least one child")]
    NoChildren,
    /// Promoting the source's memory failed midway and its memory is lost (it was stopped).
    #[error("promoting the source's memory")]
    Promote(#[source] crate::promote::Error),
}

/// How a live fork gives its children the source's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForkMode {
    /// `fork(2)` of the VMM process shares guest RAM copy-on-write with the children. Nothing
    /// is copied up front, but `fork(2)` copies a page-table entry per mapped page (per 2 MiB
    /// with huge pages) inside the source's pause, so the pause grows with guest memory; a
    /// restored VM is promoted to huge pages first (promote.rs).
    Cow,
    /// Guest RAM is copied into a fresh memfd while the guest runs (dirty-log rounds, then a
    /// comparison with the device workers stopped), the pause copies the last dirty pages
    /// and `fork(2)`s with guest RAM left out (`MADV_DONTFORK`), and the children map the
    /// memfd privately at RAM's addresses ([`crate::vstate::fork_image`]). The pause does
    /// not depend on memory size; the copy costs time before it and one copy of the touched
    /// RAM, shared by all children of the fork. The default (docs/fork.md says why).
    #[default]
    Precopy,
}

fn cow() -> ForkMode {
    ForkMode::Cow
}

/// What a fork call returns, in each process.
// Returned once per fork and matched at once: boxing the report would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Forked {
    /// In the source's process (the source runs again): what became of the children.
    Source(ForkReport),
    /// In a child's process, whose [`Vmm`] is now the child's own VM, already running.
    Child {
        /// Its configuration ([`child_config`] of the source's).
        config: Box<VmConfig>,
        /// Which of the requested children this is.
        index: usize,
    },
}

/// The outcome of a fork, as the source sees it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ForkReport {
    /// How long the source's guest did not run: from the first vCPU thread's `KVM_RUN`
    /// returning to the pause's kick until the last one went back to the guest, as the vCPU
    /// threads timed it. For a paused source, `owner_us`.
    pub pause_us: u64,
    /// The same pause as the controlling thread saw it: from kicking the vCPUs until it
    /// heard the last one had resumed (it adds the kick's delivery, while the guest still
    /// ran, and this thread's own wake-up, while the guest ran again).
    #[serde(default)]
    pub owner_us: u64,
    /// One entry per requested child, in request order.
    pub children: Vec<ChildReport>,
    /// The first fork of a restored VM promotes its memory first (its swap is part of
    /// `pause_us`; for a paused VM all of it happens before the fork's own work).
    #[serde(default)]
    pub promotion: Option<crate::promote::PromotionReport>,
    /// Where `pause_us` went.
    #[serde(default)]
    pub phases: PauseBreakdown,
    /// How the children got the source's memory (a report without it predates precopy).
    #[serde(default = "cow")]
    pub mode: ForkMode,
    /// A precopy fork's copy into its image, made while the guest ran (the same fields as a
    /// promotion's: `swap_us` is the last dirty pages' copy in the pause, `huge_bytes` 0).
    /// `None` for a copy-on-write fork, or when the copy failed and the fork fell back to one.
    #[serde(default)]
    pub precopy: Option<crate::promote::PromotionReport>,
    /// How guest RAM was backed when it was forked (read just before the pause; after the
    /// resume when the pause swapped promoted memory in). `None` if `/proc/self/smaps` could
    /// not be read.
    #[serde(default)]
    pub memory: Option<crate::vstate::memory::Usage>,
    /// 4 KiB pages of anonymous guest RAM collapsed into huge pages before the pause, if
    /// there were enough to matter.
    #[serde(default)]
    pub collapse: Option<CollapseReport>,
}

/// The spans of a fork's pause as the controlling thread saw them, in microseconds
/// (monotonic clock), in order; they add up to `owner_us` but for a few µs of bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PauseBreakdown {
    /// Kicking every vCPU out of `KVM_RUN` until each is parked (0 for a paused source).
    pub vcpu_stop_us: u64,
    /// Stopping the virtio device workers.
    pub devices_stop_us: u64,
    /// A promotion's last dirty pages and swap (first fork of a running restored VM).
    pub promotion_swap_us: u64,
    /// A precopy fork's last dirty pages copied into its image.
    #[serde(default)]
    pub final_copy_us: u64,
    /// Freezing the disk diffs and capturing VM (irqchip, PIT, clock) and device state.
    pub capture_us: u64,
    /// Two `pipe(2)`s and `fork(2)` until it returned in the source.
    pub fork_us: u64,
    /// Restarting the device workers.
    pub devices_resume_us: u64,
    /// Resuming the vCPUs until each acknowledged (0 for a paused source).
    pub vcpu_resume_us: u64,
}

/// What collapsing guest RAM into huge pages before a fork's pause did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CollapseReport {
    /// `MADV_COLLAPSE` and the re-read of the page tables (the guest ran).
    pub us: u64,
    /// Resident guest RAM in 4 KiB entries before it.
    pub small_page_bytes_before: u64,
}

/// 4 KiB-mapped guest RAM worth collapsing before a fork: `fork(2)` copies ~0.1 µs per 4 KiB
/// entry here, so 4 MiB of them (1024 entries) is about 0.1 ms of pause.
const COLLAPSE_MIN_BYTES: u64 = 4 << 20;

/// One fork child.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChildReport {
    /// Its run directory.
    pub dir: PathBuf,
    /// Its VMM process (0 if it never reported).
    pub pid: i32,
    /// From the fork request until its vCPUs ran.
    pub ready_us: Option<u64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The configuration of a fork child whose run directory is `dir`: the same VM with its own
/// console log, vsock socket, control socket, passt log and a fresh disk diff per disk over
/// `disk_stacks` (the source's frozen layers). Paths follow [`child_paths`].
pub fn child_config(source: &VmConfig, dir: &Path, disk_stacks: &[Vec<PathBuf>]) -> VmConfig {
    let p = child_paths(dir);
    let mut c = source.clone();
    if c.serial.log.is_some() {
        c.serial.log = Some(p.serial_log);
    }
    for (i, d) in c.disks.iter_mut().enumerate() {
        if let Some(stack) = disk_stacks.get(i) {
            d.layers = stack.clone();
        }
        d.top = dir.join(format!("disk{i}.diff"));
    }
    if let Some(v) = &mut c.vsock {
        v.uds_path = p.vsock;
    }
    if let Some(n) = &mut c.net
        && let crate::config::NetBackend::Passt { log: Some(log), .. } = &mut n.backend
    {
        *log = dir.join("passt.log");
    }
    if c.control.is_some() {
        c.control = Some(p.control);
    }
    c.memory = MemoryBacking::Anonymous;
    c
}

/// Where a fork child (or a restored VM) keeps its sockets and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildPaths {
    /// Console log (if the source logged its console).
    pub serial_log: PathBuf,
    /// vsock host socket.
    pub vsock: PathBuf,
    /// VMM control socket.
    pub control: PathBuf,
}

/// The fixed file names in a child's run directory.
pub fn child_paths(dir: &Path) -> ChildPaths {
    ChildPaths {
        serial_log: dir.join("console.log"),
        vsock: dir.join("vsock.sock"),
        control: dir.join("control.sock"),
    }
}

impl Vmm {
    /// The state of a VM whose vCPUs are paused and whose device workers are stopped.
    pub fn capture(&self) -> Result<Captured, Error> {
        let vcpus = self.save_vcpu_states()?;
        self.capture_with(vcpus)
    }

    /// [`Vmm::capture`] with the vCPU states read already.
    fn capture_with(&self, vcpus: Vec<VcpuState>) -> Result<Captured, Error> {
        Ok(Captured {
            vm: self.save_vm_state()?,
            vcpus,
            serial: self.devices.legacy.save_serial(),
            devices: self
                .virtio
                .iter()
                .map(crate::virtio::Attached::save)
                .collect(),
        })
    }

    /// Freezes every disk's top diff into `frozen(i)` and continues on a fresh diff at the old
    /// path; returns each disk's read-only stack, bottom first.
    pub(crate) fn freeze_disks(
        &mut self,
        frozen: impl Fn(usize) -> PathBuf,
        durable: bool,
    ) -> Result<Vec<Vec<PathBuf>>, (usize, specc_devices::disk::DiskError)> {
        self.virtio
            .iter()
            .filter_map(|d| d.disk.as_ref())
            .enumerate()
            .map(|(i, disk)| disk.freeze_into(&frozen(i), durable).map_err(|e| (i, e)))
            .collect()
    }

    /// Live fork: `dirs.len()` independent copies of this running VM, each in its own VMM
    /// process with its run directory `dirs[i]` ([`child_config`]).
    ///
    /// The source stops only for the state capture, the disk freeze and one `fork(2)` (the
    /// page-table copy, small with huge pages), whatever the number of children: the first
    /// child forks the others before it runs. Children restore over the inherited
    /// `MAP_PRIVATE` memory, so they share every page nobody writes. Call it from the thread
    /// that owns the VM while no other thread of this process holds a lock the children would
    /// need (the VMM process's control loop does).
    pub fn fork(&mut self, config: &VmConfig, dirs: &[PathBuf]) -> Result<Forked, ForkError> {
        self.fork_with(config, dirs, config.fork_mode)
    }

    /// [`Vmm::fork`] in the given [`ForkMode`] (whatever `config.fork_mode` says; the
    /// children's configuration keeps `config`'s). A precopy fork whose copy fails falls back to
    /// a copy-on-write fork (with a warning; the report's `precopy` is then `None`).
    pub fn fork_with(
        &mut self,
        config: &VmConfig,
        dirs: &[PathBuf],
        mode: ForkMode,
    ) -> Result<Forked, ForkError> {
        if dirs.is_empty() {
            return Err(ForkError::NoChildren);
        }
        for d in dirs {
            std::fs::create_dir_all(d).map_err(|e| ForkError::ChildDir(d.clone(), e))?;
        }
        let was_paused = self.paused;
        self.join_retiring();
        let mut image = if mode == ForkMode::Precopy {
            self.precopy_image(was_paused)
        } else {
            None
        };
        let promote = image.is_none() && self.promote_on_fork && self.needs_promotion();
        let mut promotion = None;
        if promote && was_paused {
            // A paused guest does not run while its memory is copied: promote all of it now,
            // within the pause the caller asked for, and fork the promoted memory. The old
            // mappings are unmapped here too: fork(2) would wait for that inside the pause.
            match self.promote_paused() {
                Ok((report, retired)) => {
                    promotion = Some(report);
                    drop(retired);
                }
                Err(e) if e.memory_lost() => return Err(self.lose_memory(e)),
                Err(e) => tracing::warn!(
                    "fork: promoting memory failed, forking 4 KiB pages: {}",
                    crate::error_chain(&e)
                ),
            }
        }
        let precopied = if promote && !was_paused {
            match self.precopy() {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(
                        "fork: promoting memory failed, forking 4 KiB pages: {}",
                        crate::error_chain(&e)
                    );
                    None
                }
            }
        } else {
            None
        };
        self.join_retiring();
        let mut usage = crate::vstate::memory::usage(&self.vm.memory).ok();
        let mut collapse = None;
        if let Some(u) = usage
            && precopied.is_none()
            && image.is_none()
            && self.promote_on_fork
            && config.hugepages
            && !self.needs_promotion()
            && u.small_page_bytes() >= COLLAPSE_MIN_BYTES
        {
            // Anonymous RAM the fault path gave 4 KiB pages (no free huge page then), or
            // whose huge pages copy-on-write after an earlier fork split: collapse it while
            // the guest runs, so that fork(2) copies 2 MiB entries.
            let t = Instant::now();
            crate::vstate::memory::collapse(&self.vm.memory);
            usage = crate::vstate::memory::usage(&self.vm.memory).ok();
            collapse = Some(CollapseReport {
                us: micros(t.elapsed()),
                small_page_bytes_before: u.small_page_bytes(),
            });
            tracing::debug!("fork: collapsed {collapse:?}, now {usage:?}");
        }
        let mut phases = PauseBreakdown::default();
        // The source's pause starts here.
        let t0 = Instant::now();
        let mut mark = t0;
        let mut span = |field: &mut u64| {
            let now = Instant::now();
            *field = micros(now - mark);
            mark = now;
        };
        // The vCPU states are read in the pause's round trip (they cannot change while the
        // vCPUs are paused, whatever happens to memory and devices meanwhile).
        let (vcpu_states, stopped_at) = match self.pause_and_save_vcpus() {
            Ok(s) => s,
            Err(e) => {
                if let Some(p) = precopied {
                    self.abandon(p);
                }
                if let Some(p) = image {
                    self.abandon(p);
                }
                if !was_paused && let Err(e) = self.resume() {
                    tracing::error!("resuming vCPUs: {e}");
                }
                return Err(ForkError::Capture(e));
            }
        };
        span(&mut phases.vcpu_stop_us);
        self.pause_devices();
        span(&mut phases.devices_stop_us);
        let mut retired = None;
        if let Some(p) = precopied {
            match self.finish_promotion(p) {
                Ok((report, r)) => {
                    promotion = Some(report);
                    retired = Some(r);
                }
                Err(e) if e.memory_lost() => return Err(self.lose_memory(e)),
                Err(e) => tracing::warn!(
                    "fork: promoting memory failed, forking 4 KiB pages: {}",
                    crate::error_chain(&e)
                ),
            }
            span(&mut phases.promotion_swap_us);
        }
        if let Some(pre) = image.as_mut() {
            let t_final = Instant::now();
            // The vCPUs' last writes; the device workers stopped before the comparison. (A
            // paused source was copied whole with nothing running and no dirty log on.)
            let log = if was_paused {
                Ok(Vec::new())
            } else {
                self.vm.take_dirty_log()
            };
            let ready = log
                .map(|log| pre.report.final_pages = pre.target.copy_pages(&log))
                .map_err(|e| crate::error_chain(&e))
                .and_then(|()| {
                    crate::vstate::fork_image::set_inherited(&self.vm.memory, false)
                        .map_err(|e| crate::error_chain(&e))
                });
            if let Err(e) = ready {
                tracing::warn!("fork: precopy failed in the pause, forking copy-on-write: {e}");
                let _ = crate::vstate::fork_image::set_inherited(&self.vm.memory, true);
                let _ = self.vm.set_dirty_logging(false);
                image = None;
            } else if let Some(pre) = image.as_mut() {
                pre.report.precopy_us = micros(t0.saturating_duration_since(pre.t0));
                pre.report.swap_us = micros(t_final.elapsed());
            }
            span(&mut phases.final_copy_us);
        }
        let child_image = image.as_ref().map(|p| p.target.image(&self.vm.memory));
        let seq = self.next_freeze_seq();
        let frozen = |i: usize| -> PathBuf {
            let top = config
                .disks
                .get(i)
                .map(|d| d.top.clone())
                .unwrap_or_default();
            let mut name = top.file_name().unwrap_or_default().to_os_string();
            name.push(format!(".fork{seq}"));
            top.with_file_name(name)
        };
        let staged = self
            // Not synced: the frozen layer is live, shared through the page cache.
            .freeze_disks(frozen, false)
            .map_err(|(index, source)| ForkError::Freeze { index, source })
            .and_then(|stacks| {
                self.capture_with(vcpu_states)
                    .map(|c| (stacks, c))
                    .map_err(ForkError::Capture)
            });
        let (stacks, captured) = match staged {
            Ok(s) => s,
            Err(e) => {
                self.finish_image(image.take());
                self.restart(was_paused);
                if let Some(r) = retired {
                    self.retire(r);
                }
                return Err(e);
            }
        };
        span(&mut phases.capture_us);
        let pipes = pipe().and_then(|report| pipe().map(|resumed| (report, resumed)));
        let ((rd, wr), (resumed_rd, resumed_wr)) = match pipes {
            Ok(p) => p,
            Err(e) => {
                self.finish_image(image.take());
                self.restart(was_paused);
                if let Some(r) = retired {
                    self.retire(r);
                }
                return Err(ForkError::Os("pipe", e));
            }
        };
        // SAFETY: the VM is quiesced: vCPU threads are parked on their command channel and
        // device workers are joined, so no thread holds a lock the child touches; the child
        // only restores a VM from the state captured above and never returns into the
        // caller's stack frames with the parent's objects (it forgets them).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            self.finish_image(image.take());
            self.restart(was_paused);
            if let Some(r) = retired {
                self.retire(r);
            }
            return Err(ForkError::Os("fork", e));
        }
        if pid == 0 {
            // The old mappings were not inherited (MADV_DONTFORK): unmapping their addresses
            // here would hit whatever this process maps there next. Nor was the image's
            // shared mapping.
            std::mem::forget(retired);
            std::mem::forget(image);
            drop(rd);
            drop(resumed_wr);
            // The child's restore (closing descriptors, a new KVM VM, forking its siblings)
            // would compete for the cores with the source's resume and lengthen the source's
            // pause; it starts once the source runs again (or is gone: EOF).
            let mut byte = [0u8; 1];
            let _ = std::io::Read::read(&mut &resumed_rd, &mut byte);
            drop(resumed_rd);
            return Ok(self.become_children(
                config,
                dirs,
                &stacks,
                &captured,
                wr,
                t0,
                child_image.as_ref(),
            ));
        }
        span(&mut phases.fork_us);
        drop(wr);
        drop(resumed_rd);
        // The children exist whatever happens to the source now: resume it as far as
        // possible, reap and hear from them, then report a device failure.
        let devices = self.resume_devices();
        span(&mut phases.devices_resume_us);
        let resumed_at = if was_paused {
            None
        } else {
            match self.resume_timed() {
                Ok(at) => Some(at),
                Err(e) => {
                    tracing::error!("resuming the source after a fork: {e}");
                    None
                }
            }
        };
        span(&mut phases.vcpu_resume_us);
        let owner_us = micros(t0.elapsed());
        // What the guest saw: from its first vCPU leaving the guest to its last going back.
        let pause_us = match resumed_at {
            Some(r) if !was_paused => micros(r.saturating_duration_since(stopped_at)),
            _ => owner_us,
        };
        tracing::debug!(
            "fork: pause {pause_us} us (owner {owner_us} us): {phases:?}; memory {usage:?}"
        );
        // Lets the first child start (closing the pipe would too).
        let _ = std::io::Write::write_all(&mut &resumed_wr, b"r");
        drop(resumed_wr);
        let precopy = image.as_ref().map(|p| p.report.clone());
        self.finish_image(image);
        if let Some(r) = retired {
            self.retire(r);
            // The memory forked was the promoted copy, swapped in during the pause.
            usage = crate::vstate::memory::usage(&self.vm.memory).ok();
        }
        reap_in_background(vec![pid]);
        let children = collect_reports(rd, dirs, Duration::from_secs(60));
        devices.map_err(ForkError::Resume)?;
        Ok(Forked::Source(ForkReport {
            pause_us,
            owner_us,
            children,
            promotion,
            phases,
            mode: if precopy.is_some() {
                ForkMode::Precopy
            } else {
                ForkMode::Cow
            },
            precopy,
            memory: usage,
            collapse,
        }))
    }

    /// A precopy fork's image of guest RAM, copied while the guest runs (or, for a paused VM,
    /// while it stays paused: nothing writes guest memory with the vCPUs and device workers
    /// stopped, so neither dirty log nor comparison is needed). The device workers are left
    /// stopped, as the fork's pause needs them. `None` (with a warning, devices running) if it
    /// could not be made: the fork then shares memory copy-on-write.
    fn precopy_image(
        &mut self,
        was_paused: bool,
    ) -> Option<crate::promote::Precopied<crate::vstate::fork_image::ForkImage>> {
        use crate::vstate::fork_image::ForkImage;
        let file_backed = self.needs_promotion();
        let made = if was_paused {
            let t0 = Instant::now();
            self.pause_devices();
            ForkImage::new(&self.vm.memory, file_backed)
                .and_then(|mut target| {
                    let stats = target.copy_all()?;
                    let report = crate::promote::PromotionReport {
                        copy_us: micros(t0.elapsed()),
                        copied_bytes: stats.copied_bytes,
                        skipped_chunks: stats.skipped_chunks,
                        ..Default::default()
                    };
                    Ok(crate::promote::Precopied { target, report, t0 })
                })
                .map_err(crate::promote::Error::from)
        } else {
            self.precopy_into(|mem| Ok(ForkImage::new(mem, file_backed)?))
        };
        match made {
            Ok(p) => Some(p),
            Err(e) => {
                if was_paused && let Err(e) = self.resume_devices() {
                    tracing::error!("resuming devices after a failed precopy: {e}");
                }
                tracing::warn!(
                    "fork: precopy of guest memory failed, forking copy-on-write: {}",
                    crate::error_chain(&e)
                );
                None
            }
        }
    }

    /// After a precopy fork's `fork(2)` (or its failure), with the source running again: guest
    /// RAM is inherited by later forks again, the dirty log goes off (a memory-slot update,
    /// several ms here) and the source's shared mapping of the image is unmapped (O(pages);
    /// the children keep the image).
    fn finish_image(
        &mut self,
        image: Option<crate::promote::Precopied<crate::vstate::fork_image::ForkImage>>,
    ) {
        let Some(image) = image else { return };
        if let Err(e) = crate::vstate::fork_image::set_inherited(&self.vm.memory, true) {
            tracing::error!("fork: guest RAM stays out of later fork(2)s: {e}");
        }
        if let Err(e) = self.vm.set_dirty_logging(false) {
            tracing::warn!("turning the dirty log off after a precopy fork: {e}");
        }
        drop(image);
    }

    /// Ends a VM whose memory a failed promotion lost.
    pub(crate) fn lose_memory(&mut self, e: crate::promote::Error) -> ForkError {
        self.stop();
        self.ended = Some(crate::VmExit::VcpuError {
            vcpu: 0,
            message: format!("guest memory lost: {}", crate::error_chain(&e)),
        });
        ForkError::Promote(e)
    }

    fn restart(&mut self, was_paused: bool) {
        if let Err(e) = self.resume_devices() {
            tracing::error!("resuming devices: {e}");
        }
        if !was_paused && let Err(e) = self.resume() {
            tracing::error!("resuming vCPUs: {e}");
        }
    }

    fn next_freeze_seq(&mut self) -> u64 {
        self.freeze_seq += 1;
        self.freeze_seq
    }

    /// In the first fork child: fork the other children (this process is single-threaded
    /// now, so that is safe), then become child 0.
    // Everything the fork prepared, handed over once: a struct would only be unpacked here.
    #[allow(clippy::too_many_arguments)]
    fn become_children(
        &mut self,
        config: &VmConfig,
        dirs: &[PathBuf],
        stacks: &[Vec<PathBuf>],
        captured: &Captured,
        report: std::fs::File,
        t0: Instant,
        image: Option<&crate::vstate::fork_image::Image>,
    ) -> Forked {
        let memory = match image {
            None => self.fork_child_memory(&[report.as_raw_fd()]),
            Some(image) => {
                // Guest RAM was left out of the fork(2): the image takes its place before
                // anything touches guest memory.
                close_fds_except(&[0, 1, 2, report.as_raw_fd(), image.fd()]);
                match image.map_in_child() {
                    Ok(m) => m,
                    Err(e) => {
                        write_report(&report, 0, 0, Err(&crate::error_chain(&e)), t0);
                        // SAFETY: ends this child without running destructors over state it
                        // shares with the source.
                        unsafe { libc::_exit(1) }
                    }
                }
            }
        };
        let mut index = 0;
        let mut grandchildren = Vec::new();
        for i in 1..dirs.len() {
            // SAFETY: this process has a single thread (a fork child), so no lock is held.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                index = i;
                grandchildren.clear();
                break;
            }
            if pid < 0 {
                let e = std::io::Error::last_os_error();
                write_report(&report, i, 0, Err(&format!("fork: {e}")), t0);
            } else {
                grandchildren.push(pid);
            }
        }
        let child = child_config(config, &dirs[index], stacks);
        #[cfg(test)]
        if let Some(hook) = *tests::CHILD_MEMORY
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            hook(&memory, captured, &dirs[index]);
        }
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        match crate::builder::restore_captured(&child, Some(memory), captured) {
            Ok(mut vmm) => {
                if image.is_none() {
                    // The child's private pages differ from the same files as the source's.
                    vmm.memory_image = self.memory_image.clone();
                    // Its memory is a copy of the source's, anonymous if the source's was.
                    vmm.promoted = self.promoted;
                }
                // Over a precopy image, memory is a private mapping of the image, whose pages
                // differ from any snapshot's files: no diff snapshot, and a later fork reads
                // every page (or promotes it).
                write_report(&report, index, me, Ok(()), t0);
                drop(report);
                reap_in_background(grandchildren);
                // Dropping the parent's VM would signal and join threads that exist only in
                // the parent, and close descriptors that are closed already.
                std::mem::forget(std::mem::replace(self, vmm));
                Forked::Child {
                    config: Box::new(child),
                    index,
                }
            }
            Err(e) => {
                write_report(&report, index, me, Err(&crate::error_chain(&e)), t0);
                // SAFETY: ends this child without running destructors over state it shares
                // with the source.
                unsafe { libc::_exit(1) }
            }
        }
    }

    /// For a `fork(2)` child: gives up the parent's VM without touching it (no vCPU or worker
    /// threads exist in the child, so nothing is stopped or joined) and closes every
    /// descriptor it inherited except stdio, guest memory's files and `keep`: they belong to
    /// the parent's VM (KVM fds, device backends, sockets), and an inherited passt or vsock
    /// socket would keep the parent's peers from seeing it close. Returns guest memory, the
    /// child's own copy-on-write view of the parent's `MAP_PRIVATE` mapping. Call it only in
    /// a fork child.
    pub fn into_fork_child(self, keep: &[RawFd]) -> GuestMemoryMmap {
        let memory = self.fork_child_memory(keep);
        // Dropping would signal and join threads that exist only in the parent.
        std::mem::forget(self);
        memory
    }

    fn fork_child_memory(&self, keep: &[RawFd]) -> GuestMemoryMmap {
        let memory = self.vm.memory.clone();
        let mut keep: Vec<RawFd> = keep.to_vec();
        keep.extend([0, 1, 2]);
        keep.extend(
            memory
                .iter()
                .filter_map(|r| r.file_offset().map(|f| f.file().as_raw_fd())),
        );
        close_fds_except(&keep);
        memory
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: fds is a valid out array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two descriptors; nothing else owns them.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// One line per child, written with a single `write` (atomic under PIPE_BUF, so children
/// may report concurrently): `index pid ready_us ok` or `index pid - error message`.
fn write_report(to: &std::fs::File, index: usize, pid: i32, r: Result<(), &str>, t0: Instant) {
    use std::io::Write;
    let mut line = match r {
        Ok(()) => format!("{index} {pid} {} ok\n", micros(t0.elapsed())),
        Err(e) => format!("{index} {pid} - {}\n", e.replace('\n', " ")),
    };
    line.truncate(500);
    if !line.ends_with('\n') {
        line.push('\n');
    }
    let mut f = to;
    let _ = f.write_all(line.as_bytes());
}

fn collect_reports(rd: std::fs::File, dirs: &[PathBuf], limit: Duration) -> Vec<ChildReport> {
    use std::io::BufRead;
    let mut out: Vec<ChildReport> = dirs
        .iter()
        .map(|d| ChildReport {
            dir: d.clone(),
            pid: 0,
            ready_us: None,
            error: Some("the child never reported (it died before restoring)".into()),
        })
        .collect();
    let deadline = Instant::now() + limit;
    // Every child holds the write end until it has reported, so EOF means all have.
    let mut lines = std::io::BufReader::new(rd).lines();
    let mut seen = 0;
    while seen < dirs.len() && Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        let mut f = line.splitn(4, ' ');
        let (Some(i), Some(pid), Some(us), rest) = (f.next(), f.next(), f.next(), f.next()) else {
            continue;
        };
        let (Ok(i), Ok(pid)) = (i.parse::<usize>(), pid.parse::<i32>()) else {
            continue;
        };
        let Some(slot) = out.get_mut(i) else { continue };
        slot.pid = pid;
        if rest == Some("ok") {
            slot.ready_us = us.parse().ok();
            slot.error = None;
        } else {
            slot.error = Some(rest.unwrap_or("").to_owned());
        }
        seen += 1;
    }
    out
}

/// Waits for `pids` on a thread so they do not linger as zombies (the process may also have
/// children it waits for itself, such as passt, so SIGCHLD cannot simply be ignored).
fn reap_in_background(pids: Vec<i32>) {
    if pids.is_empty() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("fork-reaper".into())
        .spawn(move || {
            for pid in pids {
                let mut status = 0;
                // SAFETY: waits for our own child; status is a valid out pointer.
                unsafe { libc::waitpid(pid, &mut status, 0) };
            }
        });
}

fn close_fds_except(keep: &[RawFd]) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if !keep.contains(&fd) {
            // SAFETY: in a fork child, every descriptor not kept belongs to objects of the
            // parent that were forgotten (never used or closed again); closing one that is
            // already closed (the listing's own) fails harmlessly.
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    /// Called in every fork child with its guest memory and the captured state before its VM
    /// is built over them (nothing has run in the child yet), and the child's run directory.
    #[allow(clippy::type_complexity)]
    pub(crate) static CHILD_MEMORY: std::sync::Mutex<
        Option<fn(&vm_memory::GuestMemoryMmap, &super::Captured, &std::path::Path)>,
    > = std::sync::Mutex::new(None);
}

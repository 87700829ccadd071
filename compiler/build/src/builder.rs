//! `specc build`: every uncached layer of a spec becomes a snapshot in the store.
//!
//! A layer is built by restoring its first parent's snapshot (the base layer boots the root
//! filesystem instead), applying the layer's steps through the agent, and snapshotting the VM:
//! the base layer keeps a full memory file, every other layer only the pages that changed
//! over its parent's (a copy-on-write diff, docs/vmm.md) and the block-level disk diff. The
//! snapshot files are moved into the store as blobs, and the layer record is committed last, so
//! an interrupted build leaves at most unreferenced temporary files and the next build resumes
//! from the last complete layer. Independent branches of the layer DAG build in parallel, up
//! to `jobs` VMs at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use specc_machine::{After, Disk, Machine, MachineConfig};
use specc_plan::ir::{self, Digest, LayerId};
use specc_store::{Algorithm, LayerRecord, Part, Role, Store, owner};
pub use specc_vmm::error_chain;
use specc_vmm::snapshot_dir::{self, MemoryImage, Overlay};

use crate::steps::{self, StepOutput};

/// What the builder reports as it goes (`specc build --json` prints one per line).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The layer is in the store already.
    Cached {
        /// Layer name.
        layer: String,
        /// Cache key.
        key: String,
    },
    /// A VM for the layer is starting.
    Started {
        /// Layer name.
        layer: String,
        /// Cache key.
        key: String,
    },
    /// Output of one of the layer's steps.
    Output {
        /// Layer name.
        layer: String,
        /// From stderr.
        stderr: bool,
        /// The bytes, lossily decoded.
        text: String,
    },
    /// The layer is built and committed.
    Finished {
        /// Layer name.
        layer: String,
        /// Cache key.
        key: String,
        /// Milliseconds per phase: `vm` (boot or restore until the agent answers and, for a
        /// restored networked layer, its gateway), `steps`, `snapshot`, `store`; and within
        /// `vm`, `gateway`: how long a restored networked guest's agent waited for the
        /// default gateway (its new passt) to answer.
        timings_ms: BTreeMap<String, u64>,
        /// Bytes of memory data the snapshot wrote.
        memory_bytes: u64,
    },
    /// The layer failed.
    Failed {
        /// Layer name.
        layer: String,
        /// Cache key.
        key: String,
        /// What went wrong.
        error: String,
    },
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A step failed.
    #[error("layer `{layer}`, step {} ({what}) failed", step + 1)]
    Step {
        /// Layer name.
        layer: String,
        /// Step index.
        step: usize,
        /// The step, briefly.
        what: String,
        /// Its span in the spec.
        source_ref: ir::SourceRef,
        /// The cause.
        #[source]
        source: Box<steps::StepError>,
    },
    /// The guest could not be brought up: its network after boot, or its identity and gateway
    /// after a restore.
    #[error(
        "layer `{layer}`: bringing up the guest (DHCP from passt, or a new identity and the \
         gateway after a restore) failed"
    )]
    Network {
        /// Layer name.
        layer: String,
        /// The cause.
        #[source]
        source: Box<steps::StepError>,
    },
    /// The store is on tmpfs with less free space than the restored guest may take from it.
    #[error(
        "layer `{layer}`: the store {} is on tmpfs with {} MiB free, and restoring the parent \
         may take up to {} MiB of it (a page for every page the guest touches in the holes of \
         its memory files not mapped anonymous); free space or put SPECC_HOME on a disk file \
         system (ENOSPC)",
        root.display(), free >> 20, holes >> 20
    )]
    TmpfsRoom {
        /// Layer name.
        layer: String,
        /// The store's root.
        root: PathBuf,
        /// Bytes of holes in the memory files that stay file-backed when mapped.
        holes: u64,
        /// Free bytes on the store's file system.
        free: u64,
    },
    /// Running the VM failed.
    #[error("layer `{layer}`: the VM failed")]
    Machine {
        /// Layer name.
        layer: String,
        /// The cause.
        #[source]
        source: Box<specc_machine::MachineError>,
    },
    /// The store refused or failed.
    #[error("layer `{layer}`: storing the snapshot failed")]
    Store {
        /// Layer name.
        layer: String,
        /// The cause.
        #[source]
        source: Box<specc_store::StoreError>,
    },
    /// The snapshot just written cannot be read back.
    #[error("layer `{layer}`: reading the snapshot back failed")]
    Snapshot {
        /// Layer name.
        layer: String,
        /// The cause.
        #[source]
        source: Box<snapshot_dir::Error>,
    },
    /// A parent's stored record lacks a part the restore needs.
    #[error("layer {key} in the store has no {role} part; remove it with `specc gc`")]
    Incomplete {
        /// The layer.
        key: String,
        /// The missing part.
        role: &'static str,
    },
    /// Scratch space for the VM could not be made.
    #[error("creating the build's scratch directory")]
    Scratch(#[source] std::io::Error),
}

/// How to build: the guest and where things go.
#[derive(Debug, Clone)]
pub struct Builder {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The base layer's root filesystem image.
    pub rootfs: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs of the build VMs.
    pub vcpus: u8,
    /// Guest memory of the build VMs.
    pub mem_bytes: u64,
    /// Give build VMs a network (passt): the spec's `vm network=`. It must be the same for
    /// every layer of a chain (the device set is part of each snapshot).
    pub net: bool,
    /// VMs at a time.
    pub jobs: usize,
    /// How long a VM may take to answer (boot or restore).
    pub agent_timeout: Duration,
}

/// What a build did.
#[derive(Debug, Clone, Default)]
pub struct BuildReport {
    /// Layers found in the store.
    pub cached: Vec<String>,
    /// Layers built now.
    pub built: Vec<String>,
}

struct Output<'a> {
    layer: &'a str,
    events: &'a (dyn Fn(Event) + Sync),
}

impl StepOutput for Output<'_> {
    fn output(&mut self, stderr: bool, bytes: &[u8]) {
        (self.events)(Event::Output {
            layer: self.layer.to_owned(),
            stderr,
            text: String::from_utf8_lossy(bytes).into_owned(),
        });
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Builder {
    /// Builds every layer of `spec` that the store lacks; `events` hears about each.
    pub fn build(
        &self,
        spec: &ir::Spec,
        store: &Store,
        events: &(dyn Fn(Event) + Sync),
    ) -> Result<BuildReport, BuildError> {
        let n = spec.layers.len();
        let mut report = BuildReport::default();
        let mut done = vec![false; n];
        for (i, l) in spec.layers.iter().enumerate() {
            if store.layer(&l.key).ok().flatten().is_some() {
                done[i] = true;
                let _ = store.touch_layer(&l.key);
                report.cached.push(l.name.clone());
                events(Event::Cached {
                    layer: l.name.clone(),
                    key: l.key.to_hex(),
                });
            }
        }
        remove_dead_scratch(store);
        let mut running = vec![false; n];
        let jobs = self.jobs.max(1);
        let mut first_error = None;
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel::<(usize, Result<(), BuildError>)>();
            let mut active = 0;
            loop {
                if first_error.is_none() {
                    for i in 0..n {
                        if active >= jobs {
                            break;
                        }
                        let ready = !done[i]
                            && !running[i]
                            && spec.layers[i].parents.iter().all(|p| done[p.0]);
                        if ready {
                            running[i] = true;
                            active += 1;
                            let tx = tx.clone();
                            scope.spawn(move || {
                                let r = self.build_layer(spec, LayerId(i), store, events);
                                let _ = tx.send((i, r));
                            });
                        }
                    }
                }
                if active == 0 {
                    break;
                }
                let Ok((i, r)) = rx.recv() else { break };
                active -= 1;
                running[i] = false;
                let layer = &spec.layers[i];
                match r {
                    Ok(()) => {
                        done[i] = true;
                        report.built.push(layer.name.clone());
                    }
                    Err(e) => {
                        events(Event::Failed {
                            layer: layer.name.clone(),
                            key: layer.key.to_hex(),
                            error: error_chain(&e),
                        });
                        first_error.get_or_insert(e);
                    }
                }
            }
        });
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    fn config(&self, layers: Vec<PathBuf>, top: PathBuf) -> MachineConfig {
        MachineConfig {
            kernel: self.kernel.clone(),
            cmdline: self.cmdline.clone(),
            vcpus: self.vcpus,
            mem_bytes: self.mem_bytes,
            disk: Disk { layers, top },
            net: self.net,
        }
    }

    fn build_layer(
        &self,
        spec: &ir::Spec,
        id: LayerId,
        store: &Store,
        events: &(dyn Fn(Event) + Sync),
    ) -> Result<(), BuildError> {
        let layer = &spec.layers[id.0];
        let name = layer.name.as_str();
        let machine_err = |source| BuildError::Machine {
            layer: name.to_owned(),
            source: Box::new(source),
        };
        let store_err = |source| BuildError::Store {
            layer: name.to_owned(),
            source: Box::new(source),
        };
        events(Event::Started {
            layer: name.to_owned(),
            key: layer.key.to_hex(),
        });
        // Scratch space on the store's file system, so snapshot files move into it by rename;
        // not in the store's own `tmp/`, which a store opened by another process (one that
        // cannot see our lock, such as the host of a rig) may clean.
        let scratch_err = |e: std::io::Error| {
            if is_enospc(&e) {
                store_full(store, name)
            } else {
                BuildError::Scratch(e)
            }
        };
        let building = store.root().join(SCRATCH_DIR);
        std::fs::create_dir_all(&building).map_err(scratch_err)?;
        let scratch = tempfile::Builder::new()
            .prefix(&format!(
                "build-{}-{}-",
                &layer.key.to_hex()[..12],
                owner::current()
            ))
            .tempdir_in(&building)
            .map_err(scratch_err)?;
        // Sockets and logs live apart, in the system's temporary directory: the store may be on
        // a file system without unix sockets (9p inside the rig).
        let run = tempfile::Builder::new()
            .prefix("specc-build-vm-")
            .tempdir()
            .map_err(BuildError::Scratch)?;
        let vm_dir = run.path().to_owned();
        let top = scratch.path().join("disk.diff");
        let t0 = Instant::now();
        let (mut machine, base_disk) = match layer.parents.first() {
            None => {
                // Named by its sparse digest: only the image's data is read, not its holes.
                let disk = store
                    .put_file_as(&self.rootfs, Algorithm::for_role(Role::Disk))
                    .map_err(store_err)?;
                let path = store.blob_path(&disk.digest);
                let m =
                    Machine::start(&self.config(vec![path], top), &vm_dir).map_err(machine_err)?;
                (m, Some(disk))
            }
            Some(parent) => {
                let (vmstate, memory, disks) = restore_sources(store, &spec.layers[parent.0].key)?;
                check_tmpfs_room(store, &memory, self.mem_bytes, name)?;
                let m =
                    Machine::restore_image(&vmstate, &memory, &self.config(disks, top), &vm_dir)
                        .map_err(machine_err)?;
                (m, None)
            }
        };
        let mut agent = machine
            .connect_agent(self.agent_timeout)
            .map_err(machine_err)?;
        let mut out = Output {
            layer: name,
            events,
        };
        // The network is configured once, in the base: every later layer restores a guest that
        // has it, and only waits for its new passt.
        let net_err = |source| BuildError::Network {
            layer: name.to_owned(),
            source: Box::new(source),
        };
        let gateway_wait = if base_disk.is_none() {
            steps::announce_restored(&mut agent, &spec.name, self.net, &mut out).map_err(net_err)?
        } else {
            None
        };
        let t_vm = t0.elapsed();

        let t1 = Instant::now();
        if base_disk.is_some() && self.net {
            steps::configure_network(&mut agent, &mut out).map_err(net_err)?;
        }
        steps::apply_steps(&mut agent, &layer.steps, &mut out).map_err(|(i, source)| {
            BuildError::Step {
                layer: name.to_owned(),
                step: i,
                what: steps::describe(&layer.steps[i].kind),
                source_ref: layer.steps[i].source,
                source: Box::new(source),
            }
        })?;
        // Durable guest file system state before the disk is frozen.
        let _ = agent.exec_output(&specc_protocol::ExecRequest::new(["sync"]));
        let t_steps = t1.elapsed();

        let t2 = Instant::now();
        let snap = scratch.path().join("snap");
        let shot = machine
            .snapshot(&snap, base_disk.is_none(), After::Exit)
            .map_err(|e| {
                // The VMM writes the snapshot next to the store; its error comes as text.
                let text = error_chain(&e);
                if text.contains("os error 28") || text.contains("No space left on device") {
                    store_full(store, name)
                } else {
                    machine_err(e)
                }
            })?;
        drop(agent);
        let _ = machine.wait_timeout(Duration::from_secs(30));
        let t_snap = t2.elapsed();

        let t3 = Instant::now();
        let saved = snapshot_dir::read(&snap).map_err(|source| BuildError::Snapshot {
            layer: name.to_owned(),
            source: Box::new(source),
        })?;
        let adopt = |role: Role, file: &str| -> Result<Part, BuildError> {
            // Sparse parts by their sparse digest, so storing costs the data, not the
            // logical size (docs/artifact-format.md).
            let info = store
                .adopt_file_as(&snap.join(file), Algorithm::for_role(role))
                .map_err(store_err)?;
            Ok(Part {
                role,
                digest: info.digest,
                size: info.size,
            })
        };
        let mut parts = vec![adopt(Role::DiskDiff, "disk0.diff")?];
        let mut info = serde_json::Map::new();
        if let Some(disk) = &base_disk {
            parts.push(Part {
                role: Role::Disk,
                digest: disk.digest,
                size: disk.size,
            });
            parts.push(adopt(Role::Memory, snapshot_dir::MEMORY_FILE)?);
        } else {
            parts.push(adopt(Role::MemoryDiff, snapshot_dir::MEMORY_DIFF_FILE)?);
            let ranges = saved
                .memory
                .overlays
                .last()
                .map(|o| o.ranges.clone())
                .unwrap_or_default();
            info.insert(
                "memory_ranges".into(),
                serde_json::to_value(ranges).unwrap_or_default(),
            );
        }
        parts.push(adopt(Role::Vmstate, snapshot_dir::VMSTATE_FILE)?);
        info.insert("layer".into(), name.into());
        info.insert("memory_data_bytes".into(), shot.memory_data_bytes.into());
        let mut record = LayerRecord::new(
            layer.key,
            layer.parents.iter().map(|p| spec.layers[p.0].key).collect(),
            parts,
        );
        record.info = serde_json::Value::Object(info);
        let timings: BTreeMap<String, u64> = [
            ("vm", Some(t_vm)),
            ("gateway", gateway_wait),
            ("steps", Some(t_steps)),
            ("snapshot", Some(t_snap)),
            ("store", Some(t3.elapsed())),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), ms(v?))))
        .collect();
        record.timings_ms = timings.clone();
        store.commit_layer(&record).map_err(store_err)?;
        events(Event::Finished {
            layer: name.to_owned(),
            key: layer.key.to_hex(),
            timings_ms: timings,
            memory_bytes: shot.memory_data_bytes,
        });
        Ok(())
    }
}

/// Where under the store root layer builds keep their VM's files until the store adopts them.
pub const SCRATCH_DIR: &str = "building";

/// The owner in a scratch directory's name, `build-<key 12 hex>-<owner>-<random>`: the process
/// that made it (`specc_store::owner`; for a build re-run inside the rig, the host process that
/// started the rig, which outlives it and whose end only the host can see).
fn scratch_owner_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("build-")?;
    let (_key, rest) = rest.split_once('-')?;
    let (owner, _random) = rest.split_once('-')?;
    owner::parse(owner).map(|_| owner)
}

/// Removes the scratch directories of killed builds: those whose owner ran on this boot and
/// is gone, and, where this kernel cannot tell (a rig's, another machine's on a shared store),
/// those older than a day. Returns how many it removed. A live build's are kept.
pub fn remove_dead_scratch(store: &Store) -> usize {
    let Ok(dir) = std::fs::read_dir(store.root().join(SCRATCH_DIR)) else {
        return 0;
    };
    let mut removed = 0;
    for e in dir.flatten() {
        let name = e.file_name();
        let mtime = e.metadata().and_then(|m| m.modified()).ok();
        if owner::is_leftover(
            scratch_owner_of(&name.to_string_lossy()),
            mtime,
            owner::FOREIGN_GRACE,
        ) && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
}

fn store_full(store: &Store, layer: &str) -> BuildError {
    BuildError::Store {
        layer: layer.to_owned(),
        source: Box::new(specc_store::StoreError::Full {
            root: store.root().to_owned(),
        }),
    }
}

/// `TMPFS_MAGIC` from <linux/magic.h>.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// The file system type and free bytes (for an unprivileged writer) of `path`'s file system.
fn fs_free(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statfs is plain data; all zeroes is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a statfs we own.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // f_type and f_bsize are signed words; the values are never negative.
    let kind = u64::try_from(st.f_type).unwrap_or(0);
    let free = st
        .f_bavail
        .saturating_mul(u64::try_from(st.f_bsize).unwrap_or(0));
    Ok((kind, free))
}

/// Refuses a restore from a store on tmpfs that could not hold the pages the guest may fault
/// in. A private mapping of a tmpfs file allocates a tmpfs page for every hole the guest
/// touches (read or write) before the copy-on-write, so on a nearly full tmpfs the guest's
/// access fails in the middle of a step, which the VM cannot recover from (the build hung
/// until the agent timeout and beyond). The VMM maps anonymous memory over the holes of
/// memory files, except those beyond its bound on mappings (the shortest): only those count
/// here (`snapshot_dir::file_hole_bytes`). Other file systems map holes to the zero page and
/// are not checked.
fn check_tmpfs_room(
    store: &Store,
    image: &MemoryImage,
    mem_bytes: u64,
    layer: &str,
) -> Result<(), BuildError> {
    let Ok((kind, free)) = fs_free(store.root()) else {
        return Ok(());
    };
    if kind != TMPFS_MAGIC {
        return Ok(());
    }
    // A file that cannot be read fails the restore itself, with its own error.
    let holes = snapshot_dir::file_hole_bytes(image, mem_bytes).unwrap_or(0);
    if holes > free {
        return Err(BuildError::TmpfsRoom {
            layer: layer.to_owned(),
            root: store.root().to_owned(),
            holes,
            free,
        });
    }
    Ok(())
}

/// What restoring the stored layer `key` needs: its state file, its memory image (the base
/// layer's full memory file with every descendant's diff laid over it, oldest first) and its
/// disk stack, all as store blob paths. Follows first parents down to the base layer.
pub fn restore_sources(
    store: &Store,
    key: &Digest,
) -> Result<(PathBuf, MemoryImage, Vec<PathBuf>), BuildError> {
    let mut lineage = Vec::new();
    let mut cur = Some(*key);
    while let Some(k) = cur {
        let rec = store
            .layer(&k)
            .map_err(|source| BuildError::Store {
                layer: k.to_hex(),
                source: Box::new(source),
            })?
            .ok_or(BuildError::Incomplete {
                key: k.to_hex(),
                role: "layer.json",
            })?;
        cur = rec.parents.first().copied();
        lineage.push(rec);
    }
    lineage.reverse();
    let blob = |rec: &LayerRecord, role: Role, name: &'static str| -> Result<PathBuf, BuildError> {
        rec.part(role)
            .map(|p| store.blob_path(&p.digest))
            .ok_or(BuildError::Incomplete {
                key: rec.key.to_hex(),
                role: name,
            })
    };
    let root = &lineage[0];
    let mut disks = vec![blob(root, Role::Disk, "disk")?];
    let mut image = MemoryImage {
        base: Some(blob(root, Role::Memory, "memory")?),
        overlays: Vec::new(),
    };
    for rec in &lineage {
        disks.push(blob(rec, Role::DiskDiff, "disk-diff")?);
    }
    for rec in &lineage[1..] {
        let ranges = serde_json::from_value(rec.info["memory_ranges"].clone()).map_err(|_| {
            BuildError::Incomplete {
                key: rec.key.to_hex(),
                role: "memory_ranges",
            }
        })?;
        image.overlays.push(Overlay {
            file: blob(rec, Role::MemoryDiff, "memory-diff")?,
            ranges,
        });
    }
    let vmstate = blob(&lineage[lineage.len() - 1], Role::Vmstate, "vmstate")?;
    Ok((vmstate, image, disks))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On /dev/shm (tmpfs on Linux): a memory file whose one hole is larger than all the free
    /// space passes (the VMM maps that hole anonymous); one with more long holes than the VMM
    /// maps, whose remaining holes exceed the free space, is refused.
    #[test]
    fn a_store_on_tmpfs_is_refused_only_for_holes_left_to_the_file() {
        use std::os::unix::fs::FileExt;
        let (kind, free) = fs_free(Path::new("/dev/shm")).unwrap();
        assert_eq!(kind, TMPFS_MAGIC, "/dev/shm is not tmpfs here");
        let root = tempfile::tempdir_in("/dev/shm").unwrap();
        let store = Store::open(root.path()).unwrap();
        let mem = root.path().join("memory");
        let f = std::fs::File::create(&mem).unwrap();
        let image = MemoryImage {
            base: Some(mem.clone()),
            overlays: Vec::new(),
        };
        let len = (free + (1 << 30)).next_multiple_of(4096);
        f.set_len(len).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        check_tmpfs_room(&store, &image, len, "l").unwrap();

        // 4096 holes, each a 1024th of the free space and more, one data page apart: of the
        // ~4000 in the region above the PCI hole, the VMM maps 1024.
        let max = snapshot_dir::MAX_HOLES as u64;
        let hole = (free / max + (1 << 20)).next_multiple_of(4096);
        let n = 4 * max;
        let len = n * (hole + 4096);
        f.set_len(len).unwrap();
        for i in 0..n {
            f.write_all_at(&[1u8; 4096], i * (hole + 4096)).unwrap();
        }
        let err = check_tmpfs_room(&store, &image, len, "l").unwrap_err();
        assert!(matches!(err, BuildError::TmpfsRoom { .. }), "{err}");
        assert!(err.to_string().contains("ENOSPC"), "{err}");
    }

    #[test]
    fn only_the_scratch_of_a_dead_owner_on_this_boot_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let building = store.root().join(SCRATCH_DIR);
        std::fs::create_dir_all(&building).unwrap();
        // A process that has ended: its pid is free (until reused, which only keeps the
        // directory longer).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let me = owner::current();
        let (boot, _) = owner::parse(&me).expect("own owner");
        let dead = building.join(format!("build-0123456789ab-{boot}.{dead_pid}-x1"));
        let live = building.join(format!("build-0123456789ab-{me}-x2"));
        let other_boot = building.join(format!("build-0123456789ab-000000000000.{dead_pid}-x3"));
        let unnamed = building.join("something-else");
        for d in [&dead, &live, &other_boot, &unnamed] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("memory"), b"data").unwrap();
        }
        assert_eq!(remove_dead_scratch(&store), 1);
        assert!(!dead.exists());
        assert!(live.exists() && other_boot.exists() && unnamed.exists());
        assert_eq!(
            scratch_owner_of(&live.file_name().unwrap().to_string_lossy()),
            Some(me.as_str())
        );
    }
}

//! The rig: an emulated KVM host (QEMU TCG, -cpu max) for machines without hardware virtualization.
//!
//! QEMU's TCG with `-cpu max` emulates a CPU with `svm`/`npt` (and `vmx`); the rig kernel
//! (built by `specc-guestkit` with KVM) turns that into a hardware-style `/dev/kvm`. The rig
//! sees the host's `/` read-only and the project tree, `$SPECC_HOME` and the cargo target dir
//! writable, so it runs the host's own binaries: `specc`, `specd` and test binaries run their VMM
//! there when [`detect()`] finds no hardware KVM. See `docs/rig.md`.
#![deny(missing_docs)]

pub mod bridge;
pub mod detect;
pub mod initramfs;
pub mod run;
pub mod testing;
pub mod tsc;

pub use bridge::{HostBridge, HostListener};
pub use detect::{Decision, Detection, KvmMode, Placement, decide, detect, in_rig};
pub use run::{
    BootImage, Rig, RigCommand, RigConfig, RigError, RigOutcome, Timings, run_self_in_rig,
};

//! End-to-end tests that boot real guests, and the specc-bench benchmark binary.

pub mod bench;
pub mod registry;
pub mod specd;

/// The guest of the Linux end-to-end tests: the guest kernel's vmlinux and the busybox image.
#[derive(Debug)]
pub struct BusyboxGuest {
    pub kernel: std::path::PathBuf,
    pub image: std::path::PathBuf,
}

impl BusyboxGuest {
    /// One vCPU and 256 MiB, the image as the only disk layer and its diff at `top`.
    pub fn config(&self, top: std::path::PathBuf, net: bool) -> specc_machine::MachineConfig {
        specc_machine::MachineConfig {
            kernel: self.kernel.clone(),
            cmdline: specc_machine::DEFAULT_CMDLINE.into(),
            vcpus: 1,
            mem_bytes: 256 << 20,
            disk: specc_machine::Disk {
                layers: vec![self.image.clone()],
                top,
            },
            net,
        }
    }
}

/// For the Linux end-to-end tests: builds (or finds cached) the guest kernel, the 256 MiB
/// busybox image with the agent, and specc-vmm, on the host at native speed (inside the rig
/// the same caches are visible). Panics with the cause.
pub fn prepare_busybox_guest() -> BusyboxGuest {
    use specc_guestkit::kernel::{KernelKind, ensure_kernel};
    use specc_guestkit::rootfs::{self, Base, RootfsOptions};
    let kernel = ensure_kernel(KernelKind::Guest, &|l| eprintln!("kernel: {l}"))
        .expect("building the guest kernel");
    let agent = rootfs::agent_binary().expect("building the static agent");
    let image = rootfs::ensure_rootfs(
        &Base::Busybox,
        &RootfsOptions {
            disk_bytes: 256 << 20,
            agent_path: agent,
        },
    )
    .expect("building the busybox rootfs");
    // specc-vmm beside the test binary's profile directory, where specc-machine looks.
    cargo_build("specc-vmm");
    BusyboxGuest {
        kernel: kernel.vmlinux,
        image: image.path,
    }
}

/// `cargo build -q -p PACKAGE` in the running test's profile, so its binaries land in
/// `target/<profile>/` beside the tests'. Panics if the build fails.
///
/// Without the variables cargo sets for the running test (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_NAME`, ...): build scripts that watch them (`ring`'s does) would otherwise see
/// them changed, rerun, and rebuild everything above them (rustls, ureq, the store...) here and
/// again in the next `cargo test`.
pub fn cargo_build(package: &str) {
    let mut cmd = std::process::Command::new(env!("CARGO"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let per_crate = [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_MANIFEST_LINKS",
            "CARGO_CRATE_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ];
        if per_crate.contains(&&*key)
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
        {
            cmd.env_remove(&*key);
        }
    }
    let status = cmd
        .args(["build", "-q", "-p", package])
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
}

/// `target/<profile>/NAME`, beside the running test binary's `deps/` directory. Panics if it
/// is missing.
pub fn test_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the test binary is in target/<profile>/deps");
    let p = dir.join(name);
    assert!(p.is_file(), "{name} binary missing at {}", p.display());
    p
}

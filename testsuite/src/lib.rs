//! End-to-end tests that boot real guests, and the specc-bench benchmark binary.

pub mod bench;
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
pub fn cargo_build(package: &str) {
    let status = std::process::Command::new(env!("CARGO"))
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

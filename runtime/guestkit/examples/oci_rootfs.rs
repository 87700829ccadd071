//! Builds the rootfs image of an OCI base and prints where it is and how long it took:
//! `cargo run -p specc-guestkit --example oci_rootfs -- REF [DISK_MIB]`, REF as in
//! `base oci="REF"` (e.g. `oci-layout:/path/to/layout:tag`), into `$SPECC_HOME`. Needs root.

use std::time::Instant;

use specc_guestkit::rootfs::{self, Base, RootfsOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let reference = args.next().ok_or(
        "usage: oci_rootfs REF [DISK_MIB]  (REF: oci-layout:DIR[:TAG], a path, or host/repo:tag)",
    )?;
    let disk_mib: u64 = args.next().map_or(Ok(1024), |s| s.parse())?;
    let opts = RootfsOptions {
        disk_bytes: disk_mib << 20,
        agent_path: rootfs::agent_binary()?,
    };
    let started = Instant::now();
    let base = Base::Oci { reference };
    let home = specc_guestkit::specc_home();
    let progress = |m: &str| eprintln!("{:6.2} s  {m}", started.elapsed().as_secs_f64());
    let image = rootfs::ensure_rootfs_in(&home, &base, &opts, &progress).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        msg
    })?;
    println!(
        "{} ({}, {}) in {:.2} s",
        image.path.display(),
        image.digest,
        if image.built { "built" } else { "cached" },
        started.elapsed().as_secs_f64()
    );
    if let Some(cfg) = image.oci_config()? {
        println!("config: {cfg:?}");
    }
    Ok(())
}

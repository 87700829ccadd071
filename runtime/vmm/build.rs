//! Assembles the test guests in test-guests/ into tiny ELF files (gcc + ld from binutils).
//! Their directory reaches the tests as SPECC_TEST_GUESTS; when the tools are missing the
//! build still succeeds and the tests that need a guest fail saying why.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr))),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

fn build(src: &Path, dir: &Path, out: &Path) -> Result<(), String> {
    let stem = src
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or("bad guest file name")?;
    let obj = out.join(format!("{stem}.o"));
    let elf = out.join(format!("{stem}.elf"));
    run(Command::new("gcc")
        .args(["-c", "-nostdlib", "-ffreestanding", "-I"])
        .arg(dir)
        .arg(src)
        .arg("-o")
        .arg(&obj))?;
    run(Command::new("ld")
        .args([
            "-static",
            "-nostdlib",
            "--build-id=none",
            "-z",
            "max-page-size=4096",
            "-T",
        ])
        .arg(dir.join("guest.ld"))
        .arg(&obj)
        .arg("-o")
        .arg(&elf))
}

fn main() {
    let dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("test-guests");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("test-guests");
    println!("cargo:rerun-if-changed=test-guests");
    let _ = std::fs::create_dir_all(&out);
    let mut errors = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "S")
                && let Err(err) = build(&p, &dir, &out)
            {
                errors.push(err);
            }
        }
    }
    if !errors.is_empty() {
        let _ = std::fs::write(out.join("BUILD_ERRORS"), errors.join("\n"));
        println!(
            "cargo:warning=test guests not built (are gcc and ld installed?): {}",
            errors.join("; ")
        );
    } else {
        let _ = std::fs::remove_file(out.join("BUILD_ERRORS"));
    }
    println!("cargo:rustc-env=SPECC_TEST_GUESTS={}", out.display());
}

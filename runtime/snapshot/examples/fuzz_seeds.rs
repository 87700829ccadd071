//! Writes the seed corpus of the `state` fuzz target: valid state files and bare payloads of
//! the sample vmstate. `cargo run -p specc-snapshot --example fuzz_seeds -- DIR`
use std::path::PathBuf;

use specc_snapshot::fuzzing::sample_state;
use specc_snapshot::state::{HEADER_LEN, TRAILER_LEN, encode};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: fuzz_seeds DIR")?);
    std::fs::create_dir_all(&dir)?;
    let mut small = sample_state(1);
    small.vcpus[0].xsave.truncate(64);
    small.vcpus[0].lapic.truncate(16);
    small.vcpus[0].cpuid.truncate(4);
    small.vcpus[0].msrs.truncate(4);
    small.irqchip.truncate(8);
    let mut none = small.clone();
    none.vcpus.clear();
    none.devices.clear();
    none.clock = None;
    none.memory.diff = None;
    for (name, state) in [("small", &small), ("empty", &none)] {
        let file = encode(state)?;
        std::fs::write(dir.join(format!("{name}.file")), &file)?;
        std::fs::write(
            dir.join(format!("{name}.payload")),
            &file[HEADER_LEN..file.len() - TRAILER_LEN],
        )?;
    }
    Ok(())
}

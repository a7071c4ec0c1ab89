//! Writes the seed corpus (`corpus/<target>/<name>`) from the real encoders:
//! `cargo +nightly run --manifest-path tests/fuzz/Cargo.toml --example write_seeds`.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let fuzz_directory = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(fuzz_directory.join("../../cluster.toml"))?;
    for seed in flashstock_fuzz::seeds(&shipped) {
        let directory = fuzz_directory.join("corpus").join(seed.target);
        std::fs::create_dir_all(&directory)?;
        std::fs::write(directory.join(&seed.name), &seed.bytes)?;
    }
    Ok(())
}

//! The fuzz targets: each takes arbitrary bytes and must return (a value or a typed error)
//! without panicking, hanging or allocating without bound.
//!
//! One definition for two users: the AFL binaries of the `eplb-fuzz` crate (`fuzz/src/bin/`) and
//! the regression test `tests/fuzz_corpus.rs`, which replays every file of `fuzz/corpus/<target>/`
//! and `fuzz/regressions/<target>/` through [`run`] under `cargo test`. Both include this file by
//! path, so a target cannot differ between fuzzing and its regression test.

use std::path::Path;

use eplb::engine::shm::region::{Layout, HEADER_BYTES};
use eplb::load::{parse_trace_bytes, LoadTrace, TraceSelect};
use eplb::plan::file::parse_placement_bytes;

/// The target names: `fuzz/src/bin/<name>.rs`, `fuzz/corpus/<name>/`, `fuzz/regressions/<name>/`.
pub const TARGETS: [&str; 5] = ["region", "load_csv", "load_json", "load_npy", "placement"];

/// Runs target `name` on `data`; `Err` only for an unknown target name. A panic is the finding.
pub fn run(name: &str, data: &[u8]) -> Result<(), String> {
    match name {
        "region" => region(data),
        "load_csv" => load(data, "fuzz.csv"),
        "load_json" => load(data, "fuzz.json"),
        "load_npy" => load(data, "fuzz.npy"),
        "placement" => placement(data),
        other => return Err(format!("unknown fuzz target {other:?}; targets: {}", TARGETS.join(", "))),
    }
    Ok(())
}

/// The shared-memory region header and its tensor table, as the sidecar reads them from the
/// engine's mapping: `data` is the start of the region (zero-padded to the header's size, as a
/// region shorter than its header is refused before any field is read), and the region's length
/// is the header's own `total_bytes` (so that the checks behind the length check are reached) or,
/// when the input is too short to hold it, the input's length.
pub fn region(data: &[u8]) {
    let file_len = match data.get(56..64) {
        Some(b) => usize::try_from(u64::from_le_bytes(b.try_into().expect("8 bytes"))).unwrap_or(usize::MAX),
        None => data.len(),
    };
    let mut header = data.to_vec();
    if header.len() < HEADER_BYTES {
        header.resize(HEADER_BYTES, 0);
    }
    if let Ok(layout) = Layout::parse(&header, file_len) {
        // What the sidecar computes from an accepted layout must not panic either.
        let _ = (layout.num_physical(), layout.mask_offset(), layout.layer_bytes());
        // An accepted header is one the writer could have written: writing it back and parsing
        // that gives the same layout.
        let again = Layout::parse(&layout.header_bytes(0), file_len);
        assert_eq!(again.as_ref(), Ok(&layout), "a parsed header does not survive header_bytes and parse");
    }
}

/// A load file of the format of `name`'s extension, then what `plan` and `run --trace` do with the
/// trace: sum the steps and take each step (both check that every layer's total fits in u64).
pub fn load(data: &[u8], name: &str) {
    if let Ok(trace) = parse_trace_bytes(Path::new(name), data, &TraceSelect::default()) {
        use_trace(&trace);
    }
}

fn use_trace(trace: &LoadTrace) {
    let _ = trace.summed();
    for i in 0..trace.num_steps().min(4) {
        let _ = trace.step(i);
    }
}

/// A placement file (`plan --previous`, `run --init-placement`): the first byte is the number of
/// logical experts the caller expects (the load's width; 0 included), the rest is the file.
pub fn placement(data: &[u8]) {
    let Some((&num_logical, file)) = data.split_first() else { return };
    let _ = parse_placement_bytes(Path::new("fuzz.json"), file, num_logical as usize);
}

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

/// The largest region the `region` target builds (1 MiB): a header whose `total_bytes` is larger
/// gets only this much (the header, the table and the IPC section are what the sidecar reads; a
/// region shorter than its sections is refused, as a truncated one is).
const MAX_REGION_BYTES: usize = 1 << 20;

/// The shared-memory region as the sidecar reads it from the engine's mapping: its header, tensor
/// table and IPC section. `data` is the start of the region, the rest zeros; the region's length
/// is the header's own `total_bytes` (so that the checks behind the length check are reached) or,
/// when the input is too short to hold it, the input's length. At most [`MAX_REGION_BYTES`] are
/// built; a longer region is passed as that prefix, and must then be refused if its sections do
/// not fit in it.
pub fn region(data: &[u8]) {
    let file_len = match data.get(56..64) {
        Some(b) => usize::try_from(u64::from_le_bytes(b.try_into().expect("8 bytes"))).unwrap_or(usize::MAX),
        None => data.len(),
    };
    let mut bytes = data.to_vec();
    bytes.resize(file_len.clamp(HEADER_BYTES, MAX_REGION_BYTES), 0);
    let Ok(layout) = Layout::parse(&bytes, file_len) else { return };
    // What the sidecar computes from an accepted layout must not panic either.
    let _ = (layout.num_physical(), layout.count_cols(), layout.mask_offset(), layout.command_end());
    let _ = (layout.expert_tensors(), layout.global_tensors());
    for i in 0..layout.tensors.len() {
        let _ = (layout.entry_name(i), layout.tensors[i].extent());
    }
    // An accepted region is one the writer could have written: writing its header, table and IPC
    // section back over it and parsing that gives the same layout.
    let mut again = bytes;
    again[..HEADER_BYTES].copy_from_slice(&layout.header_bytes(0));
    let table = layout.table_bytes();
    again[layout.table_offset..layout.table_offset + table.len()].copy_from_slice(&table);
    let ipc = layout.ipc_bytes();
    again[layout.ipc_offset..layout.ipc_offset + ipc.len()].copy_from_slice(&ipc);
    assert_eq!(
        Layout::parse(&again, file_len).as_ref(),
        Ok(&layout),
        "a parsed region does not survive header_bytes, table_bytes, ipc_bytes and parse"
    );
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

//! Placement files: the JSON that `plan` writes and `plan --previous` / `run --init-placement` read.
//!
//! The keys are SGLang's: `physical_to_logical_map [layers][num_replicas]`,
//! `logical_to_physical_map [layers][num_logical][max_replicas]` (-1 padded) and
//! `logical_count [layers][num_logical]`, plus our `metrics` object.
//!
//! SGLang's `--init-expert-location FILE.json` passes every key of the file to
//! `ExpertLocationMetadata.init_by_mapping(**data)`, which takes `physical_to_logical_map` alone;
//! [`write_sglang`] writes a file with that key only, which SGLang reads as it is.

use std::path::{Path, PathBuf};

use ndarray::Array2;
use serde_json::{json, Value};
use thiserror::Error;

use crate::output::{self, OutputError};
use crate::policy::{Placement, PolicyError};

#[derive(Debug, Error)]
pub enum PlacementFileError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Write(#[from] OutputError),
    #[error("{path}: not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: no \"physical_to_logical_map\" key; is this a placement file written by `eplb-worker plan`?")]
    NoMap { path: PathBuf },
    #[error("{path}: physical_to_logical_map {what}")]
    BadMap { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: PolicyError },
}

/// Reads a placement file's `physical_to_logical_map` for `num_logical` experts and checks it.
pub(crate) fn read_placement(path: &Path, num_logical: usize) -> Result<Placement, PlacementFileError> {
    let bytes = crate::input::read_regular(path, crate::input::MAX_JSON_BYTES)
        .map_err(|source| PlacementFileError::Read { path: path.into(), source })?;
    parse_placement_bytes(path, &bytes, num_logical)
}

/// [`read_placement`] on the bytes of a file named `path` (errors name it): the fuzz target
/// (`fuzz/`) feeds it arbitrary bytes, which must give a placement or an error, never a panic.
pub fn parse_placement_bytes(path: &Path, bytes: &[u8], num_logical: usize) -> Result<Placement, PlacementFileError> {
    let doc: Value = crate::load::json::from_slice_strict(bytes)
        .map_err(|source| PlacementFileError::Json { path: path.into(), source })?;
    let map = doc.get("physical_to_logical_map").ok_or_else(|| PlacementFileError::NoMap { path: path.into() })?;
    let bad = |what: String| PlacementFileError::BadMap { path: path.into(), what };
    let rows = map.as_array().ok_or_else(|| bad("is not a list of layers".into()))?;
    let width = rows.first().and_then(Value::as_array).map(Vec::len).ok_or_else(|| bad("is empty".into()))?;
    let mut phy2log = Array2::<usize>::zeros((rows.len(), width));
    for (layer, row) in rows.iter().enumerate() {
        let row = row.as_array().ok_or_else(|| bad(format!("layer {layer} is not a list")))?;
        if row.len() != width {
            return Err(bad(format!("layer {layer} has {} slots, layer 0 has {width}", row.len())));
        }
        for (slot, v) in row.iter().enumerate() {
            phy2log[[layer, slot]] =
                v.as_u64().ok_or_else(|| bad(format!("layer {layer} slot {slot} is {v}, not an expert index")))?
                    as usize;
        }
    }
    Placement::from_phy2log(phy2log, num_logical)
        .map_err(|source| PlacementFileError::Invalid { path: path.into(), source })
}

/// The JSON document of a placement with its metrics.
pub(crate) fn placement_json(placement: &Placement, metrics: Value) -> Value {
    json!({
        "physical_to_logical_map": placement.phy2log.outer_iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
        "logical_to_physical_map": placement.log2phy.outer_iter()
            .map(|l| l.outer_iter().map(|e| e.to_vec()).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "logical_count": placement.logcnt.outer_iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
        "metrics": metrics,
    })
}

/// Writes a placement file with its metrics (`flag`: the option that named `path`), through
/// [`crate::output::write_json`]: atomic for a regular file, never replacing a symlink, a device
/// or a FIFO.
pub(crate) fn write_placement(
    flag: &'static str,
    path: &Path,
    placement: &Placement,
    metrics: Value,
) -> Result<(), OutputError> {
    output::write_json(flag, path, &placement_json(placement, metrics))
}

/// Writes the file SGLang's `--init-expert-location` reads as it is: `physical_to_logical_map` only.
pub(crate) fn write_sglang(flag: &'static str, path: &Path, placement: &Placement) -> Result<(), OutputError> {
    let map: Vec<Vec<usize>> = placement.phy2log.outer_iter().map(|r| r.to_vec()).collect();
    output::write_json(flag, path, &json!({ "physical_to_logical_map": map }))
}

/// Writes `value` as JSON to `path` (see [`crate::output::write_json`]).
pub(crate) fn write_json_atomic(path: &Path, value: &Value) -> Result<(), PlacementFileError> {
    Ok(output::write_json("--report", path, value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("eplb-plan-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn round_trip_and_sglang_file() {
        let p = Placement::from_phy2log(ndarray::arr2(&[[0, 1, 2, 0], [2, 1, 0, 1]]), 3).unwrap();
        let path = tmp("p.json");
        write_placement("--output", &path, &p, json!({"x": 1})).unwrap();
        assert_eq!(read_placement(&path, 3).unwrap(), p);
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(doc["logical_count"], json!([[2, 1, 1], [1, 2, 1]]));
        assert_eq!(doc["logical_to_physical_map"][0][0], json!([0, 3]));
        let sg = tmp("sg.json");
        write_sglang("--sglang-output", &sg, &p).unwrap();
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&sg).unwrap()).unwrap();
        assert_eq!(doc.as_object().unwrap().keys().collect::<Vec<_>>(), vec!["physical_to_logical_map"]);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let path = tmp("bad.json");
        for (text, want) in [
            ("{", "not valid JSON"),
            ("{\"a\": 1}", "no \"physical_to_logical_map\""),
            ("{\"physical_to_logical_map\": [[0, 1], [0]]}", "layer 1 has 1 slots"),
            ("{\"physical_to_logical_map\": [[0, -1]]}", "slot 1 is -1"),
            ("{\"physical_to_logical_map\": [[0, 0]]}", "expert 1 has no replica"),
            ("{\"physical_to_logical_map\": [[0, 1]], \"physical_to_logical_map\": [[1, 0]]}", "appears twice"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = read_placement(&path, 2).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("bad.json"), "{text}: {e}");
        }
        let e = read_placement(&tmp("missing.json"), 2).unwrap_err().to_string();
        assert!(e.contains("missing.json") && e.contains("cannot read"), "{e}");
    }
}

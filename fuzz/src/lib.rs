//! The fuzz targets as plain functions (see `targets.rs`), for the AFL binaries in `src/bin/`.
#[path = "targets.rs"]
pub mod targets;

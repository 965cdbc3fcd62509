//! `libeplb_client`: the engine side of the eplb engine contract (docs/engine-contract.md,
//! version 2) for engines in any language, through a C API (docs/c-api.md; the header
//! `include/eplb_client.h` is generated from this crate by cbindgen).
//!
//! * [`layout`]: the region's byte layout, the one definition (also used by the sidecar);
//! * [`core`]: the ring sequence lock and the mailbox protocol over atomics (also used by the
//!   sidecar; model-checked with loom);
//! * [`region`]: the engine side in safe Rust (the Python client's semantics);
//! * [`capi`]: the `extern "C"` functions (panics caught, pointers and lengths checked).

pub mod capi;
/// cbindgen:ignore
pub mod core;
mod cuda;
pub mod layout;
/// cbindgen:ignore
pub mod region;
/// cbindgen:ignore
pub mod sync;

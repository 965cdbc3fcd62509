//! The two lock-free protocols of the contract, written once over views of the mapped memory
//! (`&[AtomicU64]` and friends), used by this library's engine side and by the sidecar's reader
//! (`eplb::engine::shm::region`), and model-checked by `loom` (`tests/loom.rs`):
//!
//! * [`ring`](crate::core::ring): the load ring's sequence lock (engine writes an entry, sidecar reads it);
//! * [`mailbox`](crate::core::mailbox): the command (sidecar posts, engine reads) and its answer (engine answers,
//!   sidecar reads), plus the engine's publication of an applied placement.
//!
//! Memory orders (C11 model; what makes them correct on aarch64 as on x86-64):
//! a writer makes the sequence word odd (relaxed), issues a release fence, stores the data
//! (relaxed atomics: never a torn word, never a data race), then stores the even word with
//! release. A reader loads the word with acquire, loads the data (relaxed), issues an acquire
//! fence, and accepts the copy only if the word is unchanged and even: every store it read is
//! then one of the writer's completed ones, or the word would have moved. An answer's result and
//! step are stored before its id, which is stored with release; the sidecar loads the id with
//! acquire, so it never sees an answer before its data, nor an `applied` before the placement
//! and epoch the engine wrote first.

pub mod mailbox;
pub mod ring;

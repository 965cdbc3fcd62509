//! The atomics of the core: `std`'s, or `loom`'s under `--cfg loom` so that the model checker
//! explores every interleaving and every weak-memory outcome of the same code.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
#[cfg(not(loom))]
pub use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// The ordering of the one store/load that `--cfg loom_weak` deliberately weakens (the loom test
/// that proves the checker finds a missing release): Release normally, Relaxed then.
#[cfg(not(loom_weak))]
pub const PUBLISH: Ordering = Ordering::Release;
#[cfg(loom_weak)]
pub const PUBLISH: Ordering = Ordering::Relaxed;

/// The release fence a sequence-lock writer issues after making its word odd (so that a reader
/// that sees any new data sees the word changed); `--cfg loom_weak` leaves it out.
#[inline]
pub fn odd_fence() {
    #[cfg(not(loom_weak))]
    fence(Ordering::Release);
}

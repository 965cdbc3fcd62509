//! The engine seam: what the balancer needs from the inference job it runs beside ([`Engine`]).
//!
//! * [`synthetic`]: the synthetic engine, which stands in for an inference job: it replays a load
//!   ([`source`]) and holds expert weights whose bytes are a pure function of
//!   (layer, logical expert, byte offset) ([`pattern_word`]), so any receiver can verify them;
//! * a real engine attaches through shared memory (`--engine shm:NAME`, docs/engine-contract.md).

pub mod shm;
pub mod source;
pub mod synthetic;

pub use source::slot_loads;
pub(crate) use source::{logical_from_slots, LoadSource};
pub(crate) use synthetic::SyntheticEngine;

use crate::exit::{ExitKind, Failure};
use ndarray::Array2;
use thiserror::Error;

use crate::executor::ExpertStore;
use crate::policy::Placement;

/// Errors of an engine.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The engine is not what the flags and the MPI job say (shape, version, rank): fix the input.
    #[error("{0}")]
    BadInput(String),
    /// The engine failed at run time (it died, stopped, or broke the contract).
    #[error("{0}")]
    Failed(String),
}

impl Failure for EngineError {
    fn kind(&self) -> ExitKind {
        match self {
            EngineError::BadInput(_) => ExitKind::BadInput,
            EngineError::Failed(_) => ExitKind::Runtime,
        }
    }
}

/// One engine step as this rank's engine counted it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCounts {
    /// The engine's own step number (the synthetic engine: the loop's step).
    pub engine_step: u64,
    /// `[layers, slots_per_rank]`: tokens this rank's engine routed to each of its own slots
    /// (an engine knows only its own slots; the all-reduce builds the global logical load).
    pub slots: Array2<u64>,
    /// False when the step is not of the phase being balanced: it counts as zero tokens.
    pub balanced: bool,
    /// True when the step's counts were lost (overwritten before they were read): zero tokens.
    pub lost: bool,
    /// The step's MoE time on this rank as the engine measured it, in ns (0: not measured).
    pub moe_ns: u64,
}

/// The inference job one rank runs beside, as the balancing loop sees it.
///
/// Every rank has its own engine (engine rank r beside balancer rank r). The loop asks for the
/// next step's counts, converts them to logical loads with the placement that was live at that
/// step, all-reduces them, and moves weights through the engine's [`ExpertStore`], whose commit
/// makes the engine use a layer's new placement.
pub trait Engine {
    /// For the header and the report: `synthetic`, `shm:NAME`.
    fn name(&self) -> String;
    /// What drives the engine, one line.
    fn describe(&self) -> String;
    /// The placement the engine started with: `phy2log [layers, num_physical]`.
    fn initial_placement(&self) -> &Placement;
    /// Steps the run lasts, when known in advance (the synthetic engine's `--steps`).
    fn planned_steps(&self) -> Option<usize>;
    /// The counts of the next step, or `None` when the engine has finished. `live` is the newest
    /// committed placement (the synthetic engine routes its load on it; a real engine routes on
    /// its own copy).
    fn next_step(&mut self, live: &Placement) -> Result<Option<StepCounts>, EngineError>;
    /// The engine's expert weights, as the executor moves them.
    fn store(&mut self) -> &mut dyn ExpertStore;
    /// The same, read-only.
    fn store_ref(&self) -> &dyn ExpertStore;
    /// Whether the engine's global tensors are as they were when the run started (`None`: it
    /// has none). Local to this rank.
    fn globals_unchanged(&mut self) -> Result<Option<bool>, EngineError> {
        Ok(None)
    }
}

/// SplitMix64's finaliser: a bijective 64-bit mix (Steele, Lea and Flood, 2014).
#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One step of Knuth's MMIX linear congruential generator: advances `state` and returns it. A
/// cheap, reproducible stream for tests, benchmarks and examples (its low bits are weak: use the
/// high ones).
#[inline]
pub fn lcg64(state: &mut u64) -> u64 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *state
}

/// The 8-byte word `word` (byte offset `8 * word`) of logical expert `expert`'s weights in
/// layer `layer`. The GPU kernels compute the same function.
#[inline]
pub fn pattern_word(layer: usize, expert: usize, word: u64) -> u64 {
    pattern_word_seeded(expert_seed(layer, expert), word)
}

/// The part of [`pattern_word`] that depends on (layer, expert) only: compute it once per expert.
#[inline]
pub(crate) fn expert_seed(layer: usize, expert: usize) -> u64 {
    splitmix64(((layer as u64) << 32) ^ expert as u64)
}

/// [`pattern_word`] from the expert's [`expert_seed`].
#[inline]
pub(crate) fn pattern_word_seeded(seed: u64, word: u64) -> u64 {
    splitmix64(seed ^ word)
}

/// Writes logical expert `expert`'s weights of layer `layer` into `buf`: word `i` (bytes
/// `8i..8i+8`) is [`pattern_word`]`(layer, expert, i)`, little-endian; a tail shorter than a word
/// holds the low bytes of its word (an expert of contract 2 is any number of bytes).
pub fn fill_expert(buf: &mut [u8], layer: usize, expert: usize) {
    let seed = expert_seed(layer, expert);
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let n = w.len();
        w.copy_from_slice(&pattern_word_seeded(seed, i as u64).to_le_bytes()[..n]);
    }
}

/// Bytes of `buf` that differ from logical expert `expert`'s weights of layer `layer`.
pub fn wrong_bytes(buf: &[u8], layer: usize, expert: usize) -> u64 {
    let seed = expert_seed(layer, expert);
    let diff_bytes =
        |diff: u64| if diff == 0 { 0 } else { diff.to_le_bytes().iter().filter(|&&b| b != 0).count() as u64 };
    let chunks = buf.chunks_exact(8);
    let tail = chunks.remainder();
    let whole = chunks.len();
    let words: u64 = chunks
        .enumerate()
        .map(|(i, w)| {
            diff_bytes(u64::from_le_bytes(w.try_into().expect("8 bytes")) ^ pattern_word_seeded(seed, i as u64))
        })
        .sum();
    // A tail shorter than a word is compared with the low bytes of its word.
    let mut word = [0u8; 8];
    word[..tail.len()].copy_from_slice(tail);
    let want = pattern_word_seeded(seed, whole as u64)
        & (u64::MAX >> (8 * (8 - tail.len()) % 64)).wrapping_mul(u64::from(!tail.is_empty()));
    words + diff_bytes(u64::from_le_bytes(word) ^ want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_experts_verify_and_flips_are_counted() {
        let mut buf = vec![0u8; 64];
        assert!(wrong_bytes(&buf, 1, 2) > 56, "zeros are not the weights");
        fill_expert(&mut buf, 1, 2);
        assert_eq!(wrong_bytes(&buf, 1, 2), 0);
        assert!(wrong_bytes(&buf, 1, 3) > 56, "another expert's weights do not verify");
        assert!(wrong_bytes(&buf, 0, 2) > 56, "another layer's weights do not verify");
        buf[13] ^= 0x40;
        buf[40] ^= 0xff;
        assert_eq!(wrong_bytes(&buf, 1, 2), 2);
        // Any length: a tail holds the low bytes of its word.
        let mut odd = vec![0u8; 13];
        fill_expert(&mut odd, 1, 2);
        assert_eq!(&odd[..8], &pattern_word(1, 2, 0).to_le_bytes());
        assert_eq!(&odd[8..], &pattern_word(1, 2, 1).to_le_bytes()[..5]);
        assert_eq!(wrong_bytes(&odd, 1, 2), 0);
        odd[12] ^= 1;
        assert_eq!(wrong_bytes(&odd, 1, 2), 1);
    }

    #[test]
    fn splitmix64_known_values() {
        // First outputs of SplitMix64 seeded with 0 (state advances by the golden gamma).
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(0x9e37_79b9_7f4a_7c15), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn pattern_differs_between_layers_experts_and_words() {
        let a = pattern_word(0, 0, 0);
        assert_ne!(a, pattern_word(1, 0, 0));
        assert_ne!(a, pattern_word(0, 1, 0));
        assert_ne!(a, pattern_word(0, 0, 1));
        // The values the GPU kernels reproduce: fixed forever.
        assert_eq!(pattern_word(3, 5, 7), splitmix64(splitmix64((3u64 << 32) ^ 5) ^ 7));
    }
}

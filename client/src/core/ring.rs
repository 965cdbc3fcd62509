//! The load ring's sequence lock: one entry is `seq, step, phase, tokens, moe_ns, (pad to 64
//! bytes), counts[..]`, all u64 words (docs/engine-contract.md).

use crate::sync::{fence, odd_fence, AtomicU64, Ordering, PUBLISH};

/// Words before the counts of an entry (64 bytes).
pub const HEAD_WORDS: usize = 8;
const SEQ: usize = 0;
const STEP: usize = 1;
const PHASE: usize = 2;
const TOKENS: usize = 3;
const MOE_NS: usize = 4;

/// Tries of a read before it reports the entry busy: an engine writes an entry in microseconds,
/// so a longer odd spell is a stopped, dead or broken writer, which only the caller can judge.
pub const SEQLOCK_SPINS: u32 = 4096;

/// What an entry holds besides its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHead {
    pub step: u64,
    pub phase: u64,
    pub tokens: u64,
    pub moe_ns: u64,
}

/// Writes one entry (the engine side): `entry` is the entry's words (`HEAD_WORDS + counts.len()`
/// at least). A sequence word left odd by a writer that crashed mid-entry is first made even
/// again, so that parity never inverts.
///
/// # Panics
/// If `entry` is shorter than the head and the counts (a caller's bug: the region checks sizes).
pub fn write(entry: &[AtomicU64], head: EntryHead, counts: &[u64]) {
    let words = &entry[..HEAD_WORDS + counts.len()];
    let seq = &words[SEQ];
    let s = seq.load(Ordering::Relaxed);
    let s = s + (s & 1);
    seq.store(s + 1, Ordering::Relaxed);
    // Orders the odd word before every data store (a reader that sees any new data sees it odd,
    // or sees the word changed).
    odd_fence();
    words[STEP].store(head.step, Ordering::Relaxed);
    words[PHASE].store(head.phase, Ordering::Relaxed);
    words[TOKENS].store(head.tokens, Ordering::Relaxed);
    words[MOE_NS].store(head.moe_ns, Ordering::Relaxed);
    for (w, &c) in words[HEAD_WORDS..].iter().zip(counts) {
        w.store(c, Ordering::Relaxed);
    }
    seq.store(s + 2, PUBLISH);
}

/// Reads one entry under its sequence lock (the sidecar side): its head, with `counts` filled,
/// or None when the entry stayed odd or changing for [`SEQLOCK_SPINS`] tries. Never returns a
/// torn entry.
///
/// # Panics
/// If `entry` is shorter than the head and `counts`.
pub fn read(entry: &[AtomicU64], counts: &mut [u64]) -> Option<EntryHead> {
    read_tries(entry, counts, SEQLOCK_SPINS)
}

/// [`read`] with a bound on its tries (the model checker uses 1 or 2).
pub fn read_tries(entry: &[AtomicU64], counts: &mut [u64], tries: u32) -> Option<EntryHead> {
    let words = &entry[..HEAD_WORDS + counts.len()];
    let seq = &words[SEQ];
    for spin in 1..=tries {
        let s1 = seq.load(Ordering::Acquire);
        if s1.is_multiple_of(2) {
            let head = EntryHead {
                step: words[STEP].load(Ordering::Relaxed),
                phase: words[PHASE].load(Ordering::Relaxed),
                tokens: words[TOKENS].load(Ordering::Relaxed),
                moe_ns: words[MOE_NS].load(Ordering::Relaxed),
            };
            for (c, w) in counts.iter_mut().zip(&words[HEAD_WORDS..]) {
                *c = w.load(Ordering::Relaxed);
            }
            // Orders the data loads before the second load of the word.
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) == s1 {
                return Some(head);
            }
        }
        spin_wait(spin);
    }
    None
}

fn spin_wait(spin: u32) {
    #[cfg(loom)]
    {
        let _ = spin;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        if spin.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

//! The synthetic engine: it stands in for the inference job. It produces per-expert loads
//! ([`synthetic`]) and holds expert weights whose bytes are a pure function of
//! (layer, logical expert, byte offset) ([`pattern_word`]), so any receiver can verify them.

pub mod source;
pub mod synthetic;

pub use source::{logical_from_slots, slot_loads, LoadSource};

/// SplitMix64's finaliser: a bijective 64-bit mix (Steele, Lea and Flood, 2014).
#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 8-byte word `word` (byte offset `8 * word`) of logical expert `expert`'s weights in
/// layer `layer`. The GPU kernels compute the same function.
#[inline]
pub fn pattern_word(layer: usize, expert: usize, word: u64) -> u64 {
    pattern_word_seeded(expert_seed(layer, expert), word)
}

/// The part of [`pattern_word`] that depends on (layer, expert) only: compute it once per expert.
#[inline]
pub fn expert_seed(layer: usize, expert: usize) -> u64 {
    splitmix64(((layer as u64) << 32) ^ expert as u64)
}

/// [`pattern_word`] from the expert's [`expert_seed`].
#[inline]
pub fn pattern_word_seeded(seed: u64, word: u64) -> u64 {
    splitmix64(seed ^ word)
}

/// Writes logical expert `expert`'s weights of layer `layer` into `buf` (a multiple of 8 bytes;
/// word `i` is [`pattern_word`]`(layer, expert, i)`, little-endian).
pub fn fill_expert(buf: &mut [u8], layer: usize, expert: usize) {
    let seed = expert_seed(layer, expert);
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern_word_seeded(seed, i as u64).to_le_bytes());
    }
}

/// Bytes of `buf` that differ from logical expert `expert`'s weights of layer `layer`.
pub fn wrong_bytes(buf: &[u8], layer: usize, expert: usize) -> u64 {
    let seed = expert_seed(layer, expert);
    let words = buf.chunks_exact(8).enumerate().map(|(i, w)| {
        let diff = u64::from_le_bytes(w.try_into().expect("8 bytes")) ^ pattern_word_seeded(seed, i as u64);
        if diff == 0 {
            0
        } else {
            diff.to_le_bytes().iter().filter(|&&b| b != 0).count() as u64
        }
    });
    // A tail shorter than a word cannot hold the pattern: every byte of it counts as wrong.
    words.sum::<u64>() + (buf.len() % 8) as u64
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

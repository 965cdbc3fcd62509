//! The synthetic engine: it stands in for the inference job. It produces per-expert loads
//! ([`synthetic`]) and holds expert weights whose bytes are a pure function of
//! (layer, logical expert, byte offset) ([`pattern_word`]), so any receiver can verify them.

pub mod synthetic;

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
    splitmix64(splitmix64(((layer as u64) << 32) ^ expert as u64) ^ word)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}

//! Verification: how a rank checks the expert bytes it staged before any rank commits them.
//!
//! Real expert weights are unknown to eplb, so the check is against a checksum that the sender
//! computed over the bytes it sent ([`checksum`], XXH3-64): the sender of a transfer sends the
//! checksum of its live slot after the bytes, a rank copying locally takes the checksum of its
//! own source slot, and the receiver compares the checksum of what landed in staging. The
//! synthetic engine's weights are also a pure function of (layer, expert, offset), so its store
//! checks that pattern as well, and counts the bytes that differ.

use crate::engine::wrong_bytes;

/// The checksum of one expert's bytes, as its sender computes it and its receiver checks it.
#[inline]
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// How staged (and live) expert bytes are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verification {
    /// A real engine's weights: against the checksum the sender computed over the bytes it sent.
    Checksum,
    /// The synthetic engine's weights: the checksum, and the pattern of
    /// [`crate::engine::pattern_word`] (every byte a function of (layer, expert, offset)).
    ChecksumAndPattern,
}

impl Verification {
    /// Wrong bytes of a staged slot `buf` that must hold logical expert `expert` of `layer`, whose
    /// sender computed `sent` over the bytes it sent. The pattern check counts the bytes that
    /// differ; a checksum mismatch alone cannot say which bytes are wrong, so it counts every
    /// byte of the slot.
    pub(crate) fn staged_wrong(self, buf: &[u8], layer: usize, expert: usize, sent: u64) -> u64 {
        let pattern = match self {
            Verification::Checksum => 0,
            Verification::ChecksumAndPattern => wrong_bytes(buf, layer, expert),
        };
        if pattern == 0 && checksum(buf) != sent {
            buf.len() as u64
        } else {
            pattern
        }
    }
}

/// The bookkeeping of verification that every store shares, written once: the checksums each
/// staged slot must have (its sender's), and the checksums of the live slots of each layer (taken
/// at the first live check, kept up to date by every commit). A slot's checksum is a vector: the
/// host store keeps one XXH3 of the whole expert, the GPU store one sum per per-expert tensor.
/// Any mismatch of a slot counts its `expert_bytes` (a checksum cannot say which bytes differ).
#[derive(Debug, Clone)]
pub(crate) struct Verifier {
    expert_bytes: u64,
    /// `[slots_per_rank]`: what each staged slot must hold (its sender's sums).
    expected: Vec<Vec<u64>>,
    /// `live[layer][slot]`: the live slots' sums, once known.
    live: Vec<Option<Vec<Vec<u64>>>>,
}

impl Verifier {
    pub fn new(num_layers: usize, slots_per_rank: usize, expert_bytes: usize) -> Verifier {
        Verifier {
            expert_bytes: expert_bytes as u64,
            expected: vec![Vec::new(); slots_per_rank],
            live: vec![None; num_layers],
        }
    }

    /// Staged slot `slot` must hold what its sender summed as `sums`.
    pub fn expect(&mut self, slot: usize, sums: Vec<u64>) {
        self.expected[slot] = sums;
    }

    /// A staged copy: `dst` must hold what `src` holds.
    pub(crate) fn expect_copy(&mut self, src: usize, dst: usize) {
        self.expected[dst] = self.expected[src].clone();
    }

    pub fn expected(&self, slot: usize) -> &[u64] {
        &self.expected[slot]
    }

    /// Wrong bytes of staged slot `slot` whose bytes sum to `landed`.
    pub(crate) fn staged_wrong(&self, slot: usize, landed: &[u64]) -> u64 {
        if self.expected[slot] == landed {
            0
        } else {
            self.expert_bytes
        }
    }

    /// The staged slots `changed` of `layer` are live now: their sums are the expected ones.
    pub fn committed(&mut self, layer: usize, changed: &[usize]) {
        if let Some(Some(sums)) = self.live.get_mut(layer) {
            for &k in changed {
                sums[k] = self.expected[k].clone();
            }
        }
    }

    /// Wrong bytes of `layer`'s live slots whose sums are `now` (`[slots_per_rank]`): against
    /// the sums known for them (the first call learns them).
    pub(crate) fn live_wrong(&mut self, layer: usize, now: Vec<Vec<u64>>) -> u64 {
        let eb = self.expert_bytes;
        let known = self.live[layer].get_or_insert_with(|| now.clone());
        known.iter().zip(&now).filter(|(a, b)| a != b).count() as u64 * eb
    }
}

/// XXH3-64 of byte slices taken as one concatenation (an expert's rows, a global tensor's rows).
pub(crate) fn checksum_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in parts {
        h.update(p);
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fill_expert;

    #[test]
    fn a_flipped_byte_fails_both_checks() {
        let mut buf = vec![0u8; 256];
        fill_expert(&mut buf, 2, 5);
        let sent = checksum(&buf);
        for v in [Verification::Checksum, Verification::ChecksumAndPattern] {
            assert_eq!(v.staged_wrong(&buf, 2, 5, sent), 0);
        }
        buf[77] ^= 1;
        assert_eq!(Verification::Checksum.staged_wrong(&buf, 2, 5, sent), 256, "whole slot unverified");
        assert_eq!(Verification::ChecksumAndPattern.staged_wrong(&buf, 2, 5, sent), 1, "the pattern counts bytes");
        // Bytes that are not the pattern but are what the sender sent: only the pattern check fails.
        let other = vec![7u8; 256];
        assert_eq!(Verification::Checksum.staged_wrong(&other, 2, 5, checksum(&other)), 0);
        assert!(Verification::ChecksumAndPattern.staged_wrong(&other, 2, 5, checksum(&other)) > 200);
    }

    #[test]
    fn the_checksum_of_parts_is_the_checksum_of_their_concatenation() {
        let a: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(checksum_parts([&a[..5], &a[5..123], &a[123..]]), checksum(&a));
    }

    #[test]
    fn the_verifier_counts_whole_slots_and_follows_commits() {
        let mut v = Verifier::new(2, 3, 100);
        v.expect(1, vec![7, 8]);
        assert_eq!(v.staged_wrong(1, &[7, 8]), 0);
        assert_eq!(v.staged_wrong(1, &[7, 9]), 100);
        assert_eq!(v.live_wrong(0, vec![vec![1], vec![2], vec![3]]), 0, "learned");
        assert_eq!(v.live_wrong(0, vec![vec![1], vec![5], vec![3]]), 100);
        v.expect(2, vec![9]);
        v.expect_copy(2, 1);
        v.committed(0, &[1, 2]);
        assert_eq!(v.live_wrong(0, vec![vec![1], vec![9], vec![9]]), 0);
    }
}

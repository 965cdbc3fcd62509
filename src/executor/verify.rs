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
pub enum Verification {
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
    pub fn staged_wrong(self, buf: &[u8], layer: usize, expert: usize, sent: u64) -> u64 {
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
}

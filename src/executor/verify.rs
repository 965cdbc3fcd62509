//! Verification: how a rank checks the expert bytes it staged before any rank commits them.

use crate::engine::wrong_bytes;

/// How staged (and live) expert bytes are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// The synthetic engine's weights: every byte is a pure function of (layer, logical expert,
    /// offset) ([`crate::engine::pattern_word`]), so a rank checks what it holds without messages.
    Pattern,
}

impl Verification {
    /// Bytes of `buf` (one expert's slot) that differ from what logical expert `expert` of
    /// `layer` must hold.
    pub fn wrong_bytes(self, buf: &[u8], layer: usize, expert: usize) -> u64 {
        match self {
            Verification::Pattern => wrong_bytes(buf, layer, expert),
        }
    }
}

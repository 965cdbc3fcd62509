//! Exact load arithmetic shared by every policy.
//!
//! Every rank computes the placement on its own, so the arithmetic must give bit-identical
//! results everywhere; it is integer-only, so the result cannot depend on the CPU, the compiler's
//! floating-point contraction, or the thread that computed it.
//!
//! * Token loads are `u64`. A layer whose total reaches 2^[`MAX_TOTAL_BITS`] is first scaled down
//!   by a right shift of every expert's load ([`normalized`]): a deterministic quantisation that
//!   only loads of more than a trillion tokens per layer ever see.
//! * The load one replica carries, `w / c`, is unsigned fixed point with [`FRAC_BITS`] fractional
//!   bits in a `u64`: `per_replica(w, c) = floor(w * 2^FRAC_BITS / c)`. Any sum of per-replica
//!   loads of one layer is at most `total * 2^FRAC_BITS < 2^64`, so nothing overflows.
//! * Two per-replica loads `w_a/c_a` and `w_b/c_b` compare exactly like the rationals whenever
//!   `c_a * c_b <= 2^FRAC_BITS` (their difference is then at least one unit), i.e. for any replica
//!   counts up to 4096.
//! * Sums of per-replica loads are exact up to one unit (2^-24 token) per summand.

use std::borrow::Cow;

/// A per-replica or per-GPU load in tokens, fixed point with [`FRAC_BITS`] fractional bits.
pub type Fixed = u64;

/// Fractional bits of [`Fixed`].
pub const FRAC_BITS: u32 = 24;

/// A layer's total load must stay below `2^MAX_TOTAL_BITS` tokens for [`Fixed`] sums to fit.
pub const MAX_TOTAL_BITS: u32 = 64 - FRAC_BITS;

/// `w` tokens as a [`Fixed`] (`w` below 2^[`MAX_TOTAL_BITS`]).
#[inline]
pub fn from_tokens(w: u64) -> Fixed {
    w << FRAC_BITS
}

/// The load one of `count` replicas of an expert with `w` tokens carries: `floor(w * 2^24 / count)`.
#[inline]
pub fn per_replica(w: u64, count: usize) -> Fixed {
    debug_assert!(count > 0 && w < (1 << MAX_TOTAL_BITS));
    from_tokens(w) / count as u64
}

/// A [`Fixed`] as tokens, for reports only (never for decisions).
#[inline]
pub fn to_f64(x: Fixed) -> f64 {
    x as f64 / (1u64 << FRAC_BITS) as f64
}

/// One layer's loads `[num_logical]`, right-shifted just enough that their total is below
/// 2^[`MAX_TOTAL_BITS`] (unchanged, and not copied, in every realistic case).
pub fn normalized(weight: &[u64]) -> Cow<'_, [u64]> {
    let total: u128 = weight.iter().map(|&w| w as u128).sum();
    if total < (1u128 << MAX_TOTAL_BITS) {
        return Cow::Borrowed(weight);
    }
    let shift = 128 - total.leading_zeros() - MAX_TOTAL_BITS;
    Cow::Owned(weight.iter().map(|&w| w >> shift).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_replica_orders_exactly_like_rationals() {
        // 7/3 < 12/5 < 5/2
        assert!(per_replica(7, 3) < per_replica(12, 5));
        assert!(per_replica(12, 5) < per_replica(5, 2));
        // Equal rationals are equal.
        assert_eq!(per_replica(6, 3), per_replica(4, 2));
        // Large loads, close rationals with counts up to 4096: (x+1)/4096 vs x/4095.
        let x = (1u64 << 39) - 7;
        let (a, b) = (per_replica(x + 1, 4096), per_replica(x, 4095));
        assert_eq!(a.cmp(&b), ((x + 1) as u128 * 4095).cmp(&(x as u128 * 4096)));
    }

    #[test]
    fn normalized_keeps_small_layers_and_shifts_huge_ones() {
        let w = [5u64, 7, 9];
        assert!(matches!(normalized(&w), Cow::Borrowed(_)));
        let big = [u64::MAX / 2, u64::MAX / 4, 3];
        let n = normalized(&big);
        let total: u128 = n.iter().map(|&x| x as u128).sum();
        assert!(total < 1 << MAX_TOTAL_BITS);
        assert!(n[0] > n[1] && n[1] > 0, "order kept: {n:?}");
        // The sum of all replicas of the largest normalised total never overflows.
        let sum: u128 = n.iter().map(|&x| per_replica(x, 3) as u128 * 3).sum();
        assert!(sum < 1 << 64);
    }
}

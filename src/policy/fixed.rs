//! Exact load arithmetic shared by every policy.
//!
//! Every rank computes the placement on its own, so the arithmetic must give bit-identical
//! results everywhere. Token loads are integers (`u64`); a layer's total is validated to fit in
//! `u64` when the load is read. The load one replica carries, `w / c`, is kept as an unsigned
//! fixed-point number with [`FRAC_BITS`] fractional bits in a `u128`:
//!
//! * `per_replica(w, c) = floor(w * 2^64 / c)`, so any sum of per-replica loads of one layer is
//!   at most `total * 2^64 < 2^128`: no overflow is possible;
//! * two per-replica loads `w_a/c_a` and `w_b/c_b` compare exactly like the rationals whenever
//!   `c_a * c_b <= 2^64` (their difference is at least `1/(c_a c_b)`, i.e. at least one unit),
//!   which holds for any replica count below 2^32;
//! * sums of per-replica loads are exact up to one unit (2^-64 token) per summand.
//!
//! Only integer operations are used, so the result does not depend on the CPU, the compiler's
//! floating-point contraction, or the thread that computed it.

/// A per-replica or per-GPU load in tokens, fixed point with [`FRAC_BITS`] fractional bits.
pub type Fixed = u128;

/// Fractional bits of [`Fixed`].
pub const FRAC_BITS: u32 = 64;

/// `w` tokens as a [`Fixed`].
#[inline]
pub fn from_tokens(w: u64) -> Fixed {
    (w as u128) << FRAC_BITS
}

/// The load one of `count` replicas of an expert with `w` tokens carries: `floor(w * 2^64 / count)`.
#[inline]
pub fn per_replica(w: u64, count: usize) -> Fixed {
    debug_assert!(count > 0);
    from_tokens(w) / count as u128
}

/// A [`Fixed`] as tokens, for reports only (never for decisions).
#[inline]
pub fn to_f64(x: Fixed) -> f64 {
    (x as f64) / 18446744073709551616.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_replica_orders_exactly_like_rationals() {
        // 7/3 vs 5/2 vs 12/5: 2.333.. < 2.4 < 2.5
        assert!(per_replica(7, 3) < per_replica(12, 5));
        assert!(per_replica(12, 5) < per_replica(5, 2));
        // Equal rationals are equal.
        assert_eq!(per_replica(6, 3), per_replica(4, 2));
        // Large loads, close rationals: (2^63-1)/(2^31-1) vs (2^63-2)/(2^31-1).
        let c = (1usize << 31) - 1;
        assert!(per_replica((1 << 63) - 2, c) < per_replica((1 << 63) - 1, c));
        // The sum of all replicas of the largest possible total never overflows.
        let total = u64::MAX;
        let sum: Fixed = (0..7).map(|_| per_replica(total, 7)).sum();
        assert!(sum <= from_tokens(total));
    }
}

//! The coming load, estimated by measurement: a bank of exponential moving averages, and the one
//! that has recently predicted the next step best.
//!
//! Every average `k` (memory about `2^k` steps) is kept per layer and expert in fixed point with
//! [`EMA_FRAC_BITS`] fractional bits, updated by shifts: `s += (x - s) / 2^k`, in exact integer
//! arithmetic, so every rank holds the same bits. Before each update, every average is scored on
//! how well it predicted the step that just came: the squared error of the expert *shares*
//! (`load / layer total`, in Q32), summed over layers and experts, itself averaged over the last
//! about `2^ERROR_MEMORY_BITS` steps. The estimate is the average with the lowest score (ties: the
//! longer memory). Under steady traffic with sampling noise the long memories win (they average the
//! noise away); right after a jump of the hot experts the short ones win within a few steps, so the
//! plans follow the new load without waiting for a window to flush.
//!
//! An exponential average keeps the weight `e^(-t/2^k)` on a load that is gone `t` steps after a
//! jump: the long ones would predict badly for many memories, and the estimate would stay short
//! (noisy, and taken for a sign that the load keeps moving) long after the new load settled. So an
//! average that predicts much worse than the best one restarts from it, and an average holds the
//! steps since its (re)start as their mean until it holds its memory (`Age`): after a jump, the
//! best estimate becomes the mean of the steps since, and its memory grows with them.
//!
//! Two more banks hold the same averages over the even steps only and over the odd steps only
//! ([`Estimator::half`]): two estimates of the same load from disjoint samples, so that a plan
//! made on one can be judged on the other (its gain there is not inflated by the noise it fit).

use ndarray::{Array2, Array3, ArrayView2};

/// Fractional bits of the averages.
pub const EMA_FRAC_BITS: u32 = 16;

/// Memories `2^k` steps, `k = 0..NUM_EMAS` (1 step to about 256 steps).
pub const NUM_EMAS: usize = 9;

/// The prediction scores are averaged over about `2^ERROR_MEMORY_BITS` steps.
const ERROR_MEMORY_BITS: u32 = 5;

/// The bank of averages. `ema [NUM_EMAS, layers, num_logical]`.
#[derive(Debug, Clone)]
pub struct Estimator {
    ema: Array3<u64>,
    /// `half[p] [NUM_EMAS, layers, num_logical]`: the averages over the steps of parity `p` only
    /// (memory `2^k` of those steps).
    half: [Array3<u64>; 2],
    /// Steps each average holds (see [`Age`]): `age` for `ema`, `half_age[p]` for `half[p]`.
    age: Age,
    half_age: [Age; 2],
    /// Recent prediction error of every average (Q64 shares squared, averaged by shifts).
    score: [u128; NUM_EMAS],
    steps: usize,
}

/// How many steps each average of a bank holds since it was (re)started, saturating at its
/// memory. An average holding `n < 2^k` steps is updated as the mean of those steps (shift
/// `floor(log2(n + 1))`, not `k`): it warms up at the pace of the data instead of keeping the
/// weight of its first step (or of a load that is gone) for `2^k` steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Age([u64; NUM_EMAS]);

impl Age {
    /// The shift of the next update of average `k`.
    fn shift(&self, k: usize) -> usize {
        warm_up_shift(self.0[k], k)
    }

    /// One more step in every average.
    fn step(&mut self) {
        for (k, n) in self.0.iter_mut().enumerate() {
            *n = (*n + 1).min(1 << k);
        }
    }

    /// The steps an average holds: at most its memory.
    fn held(&self, k: usize) -> u64 {
        self.0[k]
    }
}

/// An average whose recent prediction error is this many times the best one's is restarted
/// from the best one (see [`Estimator::push`]).
const RESTART_RATIO: u128 = 2;

impl Estimator {
    pub fn new(layers: usize, num_logical: usize) -> Estimator {
        let bank = || Array3::zeros((NUM_EMAS, layers, num_logical));
        Estimator {
            ema: bank(),
            half: [bank(), bank()],
            age: Age([0; NUM_EMAS]),
            half_age: [Age([0; NUM_EMAS]); 2],
            score: [0; NUM_EMAS],
            steps: 0,
        }
    }

    /// Adds one step's global load `[layers, num_logical]`.
    ///
    /// Every average is first scored on how well it predicted this step. An average of longer
    /// memory than the best one whose score is `RESTART_RATIO` times the best's holds a load
    /// that is gone (after a jump of the hot experts, the old load keeps a weight `e^(-t/2^k)` in
    /// an average of memory `2^k` for many memories): it restarts from the best average (its
    /// value, the steps it holds and its score), in the whole bank and in both halves, and from
    /// there warms up as the mean of the new steps (`Age`).
    pub fn push(&mut self, load: ArrayView2<u64>) {
        // x [layers * num_logical]: the load in fixed point, row-major (the banks' layout).
        let x: Vec<u64> = load.iter().map(|&v| v.saturating_mul(1 << EMA_FRAC_BITS)).collect();
        let row = x.len().max(1);
        if self.steps > 0 {
            let actual = shares(load);
            let n = x.len() / actual.len().max(1);
            if let Some(all) = self.ema.as_slice() {
                for (k, bank) in all.chunks_exact(row).enumerate() {
                    let err: u128 = bank.chunks_exact(n.max(1)).zip(&actual).map(|(avg, a)| row_error(avg, a)).sum();
                    self.score[k] = self.score[k] - (self.score[k] >> ERROR_MEMORY_BITS) + err;
                }
            }
            let best = self.best();
            for k in best + 1..NUM_EMAS {
                if self.score[k] > self.score[best].saturating_mul(RESTART_RATIO) {
                    self.restart(k, best);
                }
            }
        }
        // The step's half bank, then the whole bank.
        let parity = self.steps % 2;
        update(&mut self.half[parity], &mut self.half_age[parity], &x);
        update(&mut self.ema, &mut self.age, &x);
        self.steps += 1;
    }

    /// Average `k` becomes a copy of average `from` (value, steps held, score), in every bank.
    fn restart(&mut self, k: usize, from: usize) {
        for (bank, age) in
            [(&mut self.ema, &mut self.age)].into_iter().chain(self.half.iter_mut().zip(self.half_age.iter_mut()))
        {
            let src = bank.index_axis(ndarray::Axis(0), from).to_owned();
            bank.index_axis_mut(ndarray::Axis(0), k).assign(&src);
            age.0[k] = age.0[from];
        }
        self.score[k] = self.score[from];
    }

    /// Steps pushed so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The memory `k` of the average that predicts best now (ties: the longer memory).
    pub fn best(&self) -> usize {
        (0..NUM_EMAS).rev().min_by_key(|&k| self.score[k]).unwrap_or(0)
    }

    /// Steps the best estimate holds: its memory `2^k`, or fewer while it warms up after a
    /// (re)start. How long the load has been steady, as far as the estimate can tell.
    pub fn memory(&self) -> u64 {
        self.age.held(self.best()).max(1)
    }

    /// The estimate of the coming load, `[layers, num_logical]`, in tokens with
    /// [`EMA_FRAC_BITS`] fractional bits (what the policy plans on; only ratios matter to it).
    pub fn estimate(&self) -> ArrayView2<'_, u64> {
        self.ema.index_axis(ndarray::Axis(0), self.best())
    }

    /// The average with memory `k` over the steps of parity `parity` only (`2^k` of those steps),
    /// `[layers, num_logical]`, fixed point as [`Estimator::estimate`]; zero before its first step.
    pub fn half(&self, parity: usize, k: usize) -> ArrayView2<'_, u64> {
        self.half[parity % 2].index_axis(ndarray::Axis(0), k.min(NUM_EMAS - 1))
    }

    /// The estimate with memory `k` (for tests and reports).
    pub fn average(&self, k: usize) -> Array2<u64> {
        self.ema.index_axis(ndarray::Axis(0), k).to_owned()
    }
}

/// Adds `x [layers * num_logical]` (fixed point, row-major) to every average of
/// `bank [NUM_EMAS, layers, num_logical]`: `s += (x - s) / 2^shift`, rounding toward `s` (exact,
/// identical everywhere), with the shift of the steps each average holds (`age`; an average that
/// holds none has shift 0 and becomes `x`). Branch-free over contiguous rows, so that it vectorizes.
fn update(bank: &mut Array3<u64>, age: &mut Age, x: &[u64]) {
    let Some(all) = bank.as_slice_mut() else { return };
    for (k, avg) in all.chunks_exact_mut(x.len().max(1)).enumerate() {
        update_row(avg, x, age.shift(k));
    }
    age.step();
}

/// The shift that adds the next sample to an average holding `held` samples, of memory
/// `2^memory_bits`: `floor(log2(held + 1))`, at most `memory_bits`. Until it holds its memory the
/// average is (about) the mean of its samples; the first sample (shift 0) sets it.
pub(crate) fn warm_up_shift(held: u64, memory_bits: usize) -> usize {
    (63 - (held.saturating_add(1)).leading_zeros() as usize).min(memory_bits)
}

/// `s += (x - s) / 2^k` for every average of one row, rounding toward `s`.
///
/// Written with 64-bit adds, bitwise operations and logical shifts only (no compare), which
/// SSE2 has for vectors: `down` (all ones when `x < s`) is the borrow of `x - s`, `|x - s|` and
/// the signed step are conditional negations by it.
pub(crate) fn update_row(avg: &mut [u64], x: &[u64], k: usize) {
    for (s, &x) in avg.iter_mut().zip(x) {
        let d = x.wrapping_sub(*s);
        let down = 0u64.wrapping_sub(((!x & *s) | (!(x ^ *s) & d)) >> 63);
        let step = ((d ^ down).wrapping_sub(down)) >> k;
        *s = s.wrapping_add((step ^ down).wrapping_sub(down));
    }
}

/// `floor(x * 2^32 / total)` for `0 <= x <= total` (a Q32 share), exact, with a multiplication
/// by a reciprocal instead of a division per element.
#[derive(Debug, Clone, Copy)]
struct Share {
    total: u128,
    /// `floor(2^96 / total)`, or 0 when `total >= 2^64` (then a division).
    inv: u128,
}

impl Share {
    fn new(total: u128) -> Share {
        Share { total, inv: if total > 0 && total < 1 << 64 { (1u128 << 96) / total } else { 0 } }
    }

    fn of(&self, x: u64) -> u128 {
        let scaled = (x as u128) << 32;
        if self.inv == 0 {
            return scaled.checked_div(self.total).unwrap_or(0);
        }
        // x * inv <= 2^96 (x <= total): no overflow; q is the floor or one below it.
        let q = (x as u128 * self.inv) >> 64;
        if (q + 1) * self.total <= scaled {
            q + 1
        } else {
            q
        }
    }
}

/// The Q32 shares of every layer of `load [layers, num_logical]`; None for a layer without load.
fn shares(load: ArrayView2<u64>) -> Vec<Option<Vec<u128>>> {
    load.outer_iter()
        .map(|row| {
            let total = row.iter().map(|&v| v as u128).sum::<u128>();
            (total > 0).then(|| {
                let share = Share::new(total);
                row.iter().map(|&v| share.of(v)).collect()
            })
        })
        .collect()
}

/// The squared difference of the Q32 shares of one predicted row and of the `actual` shares of
/// that layer, summed over its experts (0 when either side has no load).
fn row_error(predicted: &[u64], actual: &Option<Vec<u128>>) -> u128 {
    let Some(a) = actual else { return 0 };
    let total = predicted.iter().map(|&v| v as u128).sum::<u128>();
    if total == 0 {
        return 0;
    }
    let share = Share::new(total);
    predicted.iter().zip(a).map(|(&x, &sy)| share.of(x).abs_diff(sy).pow(2)).sum()
}

/// Sum over layers and experts of the squared difference of the Q32 shares of `predicted` and
/// `actual` (a layer with no load on either side counts 0).
#[cfg(test)]
fn prediction_error(predicted: ArrayView2<u64>, actual: ArrayView2<u64>) -> u128 {
    predicted.outer_iter().zip(&shares(actual)).map(|(p, a)| row_error(&p.to_vec(), a)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_converge_and_the_best_follows_the_traffic() {
        let mut e = Estimator::new(1, 4);
        // Steady traffic with alternating noise: the long memories predict best.
        for t in 0..200u64 {
            let n = if t % 2 == 0 { 10 } else { 0 };
            e.push(ndarray::arr2(&[[100 + n, 50, 50 - n, 20]]).view());
        }
        let steady = e.memory();
        assert!(steady >= 16, "steady noisy traffic wants a long memory, got {steady} steps");
        // An abrupt shift: expert 3 becomes the hot one. Within a few steps the estimate holds
        // only the steps since.
        for _ in 0..6 {
            e.push(ndarray::arr2(&[[20, 50, 50, 105]]).view());
        }
        let shifted = e.memory();
        assert!(shifted <= 6, "after a jump the estimate must hold fewer steps ({shifted} vs {steady})");
        let est = e.estimate();
        assert!(est[[0, 3]] > est[[0, 0]], "the estimate follows the new hot expert: {est:?}");
        // The last-step average is exactly the last load, in fixed point.
        assert_eq!(e.average(0), ndarray::arr2(&[[20u64 << 16, 50 << 16, 50 << 16, 105 << 16]]));
    }

    #[test]
    fn after_a_jump_the_long_averages_restart_on_the_new_load() {
        // Steady noisy load A for 400 steps, then B (the hot expert moves) for 64 steps.
        let mut e = Estimator::new(1, 4);
        let load = |t: u64, hot: usize| {
            let mut row = [40u64, 40, 40, 40];
            row[hot] = 400;
            row[(t % 4) as usize] += 8; // noise
            ndarray::arr2(&[row])
        };
        for t in 0..400 {
            e.push(load(t, 0).view());
        }
        assert_eq!(e.memory(), 1 << (NUM_EMAS - 1), "a steady load: the longest memory, warmed up");
        for t in 0..64 {
            e.push(load(t, 3).view());
        }
        // Without the restart, the longest average would still hold e^(-64/256) = 78% of A.
        let longest = e.average(NUM_EMAS - 1);
        assert!(longest[[0, 3]] > 8 * longest[[0, 0]], "the longest average follows B: {longest:?}");
        let m = e.memory();
        assert!((16..=64).contains(&m), "the estimate holds the steps since the jump, not more: {m}");
        // The halves restarted too: each holds B.
        for p in 0..2 {
            let h = e.half(p, e.best());
            assert!(h[[0, 3]] > 8 * h[[0, 0]], "half {p}: {h:?}");
        }
    }

    #[test]
    fn a_new_average_is_the_mean_of_its_steps() {
        let mut e = Estimator::new(1, 2);
        e.push(ndarray::arr2(&[[10u64, 0]]).view());
        e.push(ndarray::arr2(&[[20u64, 4]]).view());
        // Two steps: every average of memory 2 or more holds their mean (not 10 + (20 - 10) / 2^k).
        for k in 1..NUM_EMAS {
            assert_eq!(e.average(k), ndarray::arr2(&[[15u64 << 16, 2 << 16]]), "memory 2^{k}");
        }
        assert_eq!(e.average(0), ndarray::arr2(&[[20u64 << 16, 4 << 16]]));
    }

    #[test]
    fn the_branch_free_update_is_the_rounded_average() {
        let mut seed = 3u64;
        let mut next = || crate::engine::lcg64(&mut seed);
        let edges = [0, 1, 2, u64::MAX - 1, u64::MAX, 1 << 63, (1 << 63) - 1];
        for k in 0..NUM_EMAS {
            let pairs: Vec<(u64, u64)> = (0..2000)
                .map(|i| match i % 4 {
                    0 => (next(), next()),
                    1 => (next() >> 20, next() >> 20),
                    _ => (edges[i % edges.len()], edges[(i / 7) % edges.len()]),
                })
                .collect();
            let (mut avg, x): (Vec<u64>, Vec<u64>) = pairs.iter().copied().unzip();
            let expected: Vec<u64> =
                pairs.iter().map(|&(s, x)| if x >= s { s + ((x - s) >> k) } else { s - ((s - x) >> k) }).collect();
            update_row(&mut avg, &x, k);
            assert_eq!(avg, expected, "memory 2^{k}");
        }
    }

    #[test]
    fn shares_are_exact_floors() {
        let mut seed = 1u64;
        for total in [1u128, 3, 7, 1 << 20, (1 << 40) + 12345, (1 << 64) - 1, 1 << 64, (1 << 70) + 3] {
            let share = Share::new(total);
            for _ in 0..1000 {
                let r = crate::engine::lcg64(&mut seed);
                let x = if total > u64::MAX as u128 { r } else { (r as u128 % (total + 1)) as u64 };
                assert_eq!(share.of(x), ((x as u128) << 32) / total, "{x} / {total}");
            }
            let x = total.min(u64::MAX as u128) as u64;
            assert_eq!(share.of(x), ((x as u128) << 32) / total);
        }
    }

    #[test]
    fn the_halves_see_disjoint_steps() {
        let mut e = Estimator::new(1, 2);
        assert_eq!(e.half(1, 0), ndarray::arr2(&[[0u64, 0]]), "no odd step yet");
        // Even steps carry [8, 0], odd steps [0, 8].
        for t in 0..10u64 {
            let x = if t % 2 == 0 { [[8, 0]] } else { [[0, 8]] };
            e.push(ndarray::arr2(&x).view());
        }
        for k in 0..NUM_EMAS {
            assert_eq!(e.half(0, k), ndarray::arr2(&[[8u64 << 16, 0]]), "memory 2^{k}");
            assert_eq!(e.half(1, k), ndarray::arr2(&[[0, 8u64 << 16]]));
        }
        // The whole bank mixes both.
        assert!(e.average(3)[[0, 0]] > 0 && e.average(3)[[0, 1]] > 0);
    }

    #[test]
    fn prediction_error_is_zero_for_proportional_loads() {
        let a = ndarray::arr2(&[[2u64, 4, 6]]);
        let b = ndarray::arr2(&[[1u64, 2, 3]]);
        assert_eq!(prediction_error(a.view(), b.view()), 0);
        assert!(prediction_error(a.view(), ndarray::arr2(&[[3u64, 2, 1]]).view()) > 0);
        assert_eq!(prediction_error(ndarray::arr2(&[[0u64, 0]]).view(), ndarray::arr2(&[[1u64, 1]]).view()), 0);
    }
}

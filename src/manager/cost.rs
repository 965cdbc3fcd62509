//! Time, the unit of every decision: what a step of imbalance costs and what a moved copy costs.
//!
//! The model is the public MoE load-balancing competition's (`dynamic_lb_simulator.py`): a layer
//! whose peak GPU load is `PAR` times its mean takes `PAR x step_time / layers` for one step, and
//! changing the expert of one slot costs `expert_bytes / bandwidth` once. A change is worth making
//! when the time it saves over its expected lifetime exceeds the time it costs.
//!
//! The inputs are flags (the same on every rank); they become integers once, in picoseconds, so
//! every decision after that is exact integer arithmetic, identical on every rank. PAR is Q32
//! fixed point (`PAR_ONE` is 1.0).

use super::estimate::{update_row, warm_up_shift};
use crate::policy::fixed::{normalized, Fixed};
use crate::policy::metrics;

/// 1.0 in Q32 PAR units.
pub const PAR_ONE: u64 = 1 << 32;

/// The cost model, in integer picoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostModel {
    /// Time one layer takes for one step when perfectly balanced: `step_ms / layers`.
    pub layer_step_ps: u64,
    /// Time to change the expert of one slot: `expert_bytes / bandwidth`.
    pub copy_ps: u64,
}

impl CostModel {
    /// From the flags: `step_ms` (the balanced MoE time of one step, all layers), `expert_bytes`,
    /// `migration_gbps` (GB/s, 10^9 bytes a second). Each is rounded once to whole picoseconds
    /// (at least 1); IEEE division and rounding are exact operations, so every rank gets the
    /// same integers from the same flags.
    pub fn new(step_ms: f64, layers: usize, expert_bytes: u64, migration_gbps: f64) -> CostModel {
        // At least 1 ps; a cost too large for u64 (or infinite) saturates, never wraps to cheap.
        let ps = |x: f64| if x >= 1.0 { x.round().min(u64::MAX as f64) as u64 } else { 1 };
        CostModel {
            layer_step_ps: ps(step_ms * 1e9 / layers.max(1) as f64),
            copy_ps: ps(expert_bytes as f64 * 1e3 / migration_gbps),
        }
    }

    /// Picoseconds a change saves over `lifetime` steps when it lowers the layer's PAR by
    /// `par_drop` (Q32), less what its `changed` slots cost; negative when it does not pay.
    pub fn net_gain_ps(&self, par_drop: i64, lifetime: u64, changed: usize) -> i128 {
        let saved = (par_drop as i128 * lifetime as i128 * self.layer_step_ps as i128) >> 32;
        saved - changed as i128 * self.copy_ps as i128
    }

    /// The policy's price of one moved copy, as a fraction of the layer's mean GPU load: a copy
    /// must lower the PAR by `copy / (lifetime x layer_step)` to pay for itself.
    pub fn move_cost(&self, lifetime: u64) -> f64 {
        self.copy_ps as f64 / (lifetime.max(1) as f64 * self.layer_step_ps as f64)
    }
}

/// A measured input of the cost model: a moving mean of samples every rank holds alike (they come
/// out of collectives), in integers, so every rank holds the same mean. The first samples are
/// averaged evenly, later ones with a memory of about `2^RUNNING_MEAN_MEMORY_BITS` samples (its
/// shifts round toward the mean: it settles within 31 units of a steady level, nanoseconds here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunningMean {
    mean: u64,
    samples: u64,
}

/// The memory of a [`RunningMean`]: about 32 samples.
const RUNNING_MEAN_MEMORY_BITS: usize = 5;

impl RunningMean {
    /// Adds a sample (the estimator's warm-up and rounded shift update, on one value).
    pub fn add(&mut self, x: u64) {
        let shift = warm_up_shift(self.samples, RUNNING_MEAN_MEMORY_BITS);
        update_row(std::slice::from_mut(&mut self.mean), &[x], shift);
        self.samples += 1;
    }

    /// The mean, or None before the first sample.
    pub fn mean(&self) -> Option<u64> {
        (self.samples > 0).then_some(self.mean)
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }
}

/// PAR (peak GPU load over mean GPU load) of one layer's `phy2log [num_replicas]` under
/// `weight [num_logical]`, Q32; `PAR_ONE` for a layer without load.
pub fn par_q32(weight: &[u64], phy2log: &[usize], slots_per_rank: usize) -> u64 {
    let weight = &*normalized(weight);
    let logcnt = metrics::logcnt_of(phy2log, weight.len());
    let loads = metrics::gpu_loads(weight, phy2log, &logcnt, slots_per_rank);
    par_of_loads(&loads)
}

/// PAR of per-GPU loads, Q32.
pub fn par_of_loads(loads: &[Fixed]) -> u64 {
    let sum: u128 = loads.iter().map(|&l| l as u128).sum();
    let max = loads.iter().copied().max().unwrap_or(0) as u128;
    if sum == 0 {
        return PAR_ONE;
    }
    u64::try_from(((max * loads.len() as u128) << 32) / sum).unwrap_or(u64::MAX)
}

/// A lower bound of the PAR any placement of `weight` on `num_replicas` slots over `num_gpus`
/// GPUs can reach, Q32: the largest replica under DeepSeek's counts (which minimise it) against
/// the mean GPU load, and 1.
pub fn par_lower_bound_q32(weight: &[u64], num_replicas: usize, num_gpus: usize) -> u64 {
    let weight = &*normalized(weight);
    let total: u128 = weight.iter().map(|&w| (w as u128) << crate::policy::fixed::FRAC_BITS).sum();
    if total == 0 {
        return PAR_ONE;
    }
    let (_, _, logcnt) = crate::policy::deepseek::replicate(weight, num_replicas);
    let largest =
        weight.iter().zip(&logcnt).map(|(&w, &c)| crate::policy::fixed::per_replica(w, c) as u128).max().unwrap_or(0);
    let lb = ((largest * num_gpus as u128) << 32) / total;
    u64::try_from(lb).unwrap_or(u64::MAX).max(PAR_ONE)
}

/// Slots whose expert differs between two rows (the competition's "changed slots").
pub fn changed_slots(old: &[usize], new: &[usize]) -> usize {
    old.iter().zip(new).filter(|(a, b)| a != b).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absurd_cost_saturates_and_never_becomes_cheap() {
        let c = CostModel::new(1e-300, 58, u64::MAX, 1e-300);
        assert_eq!((c.layer_step_ps, c.copy_ps), (1, u64::MAX));
        assert!(c.net_gain_ps(1 << 32, 1024, 1) < 0, "a copy that costs forever never pays");
    }

    #[test]
    fn the_competition_model_in_picoseconds() {
        // 88,080,384 B at 900 GB/s: 97.867 us a slot; 60 s over 4096 steps of 12 layers.
        let c = CostModel::new(14.6484375, 12, 88_080_384, 900.0);
        assert_eq!(c.copy_ps, 97_867_093);
        assert_eq!(c.layer_step_ps, 1_220_703_125);
        // A PAR drop of 0.1 for 100 steps saves 12.2 ms; 100 slots cost 9.8 ms: it pays.
        let drop = (PAR_ONE / 10) as i64;
        assert!(c.net_gain_ps(drop, 100, 100) > 0);
        assert!(c.net_gain_ps(drop, 50, 100) < 0, "over half the life it does not pay");
        assert!((c.move_cost(100) - 97_867_093.0 / 122_070_312_500.0).abs() < 1e-15);
    }

    #[test]
    fn measured_means_warm_up_then_follow() {
        let mut m = RunningMean::default();
        assert_eq!(m.mean(), None);
        m.add(100_000);
        m.add(200_000);
        assert_eq!(m.mean(), Some(150_000), "the first samples are averaged evenly");
        for _ in 0..400 {
            m.add(1_000_000);
        }
        // It follows a new level, to within its rounding (2^5 - 1).
        assert!(m.mean().unwrap() >= 1_000_000 - 31, "{:?}", m.mean());
        assert_eq!(m.samples(), 402);
    }

    #[test]
    fn par_and_its_lower_bound() {
        // 4 experts on 2 GPUs, 2 slots each: [9, 1 | 5, 5] -> loads 10 and 10, PAR 1.
        assert_eq!(par_q32(&[9, 1, 5, 5], &[0, 1, 2, 3], 2), PAR_ONE);
        // [9, 5 | 1, 5]: loads 14 and 6, PAR 1.4.
        let p = par_q32(&[9, 1, 5, 5], &[0, 2, 1, 3], 2);
        assert_eq!(p, (PAR_ONE as u128 * 14 / 10) as u64);
        // One hot expert, no spare slot: the bound is its load against the mean.
        assert_eq!(par_lower_bound_q32(&[30, 5, 5], 3, 3), (PAR_ONE as u128 * 30 * 3 / 40) as u64);
        assert_eq!(par_lower_bound_q32(&[0, 0], 2, 2), PAR_ONE);
        assert_eq!(changed_slots(&[0, 1, 2], &[0, 2, 1]), 2);
    }
}

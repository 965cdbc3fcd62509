//! The synthetic engine ([`SyntheticEngine`]) and its built-in load, zipf-like hot experts that
//! drift over time ([`DriftingZipf`]).
//!
//! Each layer has its own ranking of experts; the expert of rank k gets a share proportional to
//! `1 / (k + 1)^exponent`. Every `drift_steps` steps a new ranking (a fresh pseudo-random
//! permutation) takes over, and between two rankings the shares blend linearly, so the hot set
//! moves smoothly; a little multiplicative noise makes every step different. Everything is a pure
//! function of (seed, layer, step), so every rank can compute the same load.

use std::time::{Duration, Instant};

use ndarray::Array2;

use super::{slot_loads, splitmix64, Engine, EngineError, LoadSource, StepCounts};
use crate::executor::ExpertStore;
use crate::policy::Placement;

/// The synthetic engine: every rank replays the same global load (`source`), routes it on the
/// live placement and counts its own slots ([`slot_loads`]); its weights are the pattern of
/// [`super::pattern_word`], in host or GPU memory (`store`).
pub(crate) struct SyntheticEngine {
    source: LoadSource,
    initial: Placement,
    store: Box<dyn ExpertStore>,
    steps: usize,
    next: usize,
    rank: usize,
    /// `--step-ms`: the least time between two steps, and when the last one started.
    pace: Option<Duration>,
    last_step_at: Option<Instant>,
}

impl SyntheticEngine {
    /// `steps` steps of `source`, on rank `rank`, starting from `initial`, weights in `store`.
    pub fn new(source: LoadSource, initial: Placement, store: Box<dyn ExpertStore>, steps: usize, rank: usize) -> Self {
        SyntheticEngine { source, initial, store, steps, next: 0, rank, pace: None, last_step_at: None }
    }

    /// Paces the engine: each step starts at least `step_ms` milliseconds after the previous one
    /// (it sleeps the remainder), as a real engine's steps would.
    pub fn paced(mut self, step_ms: Option<f64>) -> Self {
        self.pace = step_ms.filter(|&ms| ms > 0.0).map(|ms| Duration::from_secs_f64(ms / 1e3));
        self
    }
}

impl Engine for SyntheticEngine {
    fn name(&self) -> String {
        "synthetic".into()
    }

    fn describe(&self) -> String {
        self.source.describe()
    }

    fn initial_placement(&self) -> &Placement {
        &self.initial
    }

    fn planned_steps(&self) -> Option<usize> {
        Some(self.steps)
    }

    fn next_step(&mut self, live: &Placement) -> Result<Option<StepCounts>, EngineError> {
        if self.next >= self.steps {
            return Ok(None);
        }
        if let (Some(pace), Some(last)) = (self.pace, self.last_step_at) {
            std::thread::sleep(pace.saturating_sub(last.elapsed()));
        }
        self.last_step_at = Some(Instant::now());
        let step = self.next;
        self.next += 1;
        let global = self.source.global_step(step);
        let slots = slot_loads(global.view(), live, self.rank, self.store.slots_per_rank());
        Ok(Some(StepCounts { engine_step: step as u64, slots, balanced: true, lost: false, moe_ns: 0 }))
    }

    fn store(&mut self) -> &mut dyn ExpertStore {
        self.store.as_mut()
    }

    fn store_ref(&self) -> &dyn ExpertStore {
        self.store.as_ref()
    }
}

/// Parameters of the drifting zipf-like load.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftingZipf {
    pub num_layers: usize,
    pub num_logical: usize,
    /// Token-expert assignments per layer and step (tokens x top-k).
    pub tokens_per_step: u64,
    /// Zipf exponent: 0 is uniform; around 1 is typical of real MoE routers.
    pub exponent: f64,
    /// Steps for one ranking of hot experts to give way to the next.
    pub drift_steps: usize,
    /// Relative noise on each expert's count (0.05 = +-5%).
    pub noise: f64,
    pub seed: u64,
}

impl DriftingZipf {
    /// DeepSeek-V3-like defaults for `num_layers` x `num_logical`.
    pub fn new(num_layers: usize, num_logical: usize, seed: u64) -> Self {
        DriftingZipf {
            num_layers,
            num_logical,
            tokens_per_step: 8192 * 8,
            exponent: 1.0,
            drift_steps: 20,
            noise: 0.05,
            seed,
        }
    }

    /// A uniform number in [0, 1) from a hash of `parts`.
    fn unit(&self, parts: [u64; 3]) -> f64 {
        let h = parts.iter().fold(splitmix64(self.seed), |h, &p| splitmix64(h ^ p));
        (h >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Zipf shares of every expert for `layer` under ranking `epoch`: `[num_logical]`, summing to 1.
    fn shares(&self, layer: usize, epoch: u64) -> Vec<f64> {
        let e = self.num_logical;
        // A permutation by sorting experts on a hash of (layer, epoch, expert).
        let mut order: Vec<usize> = (0..e).collect();
        let keys: Vec<u64> = (0..e)
            .map(|x| splitmix64(splitmix64(self.seed ^ ((layer as u64) << 40) ^ (epoch << 20)) ^ x as u64))
            .collect();
        order.sort_by_key(|&x| (keys[x], x));
        let norm: f64 = (0..e).map(|k| 1.0 / ((k + 1) as f64).powf(self.exponent)).sum();
        let mut shares = vec![0.0; e];
        for (k, &x) in order.iter().enumerate() {
            shares[x] = 1.0 / ((k + 1) as f64).powf(self.exponent) / norm;
        }
        shares
    }

    /// The load of step `step`: `weight [num_layers, num_logical]`.
    pub fn step(&self, step: usize) -> Array2<u64> {
        let drift = self.drift_steps.max(1);
        let epoch = (step / drift) as u64;
        let alpha = (step % drift) as f64 / drift as f64;
        let mut w = Array2::<u64>::zeros((self.num_layers, self.num_logical));
        for layer in 0..self.num_layers {
            let now = self.shares(layer, epoch);
            let next = self.shares(layer, epoch + 1);
            for e in 0..self.num_logical {
                let share = (1.0 - alpha) * now[e] + alpha * next[e];
                let noise = 1.0 + self.noise * (2.0 * self.unit([layer as u64, step as u64, e as u64]) - 1.0);
                w[[layer, e]] = (share * noise * self.tokens_per_step as f64).round() as u64;
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_are_skewed_deterministic_and_drift() {
        let z = DriftingZipf::new(3, 64, 7);
        let a = z.step(0);
        assert_eq!(a, z.step(0));
        let row = a.row(0).to_vec();
        let max = *row.iter().max().unwrap() as f64;
        let mean = row.iter().sum::<u64>() as f64 / 64.0;
        assert!(max / mean > 5.0, "hot experts: max/mean {}", max / mean);
        // Totals stay near tokens_per_step.
        let total: u64 = row.iter().sum();
        assert!((total as f64 - z.tokens_per_step as f64).abs() < 0.06 * z.tokens_per_step as f64);
        // After a whole drift period the hottest expert has (almost surely) changed.
        let hot = |w: &Array2<u64>, l: usize| (0..64).max_by_key(|&e| (w[[l, e]], e)).unwrap();
        let b = z.step(z.drift_steps);
        assert!((0..3).any(|l| hot(&a, l) != hot(&b, l)));
        // Layers differ.
        assert_ne!(a.row(0), a.row(1));
    }
}

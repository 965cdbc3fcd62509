//! Watching a run: the seam the `run` loop reports through ([`RunObserver`]), the per-step series
//! of the JSON report ([`SeriesRecorder`]) and the Prometheus endpoint ([`metrics`]).
//!
//! The loop computes and decides; it hands what happened to its observers as plain events and
//! never knows who listens. Observers live on rank 0 only (every number in an event is already
//! global: all-reduced loads, migration statistics over all ranks).

pub mod metrics;

use serde::{Deserialize, Serialize};

/// One step, after the load all-reduce and the manager's decision (rank 0).
#[derive(Debug, Clone, Copy)]
pub struct StepEvent<'a> {
    pub step: usize,
    /// Balancedness (mean GPU load / peak GPU load, mean over layers) of the initial placement
    /// and of the live one on this step's load.
    pub balancedness_static: f64,
    pub balancedness_live: f64,
    /// The same per layer (`[layers]`).
    pub layer_static: &'a [f64],
    pub layer_live: &'a [f64],
}

/// The manager's time on one step: all-reduce, window and decision; with `round`, the step also
/// ran the policy, the selection and the plan agreement.
#[derive(Debug, Clone, Copy)]
pub struct ManagerEvent {
    pub step: usize,
    pub seconds: f64,
    pub round: bool,
}

/// A rebalance round, once its plan is agreed.
#[derive(Debug, Clone, Copy)]
pub struct RoundEvent {
    pub step: usize,
    /// Layers selected for migration (0: the round moved nothing).
    pub layers_selected: usize,
    /// The policy and the selection on this rank.
    pub plan_seconds: f64,
}

/// One layer's migration: committed, or refused by the verification (`wrong_bytes > 0`).
#[derive(Debug, Clone, Copy)]
pub struct LayerEvent {
    pub step: usize,
    pub layer: usize,
    pub experts_moved: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub wrong_bytes: u64,
}

/// What the run loop tells whoever watches it. Every method has an empty default.
pub trait RunObserver {
    fn step(&mut self, _e: &StepEvent) {}
    fn manager(&mut self, _e: &ManagerEvent) {}
    fn round(&mut self, _e: &RoundEvent) {}
    fn layer(&mut self, _e: &LayerEvent) {}
}

/// Most samples a series keeps: when a run reaches this many, pairs of samples merge (the stride
/// doubles), so a days-long run's report stays a few hundred kB (58 layers x 300 samples x 2
/// series) and needs no step count in advance (an engine may not know it).
pub const MAX_SAMPLES: usize = 300;

/// The report's per-step balancedness (`series` in the `run` report; `plot` reads it).
///
/// Sample `i` is the mean over steps `step[i] .. step[i] + stride` (the last sample may hold
/// fewer steps). Values are rounded to 4 decimals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Steps averaged into one sample.
    pub stride: usize,
    /// The first step of each sample (`[samples]`).
    pub step: Vec<usize>,
    /// Mean over layers, `[samples]`.
    pub balancedness_static: Vec<f64>,
    pub balancedness_live: Vec<f64>,
    /// Per layer, `[samples][layers]`.
    pub layer_balancedness_static: Vec<Vec<f64>>,
    pub layer_balancedness_live: Vec<Vec<f64>>,
}

/// One sample being summed: its first step, its steps, and the sums (mean over layers, then
/// per layer; static first, live second).
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    first: usize,
    count: usize,
    sum: [f64; 2],
    layer_sum: [Vec<f64>; 2],
}

impl Sample {
    fn merge(mut self, next: &Sample) -> Sample {
        self.count += next.count;
        for which in 0..2 {
            self.sum[which] += next.sum[which];
            for (a, b) in self.layer_sum[which].iter_mut().zip(&next.layer_sum[which]) {
                *a += b;
            }
        }
        self
    }
}

/// Builds a [`Series`] from step events: full samples are kept as sums, and halved in number
/// (pairs merged, stride doubled) whenever they reach `max_samples`.
#[derive(Debug, Clone)]
pub struct SeriesRecorder {
    max_samples: usize,
    stride: usize,
    samples: Vec<Sample>,
}

impl Default for SeriesRecorder {
    fn default() -> Self {
        SeriesRecorder::with_max(MAX_SAMPLES)
    }
}

impl SeriesRecorder {
    fn with_max(max_samples: usize) -> SeriesRecorder {
        SeriesRecorder { max_samples: max_samples.max(2), stride: 1, samples: Vec::new() }
    }

    /// The series so far, the partial last sample included.
    pub fn series(&self) -> Series {
        let mut s = Series { stride: self.stride, ..Series::default() };
        for sample in &self.samples {
            let n = sample.count as f64;
            let mean = |v: &[f64]| v.iter().map(|x| round4(x / n)).collect::<Vec<_>>();
            s.step.push(sample.first);
            s.balancedness_static.push(round4(sample.sum[0] / n));
            s.balancedness_live.push(round4(sample.sum[1] / n));
            s.layer_balancedness_static.push(mean(&sample.layer_sum[0]));
            s.layer_balancedness_live.push(mean(&sample.layer_sum[1]));
        }
        s
    }
}

impl RunObserver for SeriesRecorder {
    fn step(&mut self, e: &StepEvent) {
        let full = self.samples.last().is_none_or(|s| s.count >= self.stride);
        if full && self.samples.len() == self.max_samples {
            let old = std::mem::take(&mut self.samples);
            self.samples = old.chunks(2).map(|p| p[1..].iter().fold(p[0].clone(), |a, b| a.merge(b))).collect();
            self.stride *= 2;
        }
        if self.samples.last().is_none_or(|s| s.count >= self.stride) {
            self.samples.push(Sample {
                first: e.step,
                count: 0,
                sum: [0.0; 2],
                layer_sum: [vec![0.0; e.layer_static.len()], vec![0.0; e.layer_live.len()]],
            });
        }
        let Some(sample) = self.samples.last_mut() else { return };
        sample.count += 1;
        sample.sum[0] += e.balancedness_static;
        sample.sum[1] += e.balancedness_live;
        for (which, layers) in [e.layer_static, e.layer_live].into_iter().enumerate() {
            for (acc, v) in sample.layer_sum[which].iter_mut().zip(layers) {
                *acc += v;
            }
        }
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(rec: &mut SeriesRecorder, steps: usize) {
        for step in 0..steps {
            let b = step as f64 / 100.0;
            let layers = [b, b / 2.0];
            rec.step(&StepEvent {
                step,
                balancedness_static: b / 2.0,
                balancedness_live: b,
                layer_static: &layers,
                layer_live: &layers,
            });
        }
    }

    #[test]
    fn short_runs_keep_every_step() {
        let mut rec = SeriesRecorder::default();
        feed(&mut rec, 100);
        let s = rec.series();
        assert_eq!((s.stride, s.step.len()), (1, 100));
        assert_eq!((s.step[42], s.balancedness_live[42], s.balancedness_static[42]), (42, 0.42, 0.21));
        assert_eq!(s.layer_balancedness_live[42], vec![0.42, 0.21]);
    }

    #[test]
    fn long_runs_are_averaged_down_with_a_partial_last_sample() {
        let mut rec = SeriesRecorder::with_max(4);
        feed(&mut rec, 10);
        let s = rec.series();
        // 4 samples of 1 step merge into 2 of 2, then 4 of 2 into 2 of 4: steps 0-3, 4-7, 8-9.
        assert_eq!(s.stride, 4);
        assert_eq!(s.step, vec![0, 4, 8]);
        assert_eq!(s.balancedness_live, vec![0.015, 0.055, 0.085]);
        assert_eq!(s.layer_balancedness_static[1], vec![0.055, 0.0275]);
        // A stopped run's series ends where it stopped.
        let mut rec = SeriesRecorder::with_max(4);
        feed(&mut rec, 5);
        assert_eq!((rec.series().step, rec.series().stride), (vec![0, 2, 4], 2));
        assert_eq!(SeriesRecorder::default().series(), Series { stride: 1, ..Series::default() });
        // A long run stays within the bound.
        let mut rec = SeriesRecorder::default();
        feed(&mut rec, 100_000);
        let s = rec.series();
        assert!(s.step.len() <= MAX_SAMPLES && s.step.len() > MAX_SAMPLES / 2 - 1, "{}", s.step.len());
        assert_eq!(s.step[1], s.stride);
    }
}

//! The Manager (xLLM's EPLB Manager): when to rebalance, and which layers to update.
//!
//! Pure functions of all-reduced data, so every rank reaches the same decisions:
//! * a sliding [`Window`] sums the global loads of the last `window_steps` steps;
//! * a round is due every `--eplb-update-interval-steps` steps, or, with the time-based interval,
//!   when the flag that rank 0 sets from its clock comes back set from the all-reduce;
//! * in a round, the policy proposes a placement for the window load, and [`Manager::select`]
//!   keeps the layers that changed, whose load drifted (cosine similarity with the load of the
//!   layer's last update below `threshold`; every layer passes on its first update), and whose
//!   predicted peak GPU load drops by at least `min_improvement`;
//! * the selected layers are queued, best gain first, and at most `layers_per_step` of them are
//!   migrated per step; no new round starts before the queue is empty.

use std::collections::VecDeque;

use ndarray::{Array2, ArrayView2};

use crate::policy::{hash_phy2log, metrics, Placement};

/// When rounds are due.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Interval {
    /// Every N steps (deterministic; for tests and reproducible runs).
    Steps(usize),
    /// Every so many seconds of rank 0's clock, signalled through the load all-reduce.
    Seconds(f64),
}

/// The manager's knobs (xLLM's flags).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ManagerConfig {
    /// `--enable-eplb`: false observes only.
    pub enable: bool,
    pub interval: Interval,
    /// `--eplb-update-threshold`: update a layer only when the cosine similarity of its load with
    /// the load of its last update is below this.
    pub threshold: f64,
    /// `--eplb-layers-per-step`: layers migrated per step; 0 means all at once.
    pub layers_per_step: usize,
    /// `--eplb-min-improvement`: the least relative drop of the layer's peak GPU load.
    pub min_improvement: f64,
    /// `--eplb-window-steps`.
    pub window_steps: usize,
}

/// The sum of the last `steps` global loads, `[layers, num_logical]`.
///
/// The sum is kept with wrapping adds and subtracts: exact whenever the true window sum fits in
/// u64 (the policy rejects a layer whose total does not).
#[derive(Debug, Clone)]
pub struct Window {
    steps: usize,
    ring: VecDeque<Array2<u64>>,
    sum: Array2<u64>,
}

impl Window {
    pub fn new(steps: usize, layers: usize, num_logical: usize) -> Window {
        Window { steps: steps.max(1), ring: VecDeque::new(), sum: Array2::zeros((layers, num_logical)) }
    }

    /// Adds a step's load, dropping the oldest once the window is full.
    pub fn push(&mut self, load: Array2<u64>) {
        self.sum.zip_mut_with(&load, |s, &v| *s = s.wrapping_add(v));
        self.ring.push_back(load);
        if self.ring.len() > self.steps {
            if let Some(old) = self.ring.pop_front() {
                self.sum.zip_mut_with(&old, |s, &v| *s = s.wrapping_sub(v));
            }
        }
    }

    pub fn sum(&self) -> ArrayView2<'_, u64> {
        self.sum.view()
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}

/// Cosine similarity of two load vectors (1 when both are zero, 0 when one is).
pub fn cosine(a: &[u64], b: &[u64]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    match (na > 0.0, nb > 0.0) {
        (false, false) => 1.0,
        (true, true) => dot / (na.sqrt() * nb.sqrt()),
        _ => 0.0,
    }
}

/// One layer to update: its new `phy2log` row and why.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerUpdate {
    pub layer: usize,
    pub new_row: Vec<usize>,
    /// The window load the decision was made on; it becomes the layer's reference once committed.
    pub load: Vec<u64>,
    /// Predicted relative drop of the layer's peak GPU load on `load`.
    pub gain: f64,
    /// Cosine similarity with the reference load (None on the layer's first update).
    pub similarity: Option<f64>,
}

/// The outcome of one round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundDecision {
    /// The layers to update, best gain first.
    pub updates: Vec<LayerUpdate>,
    /// Layers whose proposed row differs from the live one.
    pub changed: usize,
    /// Changed layers skipped because their load is still similar to their reference.
    pub similar: usize,
    /// Changed, drifted layers skipped because the predicted gain is below `min_improvement`.
    pub small_gain: usize,
}

impl RoundDecision {
    /// The hash every rank agrees on before anything moves: the selected layers and their new rows.
    pub fn hash(&self) -> u64 {
        let width = self.updates.first().map_or(0, |u| u.new_row.len()) + 1;
        let table = Array2::from_shape_fn((self.updates.len(), width), |(i, j)| {
            let u = &self.updates[i];
            if j == 0 {
                u.layer
            } else {
                u.new_row[j - 1]
            }
        });
        hash_phy2log(table.view())
    }
}

/// The manager's state: reference loads and the queue of layers still to migrate.
#[derive(Debug, Clone)]
pub struct Manager {
    pub config: ManagerConfig,
    /// `reference[layer]`: the window load when the layer was last updated.
    reference: Vec<Option<Vec<u64>>>,
    queue: VecDeque<LayerUpdate>,
    last_round: Option<usize>,
}

impl Manager {
    pub fn new(config: ManagerConfig, layers: usize) -> Manager {
        Manager { config, reference: vec![None; layers], queue: VecDeque::new(), last_round: None }
    }

    /// Whether a round starts at `step` (0-based, after its load was all-reduced); `time_flag` is
    /// the time-interval flag as it came back from the all-reduce.
    pub fn round_due(&self, step: usize, time_flag: bool) -> bool {
        if !self.config.enable || !self.queue.is_empty() {
            return false;
        }
        match self.config.interval {
            Interval::Steps(n) => step + 1 - self.last_round.map_or(0, |r| r + 1) >= n.max(1),
            Interval::Seconds(_) => time_flag,
        }
    }

    /// Picks the layers of `proposed` to apply, judged on the window load `load` with `live`
    /// the placement now live. Pure: the same inputs give the same decision on every rank.
    pub fn select(
        &self,
        load: ArrayView2<u64>,
        live: &Placement,
        proposed: &Placement,
        slots_per_rank: usize,
        gpus_per_node: usize,
    ) -> RoundDecision {
        let mut d = RoundDecision { updates: Vec::new(), changed: 0, similar: 0, small_gain: 0 };
        for layer in 0..live.num_layers() {
            let (old, new) = (live.phy2log.row(layer), proposed.phy2log.row(layer));
            if old == new {
                continue;
            }
            d.changed += 1;
            let w = load.row(layer).to_vec();
            let similarity = self.reference[layer].as_ref().map(|r| cosine(&w, r));
            if similarity.is_some_and(|s| s >= self.config.threshold) {
                d.similar += 1;
                continue;
            }
            let peak = |row: ndarray::ArrayView1<usize>| {
                metrics::layer_balance(&w, &row.to_vec(), slots_per_rank, gpus_per_node).max_gpu_load
            };
            let (before, after) = (peak(old), peak(new));
            let gain = if before > 0.0 { (before - after) / before } else { 0.0 };
            if gain < self.config.min_improvement {
                d.small_gain += 1;
                continue;
            }
            d.updates.push(LayerUpdate { layer, new_row: new.to_vec(), load: w, gain, similarity });
        }
        d.updates.sort_by(|a, b| b.gain.total_cmp(&a.gain).then(a.layer.cmp(&b.layer)));
        d
    }

    /// Starts the round agreed at `step`: queues its updates.
    pub fn start_round(&mut self, step: usize, decision: RoundDecision) {
        self.last_round = Some(step);
        self.queue.extend(decision.updates);
    }

    /// The layers to migrate this step (at most `layers_per_step`, all when it is 0).
    pub fn next_layers(&mut self) -> Vec<LayerUpdate> {
        let n = if self.config.layers_per_step == 0 { self.queue.len() } else { self.config.layers_per_step };
        let n = n.min(self.queue.len());
        self.queue.drain(..n).collect()
    }

    /// Records that `update` was committed: its load becomes the layer's reference.
    pub fn committed(&mut self, update: &LayerUpdate) {
        self.reference[update.layer] = Some(update.load.clone());
    }

    /// Layers still queued.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{self, PlacementShape, PolicyConfig};

    fn config() -> ManagerConfig {
        ManagerConfig {
            enable: true,
            interval: Interval::Steps(3),
            threshold: 0.8,
            layers_per_step: 1,
            min_improvement: 0.05,
            window_steps: 2,
        }
    }

    #[test]
    fn window_slides() {
        let mut w = Window::new(2, 1, 2);
        w.push(ndarray::arr2(&[[1, 2]]));
        w.push(ndarray::arr2(&[[10, 20]]));
        assert_eq!(w.sum(), ndarray::arr2(&[[11, 22]]));
        w.push(ndarray::arr2(&[[100, 200]]));
        assert_eq!(w.sum(), ndarray::arr2(&[[110, 220]]));
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn cosine_of_known_vectors() {
        assert!((cosine(&[1, 0], &[0, 1])).abs() < 1e-12);
        assert!((cosine(&[3, 4], &[6, 8]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0, 0], &[0, 0]), 1.0);
        assert_eq!(cosine(&[0, 0], &[1, 0]), 0.0);
        assert!((cosine(&[1, 1], &[1, 0]) - 0.5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn rounds_are_due_every_n_steps_and_wait_for_the_queue() {
        let mut m = Manager::new(config(), 2);
        assert!(!m.round_due(0, false) && !m.round_due(1, false) && m.round_due(2, false));
        let u = |layer| LayerUpdate { layer, new_row: vec![0], load: vec![1], gain: 0.5, similarity: None };
        m.start_round(2, RoundDecision { updates: vec![u(0), u(1)], changed: 2, similar: 0, small_gain: 0 });
        assert!(!m.round_due(5, false), "the queue is not empty");
        assert_eq!(m.next_layers().len(), 1);
        assert_eq!(m.next_layers().len(), 1);
        assert!(m.next_layers().is_empty());
        assert!(!m.round_due(4, false) && m.round_due(5, false));
        let timed = Manager::new(ManagerConfig { interval: Interval::Seconds(1.0), ..config() }, 1);
        assert!(!timed.round_due(100, false) && timed.round_due(0, true));
        let off = Manager::new(ManagerConfig { enable: false, ..config() }, 1);
        assert!(!off.round_due(2, true));
    }

    #[test]
    fn select_applies_threshold_and_min_improvement() {
        // 2 layers x 4 experts, 8 slots on 4 GPUs: a hot expert 0 wants replicas.
        let shape = PlacementShape { num_replicas: 8, num_gpus: 4, num_nodes: 1, num_groups: 1 };
        let load = ndarray::arr2(&[[100u64, 10, 10, 10], [100, 10, 10, 10]]);
        let live = Placement::trivial(2, 4, 8);
        let proposed = policy::rebalance(load.view(), &shape, Some(&live), &PolicyConfig::default()).unwrap();
        let mut m = Manager::new(config(), 2);
        let d = m.select(load.view(), &live, &proposed, 2, 4);
        assert_eq!((d.changed, d.updates.len()), (2, 2), "first round: every changed layer updates");
        assert!(d.updates.iter().all(|u| u.gain >= 0.05 && u.similarity.is_none()));
        let h = d.hash();
        assert_eq!(h, d.clone().hash());
        // Once layer 0 was updated on this load, the same load is similar: only layer 1 is left.
        m.committed(&d.updates.iter().find(|u| u.layer == 0).unwrap().clone());
        let d2 = m.select(load.view(), &live, &proposed, 2, 4);
        assert_eq!((d2.similar, d2.updates.len(), d2.updates[0].layer), (1, 1, 1));
        assert_ne!(d2.hash(), h);
        // A drifted load passes the threshold again.
        let drifted = ndarray::arr2(&[[10u64, 10, 10, 100], [100, 10, 10, 10]]);
        let d3 = m.select(drifted.view(), &live, &proposed, 2, 4);
        assert_eq!(d3.similar, 0);
        // With a huge min-improvement nothing is worth moving.
        let strict = Manager::new(ManagerConfig { min_improvement: 0.99, ..config() }, 2);
        let d4 = strict.select(load.view(), &live, &proposed, 2, 4);
        assert_eq!((d4.updates.len(), d4.small_gain), (0, 2));
    }
}

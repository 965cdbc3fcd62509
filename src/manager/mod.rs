//! The Manager (xLLM's EPLB Manager): when to rebalance, which layers, and how much to move.
//!
//! Pure functions of all-reduced data and flags, so every rank reaches the same decisions at the
//! same step. Two modes:
//!
//! * **Time** (the default, [`TimeMode`]): decisions in units of time ([`cost`]). Every step the load goes into
//!   a bank of moving averages and the one that has predicted the next step best is the estimate
//!   of the coming load ([`estimate`]). Layers are ranked by how far their live PAR (peak over
//!   mean GPU load) on the estimate is above what any placement could reach; the top ones are
//!   planned by the policy, whose price of a moved copy is the copy's time over the change's
//!   expected lifetime; a plan is applied when the time it saves over that lifetime exceeds the
//!   time its changed slots cost. The plan is made on the average of one half of the steps (the
//!   even or the odd ones, alternating every step) and its saving is measured on the other half:
//!   a plan fitted to the sampling noise of the loads it saw saves nothing on loads it did not
//!   see, so noise does not pass for gain. At most `layers_per_step` layers switch a step; a plan
//!   decided with the loads of steps up to t serves step t + 1.
//! * **Rounds** (xLLM's, [`RoundsMode`], when any of its round flags is given): a sliding [`Window`] sums the last
//!   `window_steps` loads; a round is due every `--eplb-update-interval-steps` steps, or when the
//!   flag rank 0 sets from its clock comes back set from the all-reduce; in a round the policy
//!   proposes a placement for the window load, and [`RoundsMode::select`] keeps the layers that
//!   changed, whose load drifted (cosine similarity with the load of the layer's last update below
//!   `threshold`; every layer passes on its first update), and whose predicted peak GPU load drops
//!   by at least `min_improvement`; the layers are queued, best gain first, and at most
//!   `layers_per_step` of them migrate a step; no new round starts before the queue is empty.
//!
//! Determinism: loads, estimates, PAR and gains are integers (PAR and gains in Q32). The one
//! floating-point step left is the rounds mode's cosine similarity: its sums are exact integers,
//! then one correctly rounded IEEE-754 division and square root (Rust never contracts or
//! reorders them), so the same all-reduced loads give the same bits on every rank. The price of a
//! moved copy crosses to the policy as an integer ([`crate::policy::Price`]).
//!
//! The two modes are types behind [`ManagerMode`]; [`Manager::new`] picks one from [`Mode`] (the
//! one place the mode is matched), and the [`Controller`] drives the manager for `run` and
//! `simulate` alike. `run`'s load and panic faults (tests) are a decorator around the mode
//! ([`fault`]), never a branch in a mode or in the loop.

pub mod args;
pub mod controller;
pub mod cost;
pub mod estimate;
pub mod fault;
mod rounds;
mod time;

use std::collections::VecDeque;

use ndarray::{Array2, ArrayView2};

pub use args::ManagerArgs;
pub use controller::{Agreed, Clock, Controller};
pub use cost::CostModel;
use cost::RunningMean;
pub use rounds::RoundsMode;
pub use time::TimeMode;

use crate::policy::{hash_phy2log, Placement, PlacementShape, Policy, PolicyConfig, PolicyError, Price};

/// When rounds are due.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Interval {
    /// Every N steps (deterministic; for tests and reproducible runs).
    Steps(usize),
    /// Every so many seconds of rank 0's clock, signalled through the load all-reduce.
    Seconds(f64),
}

/// xLLM's round-based manager.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rounds {
    pub interval: Interval,
    /// `--eplb-update-threshold`: update a layer only when the cosine similarity of its load with
    /// the load of its last update is below this.
    pub threshold: f64,
    /// `--eplb-min-improvement`: the least relative drop of the layer's peak GPU load.
    pub min_improvement: f64,
    /// `--eplb-window-steps`.
    pub window_steps: usize,
}

/// How the manager decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Decisions in units of time, every step (the default).
    Time,
    /// xLLM's rounds.
    Rounds(Rounds),
}

/// The manager's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ManagerConfig {
    /// `--enable-eplb`: false observes only.
    pub enable: bool,
    /// `--eplb-layers-per-step`: layers switched per step; 0 means all at once.
    pub layers_per_step: usize,
    pub mode: Mode,
    /// `--step-ms`, `--expert-bytes`, `--migration-gbps`.
    pub cost: CostModel,
    /// `--move-cost`: a fixed price per copy instead of the cost model's.
    pub move_cost: Option<f64>,
    /// Which inputs of the cost model `run` measures (those not given as flags).
    pub measure: Measure,
}

/// The cost model's inputs that are measured while the job runs instead of given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Measure {
    /// The balanced step time, from the MoE times the engine reports (no `--step-ms`).
    pub step_time: bool,
    /// The time a changed slot costs, from the executor's migrations (`--measure-migration`).
    pub migration: bool,
}

impl ManagerConfig {
    /// One line for headers: the mode and its settings.
    pub fn describe(&self) -> String {
        let lps = if self.layers_per_step == 0 { "all".to_string() } else { self.layers_per_step.to_string() };
        let price = self.move_cost.map_or(String::new(), |m| format!(", move cost {m}"));
        match self.mode {
            Mode::Time => format!(
                "enable_eplb {}, decisions in time (step {:.3} ms a layer, {:.3} us a changed slot), layers a step {lps}{price}",
                self.enable,
                self.cost.layer_step_ps as f64 / 1e9,
                self.cost.copy_ps as f64 / 1e6
            ),
            Mode::Rounds(r) => {
                let interval = match r.interval {
                    Interval::Steps(n) => format!("every {n} steps"),
                    Interval::Seconds(s) => format!("every {s} s (rank 0's clock)"),
                };
                format!(
                    "enable_eplb {}, update {interval}, threshold {}, layers a step {lps}, min improvement {}, window {} steps{price}",
                    self.enable, r.threshold, r.min_improvement, r.window_steps
                )
            }
        }
    }
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
///
/// Each vector is first right-shifted by the same amount for all of its entries, just enough that
/// every entry is below 2^26; the dot product and the norms are then exact `u128` sums (so the
/// order of summation cannot matter), and the result is one IEEE division of one square root.
pub fn cosine(a: &[u64], b: &[u64]) -> f64 {
    let shift = |v: &[u64]| (64 - v.iter().copied().max().unwrap_or(0).leading_zeros()).saturating_sub(26);
    let (sa, sb) = (shift(a), shift(b));
    let (mut dot, mut na, mut nb) = (0u128, 0u128, 0u128);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = ((x >> sa) as u128, (y >> sb) as u128);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    match (na > 0, nb > 0) {
        (false, false) => 1.0,
        (true, true) => dot as f64 / ((na as f64) * (nb as f64)).sqrt(),
        _ => 0.0,
    }
}

/// The cost model's inputs now (see [`Manager::cost_inputs`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CostInputs {
    pub step_ms: f64,
    /// Measured steps behind `step_ms` (0: `--step-ms` or the default).
    pub step_samples: u64,
    pub migration_gbps: f64,
    /// Measured migrations behind `migration_gbps` (0: `--migration-gbps` or the default).
    pub migration_samples: u64,
}

/// One layer to update: its new `phy2log` row and why.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerUpdate {
    pub layer: usize,
    pub new_row: Vec<usize>,
    /// The load the decision was made on; in rounds it becomes the layer's reference once committed.
    pub load: Vec<u64>,
    /// Predicted relative drop of the layer's peak GPU load on `load` (reports only).
    pub gain: f64,
    /// Cosine similarity with the reference load (rounds; None on the layer's first update).
    pub similarity: Option<f64>,
    /// What the decision is ranked by: rounds, the relative peak drop in Q32; time, the net
    /// picoseconds saved.
    pub rank: i128,
}

/// What a decision is, for the reports: the loop and `simulate` never ask the manager's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionKind {
    /// A round of the rounds mode: reported (and timed as a round) even when it selects nothing.
    Round,
    /// A step of the time mode (one every step, so that the ranks agree at every step): reported
    /// only when it switches layers.
    Step,
}

/// The result of deciding at a step: `Ok(None)` when there is no decision this step, else the
/// decision, or the policy's error; the one type of [`ManagerMode::decide`] and [`Manager::decide`].
pub type Decided = Result<Option<RoundDecision>, PolicyError>;

/// The outcome of one decision (a round, or a step of the time mode).
#[derive(Debug, Clone, PartialEq)]
pub struct RoundDecision {
    /// The layers to update, best first.
    pub updates: Vec<LayerUpdate>,
    /// Layers whose proposed row differs from the live one.
    pub changed: usize,
    /// Changed layers skipped because their load is still similar to their reference (rounds).
    pub similar: usize,
    /// Changed layers skipped because the gain does not pay (below `min_improvement`, or, in
    /// time, less time saved than the move costs).
    pub small_gain: usize,
    pub kind: DecisionKind,
}

impl RoundDecision {
    fn empty(kind: DecisionKind) -> RoundDecision {
        RoundDecision { updates: Vec::new(), changed: 0, similar: 0, small_gain: 0, kind }
    }

    /// Whether nothing is to be reported: a step of the time mode that switches no layer.
    pub fn is_quiet(&self) -> bool {
        self.kind == DecisionKind::Step && self.updates.is_empty()
    }

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

/// What the manager's two modes do differently, behind one interface: [`TimeMode`] and
/// [`RoundsMode`]. The [`Manager`] holds one, built from [`Mode`] in [`Manager::new`], the one
/// place the mode is matched; the loop of `run` and `simulate` never ask which it is.
pub trait ManagerMode: Send + std::fmt::Debug {
    /// Takes one step's global load `[layers, num_logical]` (the same on every rank).
    fn observe(&mut self, load: Array2<u64>);

    /// The decision at `step` (see [`Manager::decide`]); `plan` is what the mode may use of the
    /// manager: the policy, the shape, the cost model and the queue.
    fn decide(&mut self, plan: &Planner<'_>, step: usize, time_flag: bool, live: &Placement) -> Decided;

    /// The decision agreed at `step` was accepted.
    fn accepted(&mut self, _step: usize) {}

    /// `update` was committed.
    fn committed(&mut self, update: &LayerUpdate);

    /// Seconds between rounds on rank 0's clock, where the mode keeps such an interval (the
    /// time flag piggybacked on the load all-reduce).
    fn interval_seconds(&self) -> Option<f64> {
        None
    }

    /// The steps the load estimate now used holds (time mode), 0 where there is none.
    fn estimate_memory(&self) -> usize {
        0
    }
}

/// What a mode may use of the [`Manager`] when it decides.
pub struct Planner<'a> {
    pub config: &'a ManagerConfig,
    pub shape: PlacementShape,
    /// The policy, through its trait only.
    pub policy: &'a dyn Policy,
    /// Policy worker threads over layers (the result never depends on it).
    pub threads: usize,
    /// The policy's price of a moved copy when the mode sets none (`--move-cost` or the default).
    pub price: Price,
    /// Layers in the model.
    pub layers: usize,
    /// Layers still queued from the last decision: no new one while any is.
    pub queued: usize,
}

impl Planner<'_> {
    /// Layers switched a step, at least 1 (0 means all of them).
    pub fn per_step(&self) -> usize {
        match self.config.layers_per_step {
            0 => self.layers.max(1),
            n => n,
        }
    }
}

/// The manager's state: the mode's own state, the queue of layers to switch, the measured
/// inputs of the cost model, and the policy it plans with.
#[derive(Debug)]
pub struct Manager {
    pub config: ManagerConfig,
    shape: PlacementShape,
    layers: usize,
    mode: Box<dyn ManagerMode>,
    policy: Box<dyn Policy>,
    policy_config: PolicyConfig,
    queue: VecDeque<LayerUpdate>,
    /// The measured balanced step time (ns) and time of a changed slot (ns), when measured.
    step_ns: RunningMean,
    slot_ns: RunningMean,
}

impl Manager {
    /// A manager for `layers` layers of `num_logical` experts on `shape`, planning with `policy`.
    pub fn new(
        config: ManagerConfig,
        policy: PolicyConfig,
        shape: PlacementShape,
        layers: usize,
        num_logical: usize,
    ) -> Manager {
        let mode: Box<dyn ManagerMode> = match config.mode {
            Mode::Time => Box::new(TimeMode::new(config.move_cost, layers, num_logical)),
            Mode::Rounds(r) => Box::new(RoundsMode::new(r, config.move_cost, shape, layers, num_logical)),
        };
        Manager {
            config,
            shape,
            layers,
            mode,
            policy: policy.kind.make(),
            policy_config: policy,
            queue: VecDeque::new(),
            step_ns: RunningMean::default(),
            slot_ns: RunningMean::default(),
        }
    }

    /// A step's balanced MoE time in ns (all layers), measured and agreed by every rank: when
    /// the step time is measured, the cost model takes the running mean.
    pub fn observe_step_time(&mut self, balanced_ns: u64) {
        if !self.config.measure.step_time || balanced_ns == 0 {
            return;
        }
        self.step_ns.add(balanced_ns);
        let layers = self.layers.max(1) as u64;
        if let Some(ns) = self.step_ns.mean() {
            self.config.cost.layer_step_ps = (ns.saturating_mul(1000) / layers).max(1);
        }
    }

    /// A committed migration: `changed` slots changed in `wall_ns` (the slowest rank's transfer
    /// time, agreed by every rank). When migrations are measured, a changed slot costs the
    /// running mean of `wall_ns / changed`: the modeled cost of a change is the time it took.
    pub fn observe_migration(&mut self, changed: u64, wall_ns: u64) {
        if !self.config.measure.migration || changed == 0 || wall_ns == 0 {
            return;
        }
        self.slot_ns.add(wall_ns / changed);
        if let Some(ns) = self.slot_ns.mean() {
            self.config.cost.copy_ps = ns.saturating_mul(1000).max(1);
        }
    }

    /// The cost model's inputs as they stand: (balanced step ms, migration GB/s of one expert
    /// of `expert_bytes`), and how many samples each measured one holds (0: a flag or default).
    pub fn cost_inputs(&self, expert_bytes: u64) -> CostInputs {
        let c = &self.config.cost;
        CostInputs {
            step_ms: c.layer_step_ps as f64 * self.layers.max(1) as f64 / 1e9,
            step_samples: self.step_ns.samples(),
            migration_gbps: expert_bytes as f64 * 1e3 / c.copy_ps.max(1) as f64,
            migration_samples: self.slot_ns.samples(),
        }
    }

    /// Takes one step's global load `[layers, num_logical]` (all-reduced: the same on every rank).
    pub fn observe(&mut self, load: Array2<u64>) {
        self.mode.observe(load);
    }

    /// The decision at `step`, after its load was observed: None when there is none this step
    /// (observe only, a round not due, migrations still queued); otherwise the decision every rank
    /// agrees on (by its hash) before [`Manager::accept`]. In time mode there is one every step,
    /// often without updates, so that the ranks' agreement is a collective call at every step.
    /// `time_flag`: the time-interval flag as it came back from the all-reduce.
    pub fn decide(&mut self, step: usize, time_flag: bool, live: &Placement) -> Decided {
        if !self.config.enable {
            return Ok(None);
        }
        let plan = Planner {
            config: &self.config,
            shape: self.shape,
            policy: self.policy.as_ref(),
            threads: self.policy_config.threads,
            price: self.policy_config.move_cost,
            layers: self.layers,
            queued: self.queue.len(),
        };
        self.mode.decide(&plan, step, time_flag, live)
    }

    /// Seconds between rounds on rank 0's clock, where the mode keeps such an interval.
    pub fn interval_seconds(&self) -> Option<f64> {
        self.mode.interval_seconds()
    }

    /// Accepts the decision agreed at `step`: queues its updates.
    pub fn accept(&mut self, step: usize, decision: RoundDecision) {
        self.mode.accepted(step);
        self.queue.extend(decision.updates);
    }

    /// The layers to migrate this step (at most `layers_per_step`, all when it is 0).
    pub fn next_layers(&mut self) -> Vec<LayerUpdate> {
        let n = if self.config.layers_per_step == 0 { self.queue.len() } else { self.config.layers_per_step };
        let n = n.min(self.queue.len());
        self.queue.drain(..n).collect()
    }

    /// Records that `update` was committed.
    pub fn committed(&mut self, update: &LayerUpdate) {
        self.mode.committed(update);
    }

    /// Layers still queued.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// The steps the load estimate now used holds (time mode): its memory `2^k`, or fewer
    /// while it warms up after a jump.
    pub fn estimate_memory(&self) -> usize {
        self.mode.estimate_memory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::cost::{par_q32, PAR_ONE};
    use crate::policy::{self, PlacementShape, PolicyConfig};

    fn shape() -> PlacementShape {
        PlacementShape { num_replicas: 8, num_gpus: 4, num_nodes: 1, num_groups: 1 }
    }

    fn config() -> ManagerConfig {
        ManagerConfig {
            enable: true,
            layers_per_step: 1,
            mode: Mode::Rounds(Rounds {
                interval: Interval::Steps(3),
                threshold: 0.8,
                min_improvement: 0.05,
                window_steps: 2,
            }),
            cost: CostModel::new(14.6484375, 2, 88_080_384, 900.0),
            move_cost: None,
            measure: Default::default(),
        }
    }

    /// A manager planning with the default policy on one thread.
    fn manager(c: ManagerConfig, shape: PlacementShape, layers: usize, num_logical: usize) -> Manager {
        Manager::new(c, PolicyConfig { threads: 1, ..Default::default() }, shape, layers, num_logical)
    }

    fn rounds(c: &ManagerConfig) -> Rounds {
        match c.mode {
            Mode::Rounds(r) => r,
            Mode::Time => unreachable!(),
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
        // Huge loads do not overflow, and scale does not matter.
        let big = [u64::MAX / 3, u64::MAX / 5, 7];
        assert!((cosine(&big, &[3 << 20, 2 << 20, 0]) - cosine(&[5, 3, 0], &[3, 2, 0])).abs() < 1e-3);
    }

    #[test]
    fn rounds_are_due_every_n_steps_and_wait_for_the_queue() {
        let c = config();
        let r = rounds(&c);
        let mut mode = RoundsMode::new(r, None, shape(), 2, 4);
        assert!(!mode.round_due(0, false, 0) && !mode.round_due(1, false, 0) && mode.round_due(2, false, 0));
        mode.accepted(2);
        assert!(!mode.round_due(5, false, 1), "the queue is not empty");
        assert!(!mode.round_due(4, false, 0) && mode.round_due(5, false, 0));
        assert_eq!(mode.interval_seconds(), None);
        // The manager queues an accepted round and drains it a layer a step; no round meanwhile.
        let mut m = manager(c, shape(), 2, 4);
        let u = |layer| LayerUpdate { layer, new_row: vec![0], load: vec![1], gain: 0.5, similarity: None, rank: 1 };
        let round = RoundDecision {
            updates: vec![u(0), u(1)],
            changed: 2,
            similar: 0,
            small_gain: 0,
            kind: DecisionKind::Round,
        };
        m.accept(2, round);
        let live = Placement::trivial(2, 4, 8);
        m.observe(ndarray::arr2(&[[100, 1, 1, 1], [100, 1, 1, 1]]));
        assert_eq!(m.decide(5, false, &live).unwrap(), None, "the queue is not empty");
        assert_eq!(m.next_layers().len(), 1);
        assert_eq!(m.next_layers().len(), 1);
        assert!(m.next_layers().is_empty());
        assert!(m.decide(5, false, &live).unwrap().is_some_and(|d| d.kind == DecisionKind::Round));
        let timed = Rounds { interval: Interval::Seconds(1.0), ..r };
        let t = RoundsMode::new(timed, None, shape(), 1, 4);
        assert!(!t.round_due(100, false, 0) && t.round_due(0, true, 0));
        assert_eq!(t.interval_seconds(), Some(1.0));
        let mut off = manager(ManagerConfig { enable: false, ..c }, shape(), 1, 4);
        off.observe(ndarray::arr2(&[[1, 2, 3, 4]]));
        let live = Placement::trivial(1, 4, 8);
        assert_eq!(off.decide(2, true, &live).unwrap(), None);
    }

    #[test]
    fn select_applies_threshold_and_min_improvement() {
        // 2 layers x 4 experts, 8 slots on 4 GPUs: a hot expert 0 wants replicas.
        let load = ndarray::arr2(&[[100u64, 10, 10, 10], [100, 10, 10, 10]]);
        let live = Placement::trivial(2, 4, 8);
        let proposed = policy::rebalance(load.view(), &shape(), Some(&live), &PolicyConfig::default()).unwrap();
        let mut m = RoundsMode::new(rounds(&config()), None, shape(), 2, 4);
        let d = m.select(load.view(), &live, &proposed);
        assert_eq!((d.changed, d.updates.len()), (2, 2), "first round: every changed layer updates");
        assert!(d.updates.iter().all(|u| u.gain >= 0.05 && u.similarity.is_none()));
        let h = d.hash();
        assert_eq!(h, d.clone().hash());
        // Once layer 0 was updated on this load, the same load is similar: only layer 1 is left.
        m.committed(&d.updates.iter().find(|u| u.layer == 0).unwrap().clone());
        let d2 = m.select(load.view(), &live, &proposed);
        assert_eq!((d2.similar, d2.updates.len(), d2.updates[0].layer), (1, 1, 1));
        assert_ne!(d2.hash(), h);
        // A drifted load passes the threshold again.
        let drifted = ndarray::arr2(&[[10u64, 10, 10, 100], [100, 10, 10, 10]]);
        let d3 = m.select(drifted.view(), &live, &proposed);
        assert_eq!(d3.similar, 0);
        // With a huge min-improvement nothing is worth moving.
        let strict_rounds = Rounds { min_improvement: 0.99, ..rounds(&config()) };
        let strict = RoundsMode::new(strict_rounds, None, shape(), 2, 4);
        let d4 = strict.select(load.view(), &live, &proposed);
        assert_eq!((d4.updates.len(), d4.small_gain), (0, 2));
    }

    fn time_config(move_cost: Option<f64>) -> ManagerConfig {
        ManagerConfig { mode: Mode::Time, move_cost, ..config() }
    }

    /// Feeds `load` for `steps` steps through a time-mode manager, applying its decisions.
    fn drive(m: &mut Manager, live: &mut Placement, load: &Array2<u64>, steps: std::ops::Range<usize>) -> usize {
        let mut switched = 0;
        for step in steps {
            m.observe(load.clone());
            let d = m.decide(step, false, live).unwrap().unwrap();
            m.accept(step, d);
            for u in m.next_layers() {
                live.phy2log.row_mut(u.layer).assign(&ndarray::ArrayView1::from(&u.new_row));
                m.committed(&u);
                switched += 1;
            }
            *live = Placement::from_phy2log(live.phy2log.clone(), live.num_logical()).unwrap();
        }
        switched
    }

    #[test]
    fn time_mode_balances_one_layer_a_step_then_rests() {
        let load = ndarray::arr2(&[[100u64, 10, 10, 10], [10, 10, 100, 10]]);
        let mut live = Placement::trivial(2, 4, 8);
        let mut m = manager(time_config(None), shape(), 2, 4);
        // At step 0 the odd steps' half holds nothing yet to judge a plan on.
        assert_eq!(drive(&mut m, &mut live, &load, 0..1), 0, "nothing to judge on yet");
        assert_eq!(drive(&mut m, &mut live, &load, 1..2), 1, "one layer a step");
        assert_eq!(drive(&mut m, &mut live, &load, 2..3), 1);
        for l in 0..2 {
            let par = par_q32(&load.row(l).to_vec(), &live.phy2log.row(l).to_vec(), 2);
            assert!(par < PAR_ONE + PAR_ONE / 5, "layer {l}: PAR {}", par as f64 / PAR_ONE as f64);
        }
        // Balanced on a steady load: nothing more moves.
        assert_eq!(drive(&mut m, &mut live, &load, 3..40), 0);
    }

    #[test]
    fn time_mode_does_not_chase_sampling_noise() {
        // 2 layers x 16 experts, 20 slots on 4 GPUs; every step 512 tokens a layer drawn from one
        // fixed skewed distribution (a multinomial sample, LCG-seeded): the load never changes,
        // only its noise does. Once balanced, a layer is seldom worth moving again.
        let shape = PlacementShape { num_replicas: 20, num_gpus: 4, num_nodes: 1, num_groups: 1 };
        let weights: Vec<u64> = (0..16).map(|e| 64 / (e + 1) + 2).collect();
        let total: u64 = weights.iter().sum();
        let mut seed = 12345u64;
        let mut sample = || {
            let mut load = Array2::<u64>::zeros((2, 16));
            for l in 0..2 {
                for _ in 0..512 {
                    let mut r = (crate::engine::lcg64(&mut seed) >> 33) % total;
                    let mut e = 0;
                    while r >= weights[e] {
                        r -= weights[e];
                        e += 1;
                    }
                    load[[l, (e + 5 * l) % 16]] += 1;
                }
            }
            load
        };
        let mut live = Placement::trivial(2, 16, 20);
        let mut m = manager(time_config(None), shape, 2, 16);
        let mut settled = 0;
        for step in 0..600 {
            let switched = drive(&mut m, &mut live, &sample(), step..step + 1);
            if step >= 100 {
                settled += switched;
            }
        }
        // Planned and judged on the whole estimate, the same manager switches 134 times here; on
        // one half judged on the other, 19 (a plan still passes when the halves' noise agrees).
        assert!(settled <= 40, "{settled} layer switches in 500 steps of a steady load");
    }

    #[test]
    fn time_mode_does_not_move_what_does_not_pay() {
        // A price per copy above any possible gain: nothing moves.
        let load = ndarray::arr2(&[[100u64, 10, 10, 10], [10, 10, 100, 10]]);
        let mut live = Placement::trivial(2, 4, 8);
        let mut m = manager(time_config(Some(10.0)), shape(), 2, 4);
        assert_eq!(drive(&mut m, &mut live, &load, 0..20), 0);
        // The cost model: a copy that costs more than a whole life of imbalance does not move.
        let slow = ManagerConfig { cost: CostModel::new(0.001, 2, 1 << 30, 0.001), ..time_config(None) };
        let mut m = manager(slow, shape(), 2, 4);
        let mut live = Placement::trivial(2, 4, 8);
        assert_eq!(drive(&mut m, &mut live, &load, 0..20), 0);
    }

    #[test]
    fn measured_inputs_change_the_cost_model_only_when_measured() {
        let given = time_config(None);
        let mut m = manager(given, shape(), 2, 4);
        m.observe_step_time(4_000_000);
        m.observe_migration(10, 1_000_000);
        assert_eq!(m.config.cost, given.cost, "flags given: nothing measured changes them");
        let measured = ManagerConfig { measure: Measure { step_time: true, migration: true }, ..given };
        let mut m = manager(measured, shape(), 2, 4);
        m.observe_step_time(4_000_000);
        m.observe_step_time(0); // not measured: ignored
        m.observe_migration(10, 1_000_000);
        // 4 ms a step over 2 layers; 1 ms over 10 changed slots.
        assert_eq!((m.config.cost.layer_step_ps, m.config.cost.copy_ps), (2_000_000_000, 100_000_000));
        let c = m.cost_inputs(1_000_000);
        assert_eq!((c.step_ms, c.step_samples, c.migration_samples), (4.0, 1, 1));
        assert!((c.migration_gbps - 10.0).abs() < 1e-9, "1 MB in 100 us: {c:?}");
    }

    #[test]
    fn time_mode_follows_a_jump() {
        let a = ndarray::arr2(&[[100u64, 10, 10, 10], [100, 10, 10, 10]]);
        let b = ndarray::arr2(&[[10u64, 10, 10, 100], [10, 100, 10, 10]]);
        let mut live = Placement::trivial(2, 4, 8);
        let mut m = manager(time_config(None), shape(), 2, 4);
        drive(&mut m, &mut live, &a, 0..300);
        let long = m.estimate_memory();
        assert!(long >= 16, "a steady load wants a long memory: {long}");
        drive(&mut m, &mut live, &b, 300..320);
        assert!(m.estimate_memory() < long, "after the jump a shorter memory");
        for l in 0..2 {
            let par = par_q32(&b.row(l).to_vec(), &live.phy2log.row(l).to_vec(), 2);
            assert!(par < PAR_ONE + PAR_ONE / 5, "layer {l} not rebalanced after the jump");
        }
    }
}

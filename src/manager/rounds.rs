//! The rounds mode (xLLM's): a sliding window of load, a round every N steps or every so many
//! seconds of rank 0's clock, and [`RoundsMode::select`] (see the [module documentation](super)).

use ndarray::{Array2, ArrayView2};

use super::cost::PAR_ONE;
use super::{
    cosine, Decided, DecisionKind, Interval, LayerUpdate, ManagerMode, Planner, RoundDecision, Rounds, Window,
};
use crate::policy::{self, metrics, Placement, PlacementShape, Price};

/// The rounds mode's state.
#[derive(Debug, Clone)]
pub struct RoundsMode {
    rounds: Rounds,
    shape: PlacementShape,
    /// `--move-cost`, when given (the policy's price otherwise), as the integer price once.
    price: Option<Price>,
    window: Window,
    /// `reference[layer]`: the window load when the layer was last updated.
    reference: Vec<Option<Vec<u64>>>,
    last_round: Option<usize>,
}

impl RoundsMode {
    /// The rounds mode for `layers` layers of `num_logical` experts on `shape`; `move_cost`:
    /// `--move-cost`, rounded once to an integer price.
    pub fn new(
        rounds: Rounds,
        move_cost: Option<f64>,
        shape: PlacementShape,
        layers: usize,
        num_logical: usize,
    ) -> RoundsMode {
        RoundsMode {
            rounds,
            shape,
            price: move_cost.map(Price::from_fraction),
            window: Window::new(rounds.window_steps, layers, num_logical),
            reference: vec![None; layers],
            last_round: None,
        }
    }

    /// Whether a round is due at `step`: the queue is empty and the interval has passed.
    pub fn round_due(&self, step: usize, time_flag: bool, queued: usize) -> bool {
        if queued > 0 {
            return false;
        }
        match self.rounds.interval {
            Interval::Steps(n) => step + 1 - self.last_round.map_or(0, |r| r + 1) >= n.max(1),
            Interval::Seconds(_) => time_flag,
        }
    }

    /// Picks the layers of `proposed` to apply, judged on the window load `load` with `live` the
    /// placement now live. Pure: the same inputs give the same decision on every rank.
    pub fn select(&self, load: ArrayView2<u64>, live: &Placement, proposed: &Placement) -> RoundDecision {
        let r = self.rounds;
        let spr = self.shape.slots_per_rank();
        let min_q32 = (r.min_improvement * PAR_ONE as f64).round() as u128;
        let mut d = RoundDecision::empty(DecisionKind::Round);
        for layer in 0..live.num_layers() {
            let (old, new) = (live.phy2log.row(layer), proposed.phy2log.row(layer));
            if old == new {
                continue;
            }
            d.changed += 1;
            let w = load.row(layer).to_vec();
            let similarity = self.reference[layer].as_ref().map(|r| cosine(&w, r));
            if similarity.is_some_and(|s| s >= r.threshold) {
                d.similar += 1;
                continue;
            }
            // The relative drop of the peak GPU load, exact: (before - after) / before in Q32.
            let peak = |row: ndarray::ArrayView1<usize>| {
                let w = policy::fixed::normalized(&w).into_owned();
                let row = row.to_vec();
                let logcnt = metrics::logcnt_of(&row, w.len());
                metrics::gpu_loads(&w, &row, &logcnt, spr).into_iter().max().unwrap_or(0) as u128
            };
            let (before, after) = (peak(old), peak(new));
            let drop_q32 = if before > 0 && after < before { ((before - after) << 32) / before } else { 0 };
            // A negative min-improvement applies every changed layer (DeepSeek's cadence baselines).
            if r.min_improvement >= 0.0 && (drop_q32 < min_q32 || (min_q32 == 0 && after > before)) {
                d.small_gain += 1;
                continue;
            }
            let gain = drop_q32 as f64 / PAR_ONE as f64;
            d.updates.push(LayerUpdate {
                layer,
                new_row: new.to_vec(),
                load: w,
                gain,
                similarity,
                rank: drop_q32 as i128,
            });
        }
        d.updates.sort_by(|a, b| b.rank.cmp(&a.rank).then(a.layer.cmp(&b.layer)));
        d
    }
}

impl ManagerMode for RoundsMode {
    fn observe(&mut self, load: Array2<u64>) {
        self.window.push(load);
    }

    fn decide(&mut self, plan: &Planner<'_>, step: usize, time_flag: bool, live: &Placement) -> Decided {
        if !self.round_due(step, time_flag, plan.queued) {
            return Ok(None);
        }
        let load = self.window.sum().to_owned();
        let price = self.price.unwrap_or(plan.price);
        let proposed = plan.policy.place(load.view(), &self.shape, Some(live), price, plan.threads, &|| {})?;
        Ok(Some(self.select(load.view(), live, &proposed)))
    }

    fn accepted(&mut self, step: usize) {
        self.last_round = Some(step);
    }

    fn committed(&mut self, update: &LayerUpdate) {
        self.reference[update.layer] = Some(update.load.clone());
    }

    fn interval_seconds(&self) -> Option<f64> {
        match self.rounds.interval {
            Interval::Seconds(s) => Some(s),
            Interval::Steps(_) => None,
        }
    }
}

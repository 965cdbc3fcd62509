//! The time mode (the default): decisions in units of time, every step (see the
//! [module documentation](super)).

use ndarray::Array2;

use super::cost::{changed_slots, par_lower_bound_q32, par_q32, PAR_ONE};
use super::estimate::Estimator;
use super::{Decided, DecisionKind, LayerUpdate, ManagerMode, Planner, RoundDecision};
use crate::policy::{self, Placement, Price};

/// A layer whose last plan moved nothing or did not pay: it is planned again once its gap grew
/// or it waited, or at the next step when `retry` (its plan on one half of the steps did not pay
/// on the other: the other half gets its turn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rejected {
    gap: u64,
    step: usize,
    retry: bool,
}

/// The time mode's state.
#[derive(Debug, Clone)]
pub struct TimeMode {
    /// `--move-cost` in Q32 PAR units, when given (the cost model's price otherwise).
    fixed_price_q32: Option<u64>,
    estimator: Estimator,
    /// Layers whose last plan moved nothing or did not pay.
    rejected: Vec<Option<Rejected>>,
}

impl TimeMode {
    /// The time mode for `layers` layers of `num_logical` experts; `move_cost`: `--move-cost`,
    /// rounded once to Q32.
    pub fn new(move_cost: Option<f64>, layers: usize, num_logical: usize) -> TimeMode {
        TimeMode {
            fixed_price_q32: move_cost.map(|m| (m * PAR_ONE as f64).round().min(u64::MAX as f64) as u64),
            estimator: Estimator::new(layers, num_logical),
            rejected: vec![None; layers],
        }
    }

    /// The expected lifetime of a change, in steps: twice the steps the best estimate holds (the
    /// load has been steady over about that long; after a jump, the steps since), at least the
    /// steps it takes to switch every layer once, at most 1024; at least the policy's
    /// [`Policy::min_lifetime`](crate::policy::Policy::min_lifetime).
    pub fn lifetime(&self, plan: &Planner<'_>) -> u64 {
        let sweep = plan.layers.div_ceil(plan.per_step()) as u64;
        (2 * self.estimator.memory()).clamp(sweep.max(1), 1024.max(sweep)).max(plan.policy.min_lifetime())
    }

    /// The price of one moved copy in Q32 PAR units: `--move-cost`, or the cost model's.
    fn price_q32(&self, plan: &Planner<'_>, lifetime: u64) -> u64 {
        match self.fixed_price_q32 {
            Some(q32) => q32,
            None => {
                let c = &plan.config.cost;
                u64::try_from(((c.copy_ps as u128) << 32) / (lifetime as u128 * c.layer_step_ps as u128).max(1))
                    .unwrap_or(u64::MAX)
            }
        }
    }
}

impl ManagerMode for TimeMode {
    fn observe(&mut self, load: Array2<u64>) {
        self.estimator.push(load.view());
    }

    fn decide(&mut self, plan: &Planner<'_>, step: usize, _time_flag: bool, live: &Placement) -> Decided {
        let mut d = RoundDecision::empty(DecisionKind::Step);
        if plan.queued > 0 || self.estimator.steps() == 0 {
            return Ok(Some(d));
        }
        let layers = live.num_layers();
        let (spr, shape) = (plan.shape.slots_per_rank(), plan.shape);
        let lifetime = self.lifetime(plan);
        let price = self.price_q32(plan, lifetime);
        let estimate = self.estimator.estimate();
        // plan_on, judge_on [layers, num_logical]: the two halves of the steps, same memory.
        let k = self.estimator.best();
        let plan_on = self.estimator.half(step % 2, k);
        let judge_on = self.estimator.half(step % 2 + 1, k);
        // gap [layers]: live PAR on the estimate over the PAR no placement can beat.
        let live_par: Vec<u64> =
            (0..layers).map(|l| par_q32(&estimate.row(l).to_vec(), &live.phy2log.row(l).to_vec(), spr)).collect();
        let mut candidates: Vec<(u64, usize)> = Vec::new();
        for (l, &par) in live_par.iter().enumerate() {
            // Even the best placement, moving one slot, would not pay (the bound is at least 1).
            if par.saturating_sub(PAR_ONE) <= price {
                continue;
            }
            let w = estimate.row(l).to_vec();
            let gap = par.saturating_sub(par_lower_bound_q32(&w, shape.num_replicas, shape.num_gpus));
            if gap <= price {
                continue;
            }
            if let Some(r) = self.rejected[l] {
                let waited = step.saturating_sub(r.step) >= 2 * lifetime.min(layers as u64 * 4) as usize;
                let retry = r.retry && step == r.step + 1;
                if gap <= r.gap + r.gap / 8 + (PAR_ONE >> 10) && !waited && !retry {
                    continue;
                }
            }
            candidates.push((gap, l));
        }
        // Largest gap first (ties: lower layer); plan as many as can switch. A plan that does not
        // pay is made again on the other half at the next step; after that the layer waits (see
        // `Rejected`) and leaves its place to the next.
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        candidates.truncate(plan.per_step());
        // The policy's price: the same Q32 price, converted exactly in integers.
        let policy_price = Price::from_q32(price);
        let rows = policy::map_layers(candidates.len(), plan.threads, |i| {
            let l = candidates[i].1;
            let w = plan_on.row(l).to_vec();
            let prev = live.phy2log.row(l).to_vec();
            plan.policy.place_layer(&w, &shape, Some(&prev), policy_price)
        });
        for (&(gap, l), new_row) in candidates.iter().zip(rows) {
            let old = live.phy2log.row(l).to_vec();
            if new_row == old {
                self.rejected[l] = Some(Rejected { gap, step, retry: false });
                continue;
            }
            d.changed += 1;
            // The drop of PAR on the half the plan did not see.
            let judge = judge_on.row(l).to_vec();
            let before = par_q32(&judge, &old, spr);
            let drop = before as i128 - par_q32(&judge, &new_row, spr) as i128;
            let changed = changed_slots(&old, &new_row);
            let net = drop - price as i128 * changed as i128;
            if net <= 0 {
                // Next step the other half plans it; after two misses in a row it waits.
                let first_miss = self.rejected[l].is_none_or(|r| !(r.retry && step == r.step + 1));
                self.rejected[l] = Some(Rejected { gap, step, retry: first_miss });
                d.small_gain += 1;
                continue;
            }
            let net_ps = (net * lifetime as i128 * plan.config.cost.layer_step_ps as i128) >> 32;
            let gain = drop as f64 / before as f64;
            let w = plan_on.row(l).to_vec();
            d.updates.push(LayerUpdate { layer: l, new_row, load: w, gain, similarity: None, rank: net_ps });
        }
        d.updates.sort_by(|a, b| b.rank.cmp(&a.rank).then(a.layer.cmp(&b.layer)));
        d.updates.truncate(plan.per_step());
        Ok(Some(d))
    }

    fn committed(&mut self, update: &LayerUpdate) {
        self.rejected[update.layer] = None;
    }

    fn estimate_memory(&self) -> usize {
        self.estimator.memory() as usize
    }
}

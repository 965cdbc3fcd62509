//! Fault injection (tests, `--fault corrupt-load-on-rank`, `panic-on-rank`) as a decorator around
//! the manager's mode, never inside it or inside the run loop: [`ManagerMode`] and the modes have
//! no fault branch, and the loop does not know a fault exists. `run`'s set-up wraps a rank's mode
//! in [`Faulty`] ([`decorate`]) only when [`ManagerFaults`] asks for a fault; `simulate` never does.
//!
//! Why the mode and not the engine (where the loop reads each step's counts): a corrupted load
//! must reach one rank's decision only, so that the plan agreement has something to catch. The
//! engine's counts are summed by the load all-reduce into every rank's copy alike: a corruption
//! there would be everyone's load, the plans would agree, and the fault would test nothing. The
//! first seam after the all-reduce that holds this rank's own copy is [`ManagerMode::observe`].
//! The panic belongs to the same seam: it fires in [`ManagerMode::decide`] once a decision
//! exists, where the loop offered it to the plan agreement before the decorator existed (right
//! after the plan, before the agreement's collective).

use ndarray::Array2;

use super::{Decided, LayerUpdate, Manager, ManagerMode, Planner};
use crate::policy::Placement;

/// The faults of one rank's manager.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManagerFaults {
    /// The rank these faults are of (named in the panic's message).
    pub rank: usize,
    /// Every global load this rank observes is perturbed ([`corrupt`]): its decisions differ
    /// from the other ranks', and the plan agreement must stop the job before anything moves.
    pub corrupt_load: bool,
    /// The first decision panics (a bug), before it is offered to the plan agreement: the panic
    /// hook must end the job with exit code 1, never 101 or a hang.
    pub panic: bool,
}

impl ManagerFaults {
    /// Whether any fault is asked for (else [`decorate`] returns the manager itself).
    pub fn any(&self) -> bool {
        self.corrupt_load || self.panic
    }
}

/// `manager` with its mode wrapped in [`Faulty`] when `faults` asks for any; else `manager`.
pub fn decorate(manager: Manager, faults: ManagerFaults) -> Manager {
    if !faults.any() {
        return manager;
    }
    Manager { mode: Box::new(Faulty { inner: manager.mode, faults }), ..manager }
}

/// A mode with the faults of [`ManagerFaults`]; everything else is the inner mode's own.
#[derive(Debug)]
pub(crate) struct Faulty {
    inner: Box<dyn ManagerMode>,
    faults: ManagerFaults,
}

/// The perturbation of `--fault corrupt-load-on-rank`: each layer's expert 0 gains half the
/// layer's tokens and one more (saturating), a load no other rank sees.
pub(crate) fn corrupt(load: &mut Array2<u64>) {
    for mut row in load.rows_mut() {
        let total: u64 = row.iter().fold(0u64, |a, &v| a.saturating_add(v));
        if let Some(first) = row.first_mut() {
            *first = first.saturating_add(total / 2 + 1);
        }
    }
}

impl ManagerMode for Faulty {
    fn observe(&mut self, mut load: Array2<u64>) {
        if self.faults.corrupt_load {
            corrupt(&mut load);
        }
        self.inner.observe(load);
    }

    fn decide(&mut self, plan: &Planner<'_>, step: usize, time_flag: bool, live: &Placement) -> Decided {
        let decided = self.inner.decide(plan, step, time_flag, live);
        // A decision exists (a plan, or a policy's error the ranks would agree on): the caller
        // offers it to the agreement next.
        if self.faults.panic && !matches!(decided, Ok(None)) {
            panic!("fault injection: --fault panic-on-rank={}", self.faults.rank);
        }
        decided
    }

    fn accepted(&mut self, step: usize) {
        self.inner.accepted(step);
    }

    fn committed(&mut self, update: &LayerUpdate) {
        self.inner.committed(update);
    }

    fn interval_seconds(&self) -> Option<f64> {
        self.inner.interval_seconds()
    }

    fn estimate_memory(&self) -> usize {
        self.inner.estimate_memory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::{CostModel, Interval, ManagerConfig, Mode, Rounds};
    use crate::policy::{PlacementShape, PolicyConfig};

    const SHAPE: PlacementShape = PlacementShape { num_replicas: 8, num_gpus: 4, num_nodes: 1, num_groups: 1 };

    /// A manager of 2 layers of 4 experts, a round every 2 steps over a window of 2.
    fn manager() -> Manager {
        let rounds = Rounds { interval: Interval::Steps(2), threshold: 0.99, min_improvement: 0.0, window_steps: 2 };
        let config = ManagerConfig {
            enable: true,
            layers_per_step: 1,
            mode: Mode::Rounds(rounds),
            cost: CostModel::new(14.6484375, 2, 88_080_384, 900.0),
            move_cost: None,
            measure: Default::default(),
        };
        Manager::new(config, PolicyConfig { threads: 1, ..Default::default() }, SHAPE, 2, 4)
    }

    fn load() -> Array2<u64> {
        ndarray::arr2(&[[100, 10, 10, 10], [10, 10, 100, 10]])
    }

    /// The hash of the decision at step 1 after the same two observed loads (None: no decision).
    fn decided(manager: &mut Manager) -> Option<u64> {
        let live = Placement::trivial(2, 4, 8);
        for step in 0..2 {
            manager.observe(load());
            if let Some(d) = manager.decide(step, false, &live).unwrap() {
                return Some(d.hash());
            }
        }
        None
    }

    #[test]
    fn the_corruption_adds_half_of_each_layer_and_one_to_its_first_expert() {
        let mut l = load();
        corrupt(&mut l);
        assert_eq!(l, ndarray::arr2(&[[166, 10, 10, 10], [76, 10, 100, 10]]));
        let mut full = ndarray::arr2(&[[u64::MAX, 1]]);
        corrupt(&mut full);
        assert_eq!(full, ndarray::arr2(&[[u64::MAX, 1]]), "saturating, never a wrap");
    }

    #[test]
    fn a_corrupted_load_changes_this_ranks_decision_and_nothing_else_does() {
        let clean = decided(&mut manager()).expect("a skewed load is worth a round");
        // Without faults the manager is left as it was: the same decision.
        assert!(!ManagerFaults::default().any());
        assert_eq!(decided(&mut decorate(manager(), ManagerFaults::default())), Some(clean));
        let faults = ManagerFaults { rank: 3, corrupt_load: true, panic: false };
        let corrupted = decided(&mut decorate(manager(), faults)).expect("a round");
        assert_ne!(corrupted, clean, "the plan hashes differ: the agreement catches it");
    }

    #[test]
    fn the_panic_fires_at_the_first_decision_naming_the_rank() {
        let mut m = decorate(manager(), ManagerFaults { rank: 3, panic: true, ..Default::default() });
        let live = Placement::trivial(2, 4, 8);
        // No decision at step 0 (the round is due at step 1): no panic.
        m.observe(load());
        assert!(m.decide(0, false, &live).unwrap().is_none());
        m.observe(load());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.decide(1, false, &live)));
        let message = panicked.expect_err("the first decision panics");
        let text = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert_eq!(text, "fault injection: --fault panic-on-rank=3");
    }
}

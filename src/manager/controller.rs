//! One controller for `run` and `simulate`: observe, decide, agree, accept.
//!
//! `run` (every rank, SPMD) and `simulate` (one process, no weights) go through the same steps
//! in the same order, so that a simulated trace is the run's decisions exactly:
//!
//! 1. [`Controller::time_flag`]: whether the rounds mode's seconds interval has passed on this
//!    process's [`Clock`] (`run`: rank 0's wall clock, its flag all-reduced; `simulate`: the
//!    simulated clock, `--step-ms` a step);
//! 2. [`Controller::observe`]: the step's global load;
//! 3. [`Controller::decide`]: the manager's decision, its hash agreed by the caller's `agree`
//!    (`run`: a collective; `simulate`: alone, always agreed), then accepted (its layers queued);
//! 4. [`Controller::next_layers`]: the layers to switch this step, each committed through
//!    [`crate::run::live::Live`], the one owner of a commit (which tells the manager).

use std::time::Instant;

use ndarray::Array2;

use super::{LayerUpdate, Manager, RoundDecision};
use crate::policy::{Placement, PolicyError};

/// The hash a process offers when its policy failed: never equal to a real plan's by design of the
/// all-reduce (if every rank failed alike they agree, and all stop with the policy's error).
pub const POLICY_FAILED_HASH: u64 = 0x6661_696c_6564_2121;

/// The clock of the rounds mode's seconds interval, reset at every accepted decision.
#[derive(Debug, Clone)]
pub enum Clock {
    /// This process's wall clock (`run`: rank 0's counts, through the all-reduce).
    Wall { since: Instant },
    /// A simulated clock: `step_ms` a step (`simulate`).
    Simulated { since_ms: f64, step_ms: f64 },
}

impl Clock {
    /// The wall clock, from now.
    pub fn wall() -> Clock {
        Clock::Wall { since: Instant::now() }
    }

    /// A simulated clock of `step_ms` a step.
    pub fn simulated(step_ms: f64) -> Clock {
        Clock::Simulated { since_ms: 0.0, step_ms }
    }
}

/// A decision every rank agreed on, now accepted (its layers queued).
#[derive(Debug, Clone)]
pub struct Agreed {
    pub decision: RoundDecision,
    /// The hash the ranks agreed on.
    pub hash: u64,
    /// The manager's time to decide (the policy's plan included), seconds.
    pub plan_seconds: f64,
}

/// The manager and its clock.
#[derive(Debug)]
pub struct Controller {
    manager: Manager,
    clock: Clock,
}

impl Controller {
    pub fn new(manager: Manager, clock: Clock) -> Controller {
        Controller { manager, clock }
    }

    pub fn manager(&self) -> &Manager {
        &self.manager
    }

    pub fn manager_mut(&mut self) -> &mut Manager {
        &mut self.manager
    }

    /// This step's time flag on this process's clock, called once a step before the decision:
    /// whether the manager keeps a seconds interval and it has passed since the last accepted
    /// decision. The simulated clock first advances by one step.
    pub fn time_flag(&mut self) -> bool {
        let interval = self.manager.interval_seconds();
        match &mut self.clock {
            Clock::Wall { since } => interval.is_some_and(|s| since.elapsed().as_secs_f64() >= s),
            Clock::Simulated { since_ms, step_ms } => {
                *since_ms += *step_ms;
                interval.is_some_and(|s| *since_ms >= s * 1e3)
            }
        }
    }

    /// Takes one step's global load `[layers, num_logical]` (the same on every rank).
    pub fn observe(&mut self, load: Array2<u64>) {
        self.manager.observe(load);
    }

    /// The decision at `step`, agreed and accepted. `time_flag`: the flag as every rank sees
    /// it; `live`: the live placement. `agree(hash)` returns once every rank offered `hash`, or
    /// fails (a rank whose policy failed offers [`POLICY_FAILED_HASH`]: if all agree on it, the
    /// policy's error comes back through `failed`). None: no decision this step, or a quiet one
    /// (a step of the time mode that switches nothing: agreed, nothing to report).
    pub fn decide<E>(
        &mut self,
        step: usize,
        time_flag: bool,
        live: &Placement,
        agree: impl FnOnce(u64) -> Result<(), E>,
        failed: impl FnOnce(PolicyError) -> E,
    ) -> Result<Option<Agreed>, E> {
        let planning = Instant::now();
        let proposal = match self.manager.decide(step, time_flag, live) {
            Ok(None) => return Ok(None),
            Ok(Some(d)) => Ok(d),
            Err(e) => Err(e),
        };
        let plan_seconds = planning.elapsed().as_secs_f64();
        let hash = proposal.as_ref().map_or(POLICY_FAILED_HASH, RoundDecision::hash);
        agree(hash)?;
        let decision = proposal.map_err(failed)?;
        if decision.is_quiet() {
            return Ok(None);
        }
        match &mut self.clock {
            Clock::Wall { since } => *since = Instant::now(),
            Clock::Simulated { since_ms, .. } => *since_ms = 0.0,
        }
        let report = decision.clone();
        self.manager.accept(step, decision);
        Ok(Some(Agreed { decision: report, hash, plan_seconds }))
    }

    /// The layers to switch this step (at most `--eplb-layers-per-step`).
    pub fn next_layers(&mut self) -> Vec<LayerUpdate> {
        self.manager.next_layers()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::{CostModel, DecisionKind, Interval, ManagerConfig, Mode, Rounds};
    use crate::policy::{PlacementShape, PolicyConfig};

    fn shape() -> PlacementShape {
        PlacementShape { num_replicas: 8, num_gpus: 4, num_nodes: 1, num_groups: 1 }
    }

    fn controller(mode: Mode, step_ms: f64) -> Controller {
        let config = ManagerConfig {
            enable: true,
            layers_per_step: 1,
            mode,
            cost: CostModel::new(14.6484375, 2, 88_080_384, 900.0),
            move_cost: None,
            measure: Default::default(),
        };
        let policy = PolicyConfig { threads: 1, ..Default::default() };
        Controller::new(Manager::new(config, policy, shape(), 2, 4), Clock::simulated(step_ms))
    }

    fn rounds_every(seconds: f64) -> Mode {
        Mode::Rounds(Rounds {
            interval: Interval::Seconds(seconds),
            threshold: 0.99,
            min_improvement: 0.0,
            window_steps: 2,
        })
    }

    #[test]
    fn the_simulated_clock_sets_the_time_flag_and_a_round_resets_it() {
        let mut c = controller(rounds_every(0.05), 20.0);
        let live = Placement::trivial(2, 4, 8);
        let load = ndarray::arr2(&[[100u64, 10, 10, 10], [10, 10, 100, 10]]);
        // 20, 40 ms: not yet; 60 ms: due.
        let flags: Vec<bool> = (0..3).map(|_| c.time_flag()).collect();
        assert_eq!(flags, [false, false, true]);
        c.observe(load.clone());
        let agreed = c.decide(2, true, &live, |_| Ok::<(), ()>(()), |_| ()).unwrap().expect("a round");
        assert_eq!(agreed.decision.kind, DecisionKind::Round);
        assert_eq!(agreed.hash, agreed.decision.hash());
        assert!(!agreed.decision.updates.is_empty(), "a skewed load is worth a round");
        assert_eq!(c.manager().pending(), agreed.decision.updates.len(), "accepted: queued");
        // The round reset the clock: 20 ms since.
        assert!(!c.time_flag());
        // The time mode keeps no interval: never a flag.
        let mut t = controller(Mode::Time, 1e9);
        assert!(!t.time_flag() && !t.time_flag());
    }

    #[test]
    fn a_quiet_step_is_agreed_but_not_reported() {
        let mut c = controller(Mode::Time, 1.0);
        let live = Placement::trivial(2, 4, 8);
        c.observe(ndarray::arr2(&[[10u64, 10, 10, 10], [10, 10, 10, 10]]));
        let mut offered = Vec::new();
        let agreed = c
            .decide(
                0,
                false,
                &live,
                |h| {
                    offered.push(h);
                    Ok::<(), ()>(())
                },
                |_| (),
            )
            .unwrap();
        assert!(agreed.is_none(), "a balanced load switches nothing");
        assert_eq!(offered.len(), 1, "the ranks agree at every step of the time mode");
        assert_ne!(offered[0], POLICY_FAILED_HASH);
    }

    #[test]
    fn a_failed_policy_offers_the_failed_hash_then_its_error() {
        let mut c = controller(rounds_every(0.001), 1.0);
        c.observe(ndarray::arr2(&[[100u64, 10, 10, 10], [10, 10, 100, 10]]));
        // A live placement of the wrong shape: the policy refuses it.
        let wrong = Placement::trivial(3, 4, 8);
        let mut offered = None;
        let result = c.decide(
            0,
            true,
            &wrong,
            |h| {
                offered = Some(h);
                Ok::<(), String>(())
            },
            |e| e.to_string(),
        );
        assert_eq!(offered, Some(POLICY_FAILED_HASH));
        assert!(result.unwrap_err().contains("3 layers"), "the policy's error comes back");
        // A disagreement stops before anything is accepted.
        let live = Placement::trivial(2, 4, 8);
        let result = c.decide(1, true, &live, |_| Err("differ".to_string()), |e| e.to_string());
        assert_eq!(result.unwrap_err(), "differ");
        assert_eq!(c.manager().pending(), 0);
    }
}

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

//! The loop of `run`: Manager -> Policy -> Executor, every step, on every rank.

use std::time::Instant;

use ndarray::Array2;

use super::config::RunConfig;
use super::live::{CommitError, Committed, Live};
use super::output::Output;
use super::report::Report;
use super::safety::ReportHandle;
use super::setup::{local_slots, Ready};
use super::RunShape;
use super::{RunError, RunOutcome};
use crate::collective::{Comm, MpiError, ReduceOp};
use crate::engine::{logical_from_slots, Engine, StepCounts};
use crate::executor::{stage_layer, ExecError, LayerMigration, LayerStats};
use crate::manager::cost::{changed_slots, par_q32};
use crate::manager::{Controller, DecisionKind, LayerUpdate};
use crate::observe::{ManagerEvent, RunObserver, StepEvent};
use crate::policy::{metrics, Placement};
use crate::rank::Topology;

/// The flags piggybacked on the load all-reduce (set on the result when any rank set them).
const FLAG_TIME: usize = 0;
const FLAG_FINISHED: usize = 1;
const FLAG_FAILED: usize = 2;
const FLAG_COUNTED: usize = 3;
/// A rank received SIGTERM or SIGINT ([`crate::signals`]): every rank ends at this step.
const FLAG_INTERRUPTED: usize = 4;

/// What this rank's engine gave for one step.
enum Polled {
    /// The step's logical load from this rank's slots; `counted`: of the balanced phase, not lost;
    /// `moe_ns`: the engine's MoE time of the step (0: not measured).
    Step { local: Array2<u64>, engine_step: u64, counted: bool, moe_ns: u64 },
    /// The engine has finished.
    Finished,
    /// The engine failed (this rank's error).
    Failed(RunError),
    /// This rank received the signal: it did not read the engine.
    Interrupted(i32),
}

/// The loop's state: the engine, the live placement, the manager, the output.
pub(super) struct Looper<'a> {
    world: &'a Comm,
    config: &'a RunConfig,
    report: &'a ReportHandle,
    topo: Topology,
    run_shape: RunShape,
    engine: Box<dyn Engine>,
    /// What the static balancedness is measured on.
    initial: Placement,
    live: Live,
    /// The manager and its clock: observe, decide, agree, accept (shared with `simulate`).
    controller: Controller,
    output: Output,
    /// Per-step manager time (all-reduce + window + decision), µs, and the all-reduce alone.
    step_us: Vec<f64>,
    allreduce_us: Vec<f64>,
    round_us: Vec<f64>,
    live_wrong: u64,
    live_checked: u64,
    /// Steps whose counts this rank lost (counted as zero).
    lost_steps: u64,
    /// Steps with counts of the balanced phase (rank 0: the balancedness is their mean).
    counted_steps: u64,
    bal_static: f64,
    bal_live: f64,
}

impl<'a> Looper<'a> {
    pub fn new(world: &'a Comm, config: &'a RunConfig, report: &'a ReportHandle, ready: Ready) -> Self {
        let Ready { topo, run_shape, engine, controller } = ready;
        let RunShape { num_layers, num_logical, shape } = run_shape.clone();
        let doc = Report::new(&topo, &shape, num_layers, num_logical, config.manager.policy, engine.as_ref());
        let initial = engine.initial_placement().clone();
        Looper {
            world,
            config,
            report,
            output: Output::new(world.rank(), doc),
            live: Live::new(initial.clone()),
            initial,
            controller,
            topo,
            run_shape,
            engine,
            step_us: Vec::new(),
            allreduce_us: Vec::new(),
            round_us: Vec::new(),
            live_wrong: 0,
            live_checked: 0,
            lost_steps: 0,
            counted_steps: 0,
            bal_static: 0.0,
            bal_live: 0.0,
        }
    }

    /// Adds an observer of the run (rank 0), e.g. the Prometheus metrics served at `addr`.
    pub fn watch(&mut self, observer: Box<dyn RunObserver>, addr: Option<std::net::SocketAddr>) {
        self.output.watch(observer, addr);
    }

    pub fn run(mut self, devices: String) -> Result<RunOutcome, RunError> {
        self.output.header(
            self.config,
            &self.topo,
            &self.run_shape,
            self.engine.as_ref(),
            &self.controller.manager().config,
            &devices,
        );
        let result = self.steps();
        // Only measured figures: the balancedness is the mean over the steps it was measured on.
        let n = self.counted_steps.max(1) as f64;
        let r = &mut self.output.report;
        r.balancedness_static = self.bal_static / n;
        r.balancedness_live = self.bal_live / n;
        r.final_placement_hash = format!("{:016x}", self.live.placement().hash());
        r.cost_model = Some(self.controller.manager().cost_inputs(r.expert_bytes as u64));
        if let Err(e) = result {
            if e.is_local() {
                // Only this rank failed, or a peer may never answer (a timeout, a failed MPI
                // call): no more collectives. The report holds this rank's own figures, and says
                // so through its error; `super::run` prints the error and stops the job.
                r.wrong_live_bytes = self.live_wrong;
                r.live_verified_bytes = self.live_checked;
                r.lost_steps = self.lost_steps;
                self.output.report.set_manager_times(&self.step_us, &self.allreduce_us, &self.round_us);
                let failed: Result<(), RunError> = Err(e);
                self.output.finish(self.report, &failed)?;
                if let Err(e) = &failed {
                    // The job ends here, while the loop's communicators and GPU memory are alive:
                    // dropping them (`ncclCommDestroy`, `cuMemFree`) can wait forever for the
                    // peer that is stopped or dead.
                    super::safety::end_if_local(self.world, self.report, e);
                }
                return failed.map(|()| RunOutcome { rank: self.world.rank(), report: self.output.report });
            }
            return self.finish(Err(e));
        }
        self.finish(Ok(()))
    }

    /// The end of the run, on every rank together (collective errors only): the totals, the
    /// summary and the report.
    fn finish(mut self, result: Result<(), RunError>) -> Result<RunOutcome, RunError> {
        // The engine's global tensors, hashed again: 0 none, 1 unchanged, 2 changed, 3 not known.
        let globals = match result.as_ref().map(|()| self.engine.globals_unchanged()) {
            Ok(Ok(None)) | Err(_) => 0u64,
            Ok(Ok(Some(true))) => 1,
            Ok(Ok(Some(false))) => 2,
            Ok(Err(e)) => {
                eprintln!("eplb-worker run: rank {}: {e}", self.world.rank());
                3
            }
        };
        let g = self.world.allreduce_u64(&[globals], ReduceOp::Max)?[0];
        self.output.report.globals_unchanged = match g {
            0 => None,
            1 => Some(true),
            _ => Some(false),
        };
        let totals = self.world.allreduce_u64(&[self.live_wrong, self.live_checked, self.lost_steps], ReduceOp::Sum)?;
        let r = &mut self.output.report;
        r.wrong_live_bytes = totals[0];
        r.live_verified_bytes = totals[1];
        r.lost_steps = totals[2];
        let step_us = fastest_rank(self.world, &self.step_us)?;
        let allreduce_us = fastest_rank(self.world, &self.allreduce_us)?;
        let round_us = fastest_rank(self.world, &self.round_us)?;
        self.output.report.set_manager_times(&step_us, &allreduce_us, &round_us);
        let result = result.and_then(|()| {
            if totals[0] > 0 {
                Err(RunError::LiveVerification { wrong_bytes: totals[0] })
            } else {
                Ok(())
            }
        });
        self.output.finish(self.report, &result)?;
        result.map(|()| RunOutcome { rank: self.world.rank(), report: self.output.report })
    }

    /// This rank's contribution to the global load of one engine step, `[layers, num_logical]`:
    /// its slots' counts summed per logical expert on the placement live at that step.
    fn local_load(&mut self, counts: &StepCounts) -> Result<Array2<u64>, RunError> {
        let RunShape { num_layers, num_logical, .. } = self.run_shape;
        if counts.lost {
            self.lost_steps += 1;
        }
        if counts.lost || !counts.balanced {
            return Ok(Array2::zeros((num_layers, num_logical)));
        }
        let placement = self.live.at(counts.engine_step).map_err(|source| {
            RunError::Internal(format!("engine step {}: live placement: {source}", counts.engine_step))
        })?;
        Ok(logical_from_slots(counts.slots.view(), &placement, self.world.rank(), num_logical))
    }

    fn steps(&mut self) -> Result<(), RunError> {
        let RunShape { num_layers, num_logical, shape } = self.run_shape.clone();
        let (rank, spr, gpn) = (self.world.rank(), shape.slots_per_rank(), shape.gpus_per_node());
        let progress_every = self.engine.planned_steps().map_or(100, |s| (s / 10).max(1));
        for step in 0.. {
            // 1. The engine's counts on this rank's slots, summed per logical expert.
            let mut polled = match crate::signals::received() {
                Some(sig) => Polled::Interrupted(sig),
                None => self.poll(rank),
            };
            if let Polled::Failed(e) = polled {
                if e.is_local() {
                    // The engine beside this rank died or stopped: the other ranks may be waiting
                    // on theirs, blocked by it; this rank stops the job (see `super::run`).
                    return Err(e);
                }
                polled = Polled::Failed(e);
            }
            // 2. The all-reduce, with the time flag of rank 0's clock and the engine's state.
            let mut flags = [false; 5];
            flags[FLAG_INTERRUPTED] = matches!(polled, Polled::Interrupted(_));
            let time_flag = self.controller.time_flag();
            flags[FLAG_TIME] = rank == 0 && time_flag;
            // send: the load, then the MoE time and whether it was measured (summed over ranks).
            let mut send: Vec<u64> = Vec::with_capacity(num_layers * num_logical + 2);
            let engine_step = match &polled {
                Polled::Step { local, engine_step, counted, moe_ns } => {
                    flags[FLAG_COUNTED] = *counted;
                    send.extend(local.iter());
                    send.extend([*moe_ns, u64::from(*moe_ns > 0)]);
                    *engine_step
                }
                other => {
                    flags[FLAG_FINISHED] = matches!(other, Polled::Finished);
                    flags[FLAG_FAILED] = matches!(other, Polled::Failed(_));
                    send.resize(num_layers * num_logical + 2, 0);
                    0
                }
            };
            let t0 = Instant::now();
            let (mut sum, flags) = self.world.allreduce_loads(&send, &flags)?;
            if flags[FLAG_INTERRUPTED] {
                // Before anything else: a signal ends the run on every rank at this step.
                let mine = match polled {
                    Polled::Interrupted(sig) => Some(sig),
                    _ => None,
                };
                let ranks = self.world.ranks_where(mine.is_some())?;
                return Err(match mine {
                    Some(signal) => RunError::Interrupted { signal },
                    None => RunError::PeerInterrupted { step, ranks: format!("{ranks:?}") },
                });
            }
            let moe = MoeTime::from_sums(&sum.split_off(num_layers * num_logical));
            let t_reduced = Instant::now();
            if flags[FLAG_FAILED] {
                let mine = match polled {
                    Polled::Failed(e) => Some(e),
                    _ => None,
                };
                return Err(self.engine_failed(step, mine)?);
            }
            if flags[FLAG_FINISHED] {
                // Any engine that finished ends the run on every rank, at the same step.
                break;
            }
            let global = Array2::from_shape_vec((num_layers, num_logical), sum)
                .map_err(|e| RunError::Internal(format!("load all-reduce: {e}")))?;
            if flags[FLAG_COUNTED] {
                self.counted_steps += 1;
                let moe_mean_ns = moe.mean_ns();
                if rank == 0 || moe_mean_ns.is_some() {
                    // The placement step `engine_step` ran on: rank 0 reports its balance, and
                    // every rank divides the measured MoE time by its PAR.
                    let live = self.live.at(engine_step).map_err(|source| {
                        RunError::Internal(format!("engine step {engine_step}: live placement: {source}"))
                    })?;
                    if rank == 0 {
                        let bal = |p: &Placement| metrics::balance_report(global.view(), p.phy2log.view(), spr, gpn);
                        let (stat, live) = (bal(&self.initial), bal(&live));
                        self.bal_static += stat.balancedness;
                        self.bal_live += live.balancedness;
                        self.output.step(&StepEvent {
                            step,
                            balancedness_static: stat.balancedness,
                            balancedness_live: live.balancedness,
                            layer_static: &stat.balancedness_per_layer,
                            layer_live: &live.balancedness_per_layer,
                        });
                    }
                    if let Some(mean_ns) = moe_mean_ns {
                        self.controller.manager_mut().observe_step_time(balanced_step_ns(
                            mean_ns,
                            global.view(),
                            &live,
                            spr,
                        ));
                    }
                }
                self.controller.observe(global);
            }
            self.live.passed(engine_step);
            // 3. The manager's decision (a round, or a step of the time mode), and agreement.
            let decided = self.decide(step, flags[FLAG_TIME])?;
            let t_decided = t0.elapsed().as_secs_f64() * 1e6;
            // The time mode decides at every step: every step is a step of the manager's.
            let round = decided == Some(DecisionKind::Round);
            self.output.manager(ManagerEvent { step, seconds: t_decided / 1e6, round });
            if round {
                self.round_us.push(t_decided);
            } else {
                self.step_us.push(t_decided);
                self.allreduce_us.push((t_reduced - t0).as_secs_f64() * 1e6);
            }
            // 4. Migrate the next queued layers.
            for update in self.controller.next_layers() {
                self.migrate(step, &update, false)?;
            }
            if let Some((layer, k)) = self.config.store.force_moves.and_then(|n| super::force::due(step, n, num_layers))
            {
                let old = self.live.placement().phy2log.row(layer).to_vec();
                if let Some(new_row) = super::force::forced_row(&old, spr, num_logical, k) {
                    let update = LayerUpdate { layer, new_row, load: Vec::new(), gain: 0.0, similarity: None, rank: 0 };
                    self.migrate(step, &update, true)?;
                }
            }
            if self.config.store.verify_live_every_step {
                self.verify_all_live(step)?;
            }
            self.output.report.steps = step + 1;
            if rank == 0 && (step + 1) % progress_every == 0 {
                let r = &self.output.report;
                let n = self.counted_steps.max(1) as f64;
                log::info!(
                    "step {}/{}: {} rebalances, {} layers updated, {} experts moved, balancedness live {:.4} static {:.4}",
                    step + 1,
                    self.engine.planned_steps().map_or("?".to_string(), |s| s.to_string()),
                    r.rebalances,
                    r.layers_updated,
                    r.experts_moved,
                    self.bal_live / n,
                    self.bal_static / n
                );
            }
        }
        Ok(())
    }

    /// Checks every live slot of every layer on this rank against the live placement.
    fn verify_all_live(&mut self, step: usize) -> Result<(), RunError> {
        let (rank, spr) = (self.world.rank(), self.run_shape.shape.slots_per_rank());
        for layer in 0..self.run_shape.num_layers {
            let experts = local_slots(self.live.placement(), layer, rank, spr);
            let store = self.engine.store();
            self.live_wrong += store.verify_live(layer, &experts).map_err(|source| RunError::Exec { step, source })?;
            self.live_checked += (spr * store.expert_bytes()) as u64;
        }
        Ok(())
    }

    /// 1. The engine's counts on this rank's slots, summed per logical expert.
    fn poll(&mut self, rank: usize) -> Polled {
        match self.engine.next_step(self.live.placement()) {
            Ok(Some(counts)) => match self.local_load(&counts) {
                Ok(local) => Polled::Step {
                    local,
                    engine_step: counts.engine_step,
                    counted: counts.balanced && !counts.lost,
                    moe_ns: counts.moe_ns,
                },
                Err(e) => Polled::Failed(e),
            },
            Ok(None) => Polled::Finished,
            Err(source) => Polled::Failed(RunError::Engine { rank, source }),
        }
    }

    /// Some rank's engine failed: that rank returns its own error (and prints it); the others
    /// learn which ranks failed.
    fn engine_failed(&self, step: usize, mine: Option<RunError>) -> Result<RunError, MpiError> {
        let failed = self.world.ranks_where(mine.is_some())?;
        Ok(mine.unwrap_or(RunError::PeerEngine { step, ranks: format!("{failed:?}") }))
    }

    /// One layer: derive, stage and verify on every rank, then commit through [`Live`]. A
    /// `forced` move (`--force-moves`) is not the manager's: it is not told.
    fn migrate(&mut self, step: usize, update: &LayerUpdate, forced: bool) -> Result<(), RunError> {
        let shape = self.run_shape.shape;
        let (rank, spr, gpn) = (self.world.rank(), shape.slots_per_rank(), shape.gpus_per_node());
        let old = self.live.placement().phy2log.row(update.layer).to_vec();
        let migration = LayerMigration::derive(update.layer, &old, &update.new_row, spr, gpn);
        let staged = match stage_layer(self.engine.store(), self.world, &migration, rank) {
            Ok(staged) => staged,
            Err(ExecError::Verification { layer, wrong_bytes }) => {
                // The row of the layer that was staged but not committed.
                let staged = migration.transfers.len();
                let bytes = (staged * self.engine.store_ref().expert_bytes()) as u64;
                self.output.failed(step, layer, staged, bytes, wrong_bytes);
                // Nothing was committed anywhere: every rank proves it on its live weights.
                self.verify_all_live(step)?;
                return Err(RunError::Exec { step, source: ExecError::Verification { layer, wrong_bytes } });
            }
            Err(source) => return Err(RunError::Exec { step, source }),
        };
        let manager = (!forced).then_some(self.controller.manager_mut());
        match self.live.commit(self.engine.store(), manager, update, &staged) {
            Ok(Committed::Applied { at_step }) => {
                let stats = LayerStats { seconds: staged.elapsed(), ..staged.stats };
                if forced {
                    self.output.report.forced_moves += 1;
                }
                if self.controller.manager().config.measure.migration {
                    // The slowest rank's transfers into staging, the same on every rank (every
                    // rank applied); not the wait for the engine's boundary, during which it runs.
                    let transfer_ns = (stats.timing.transfer_seconds * 1e9) as u64;
                    let wall_ns = self.world.allreduce_u64(&[transfer_ns], ReduceOp::Max)?;
                    let changed = changed_slots(&old, &update.new_row) as u64;
                    self.controller.manager_mut().observe_migration(changed, wall_ns.first().copied().unwrap_or(0));
                }
                self.output.committed(step, &stats, at_step);
                Ok(())
            }
            Ok(Committed::Cancelled(reason)) => {
                // Nothing changed anywhere; the next round plans the layer again.
                self.output.line(format!(
                    "# step {step} layer {}: the apply was cancelled on every rank ({reason}); the placement is unchanged",
                    update.layer
                ));
                self.output.report.cancelled_applies += 1;
                Ok(())
            }
            Err(CommitError::Exec(source)) => Err(RunError::Exec { step, source }),
            Err(CommitError::Placement(source)) => {
                Err(RunError::Internal(format!("step {step}: live placement: {source}")))
            }
        }
    }

    /// The manager's decision at `step` (when it makes one: a round is due, or every step of
    /// the time mode), the plan agreement, queueing, through the [`Controller`]. Returns what was
    /// decided, when there is something to report: a round of the rounds mode, or a step of the
    /// time mode that switches layers.
    fn decide(&mut self, step: usize, time_flag: bool) -> Result<Option<DecisionKind>, RunError> {
        let (world, output) = (self.world, &mut self.output);
        let agree = |hash: u64| -> Result<(), RunError> {
            let agreement = world.agree_hash(hash)?;
            if !agreement.agreed() {
                output.report.plans_agreed = false;
                output.line(format!(
                    "# round at step {step}: plan hashes differ over the ranks (min {:016x}, max {:016x}): nothing moves",
                    agreement.min, agreement.max
                ));
                return Err(RunError::PlanDisagreement { step, min: agreement.min, max: agreement.max });
            }
            Ok(())
        };
        let failed = |source| RunError::Policy { context: format!("step {step}: the policy failed"), source };
        let Some(agreed) = self.controller.decide(step, time_flag, self.live.placement(), agree, failed)? else {
            return Ok(None);
        };
        self.output.round(step, &agreed.decision, agreed.hash, world.size(), agreed.plan_seconds);
        Ok(Some(agreed.decision.kind))
    }
}

/// The engines' MoE times of one step, summed over ranks by the load all-reduce.
struct MoeTime {
    sum_ns: u64,
    /// Ranks whose engine measured it.
    ranks: u64,
}

impl MoeTime {
    /// From the two sums that follow the load in the all-reduce: `[sum of ns, ranks measured]`.
    fn from_sums(sums: &[u64]) -> MoeTime {
        MoeTime { sum_ns: sums.first().copied().unwrap_or(0), ranks: sums.get(1).copied().unwrap_or(0) }
    }

    /// The mean over the ranks that measured it, or None when none did.
    fn mean_ns(&self) -> Option<u64> {
        (self.ranks > 0 && self.sum_ns > 0).then(|| self.sum_ns / self.ranks)
    }
}

/// The balanced MoE time of a step (ns), from its measured time `mean_ns`: every rank waits for
/// the most loaded GPU of each layer, so the step took the balanced time times the mean over
/// layers of the PAR of `live` (the placement it ran on) on its load `global [layers,
/// num_logical]`. Integers only: the same on every rank.
fn balanced_step_ns(mean_ns: u64, global: ndarray::ArrayView2<u64>, live: &Placement, spr: usize) -> u64 {
    let layers = global.nrows() as u128;
    let par_sum: u128 =
        (0..global.nrows()).map(|l| par_q32(&global.row(l).to_vec(), &live.phy2log.row(l).to_vec(), spr) as u128).sum();
    u64::try_from(((mean_ns as u128 * layers) << 32) / par_sum.max(1)).unwrap_or(u64::MAX)
}

/// The element-wise minimum over ranks of per-step times (µs): the rank that arrives last at a
/// collective does not wait in it, so the minimum is the cost of the step's own work, free of the
/// wait for slower ranks. Every rank holds as many samples (decisions are the same everywhere).
fn fastest_rank(world: &Comm, us: &[f64]) -> Result<Vec<f64>, MpiError> {
    let ns: Vec<u64> = us.iter().map(|&t| (t * 1e3) as u64).collect();
    Ok(world.allreduce_u64(&ns, ReduceOp::Min)?.into_iter().map(|t| t as f64 / 1e3).collect())
}

//! `eplb-worker simulate`: replays a load trace through the exact Manager and Policy code of
//! `run`, in one process, with no MPI and no weights, and models the migration.
//!
//! The score is the cost model of the public MoE load-balancing competition
//! (`dynamic_lb_simulator.py` of egretwAlker/hackathon_epfl):
//! * PAR of a (step, layer) = max over GPUs / mean over GPUs of the GPU loads, a replica carrying
//!   its expert's load divided by its copies; as there, an expert with no token counts 1;
//! * modeled time = steps x step time x mean PAR + changed slots x expert bytes / bandwidth, where a
//!   changed slot is a (layer, GPU, slot) position whose expert changes (with the competition's
//!   numbers, 60 s x mean PAR + changed x 88,080,384 B / 900 GB/s).
//!
//! Timeline, as in `run`: at step t the live placement serves step t's load (its PAR is scored),
//! then the manager observes that load and decides; the layers it switches (at most
//! `--eplb-layers-per-step`) serve step t + 1 on.
//!
//! Baselines (`--baseline deepseek@N`): DeepSeek's policy re-planned every N steps on the load
//! of the last N steps, every changed layer applied, `--eplb-layers-per-step` layers a step (the
//! competition's baseline is deepseek@1024). The floor (`--floor`): every step planned fresh on
//! its own load, moves free: no causal balancer can beat it. The oracle (`--oracle FILE`): every
//! step planned fresh on FILE's step (the load the trace's counts were sampled from, say), moves
//! free, and scored on the trace: what a balancer that knew the coming load exactly, but not its
//! sampling noise, would reach.
//!
//! The dispatch (`--dispatch even|split`, issue 22): besides the competition's PAR (a replica
//! carries an equal, fractional share of its expert), every (step, layer) is also dispatched in
//! integers, evenly (the engines' fixed `(token + layer) mod replicas` rule) or by the exact
//! min-max split of [`crate::split`], and scored: `mean_step_balancedness` is the mean over steps
//! and layers of mean / max GPU load under that dispatch, and `dispatch_modeled_seconds` the
//! cost model with the dispatch's PAR (max / mean) in place of the competition's.

use crate::exit::{ExitKind, Failure};
use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use ndarray::ArrayView2;
use serde::Serialize;
use serde_json::json;
use thiserror::Error;

use crate::load::{self, LoadError, LoadTrace, TraceSelect};
use crate::manager::{Clock, Controller, CostModel, Interval, Manager, ManagerArgs, ManagerConfig, Mode, Rounds};
use crate::plan::file::{self, PlacementFileError};
use crate::policy::{self, Placement, PlacementShape, PolicyConfig, PolicyError, PolicyKind};
use crate::run::live::Live;

/// The competition's expert size and bandwidth, the defaults here.
pub const COMPETITION_EXPERT_BYTES: u64 = 88_080_384;
pub const COMPETITION_GBPS: f64 = 900.0;
/// The competition's balanced compute of a whole trace: the default step time is this over the steps.
pub const COMPETITION_TRACE_SECONDS: f64 = 60.0;

#[derive(Debug, Error)]
pub enum SimulateError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Config(String),
    #[error("{context}: {source}")]
    Policy { context: String, source: PolicyError },
    #[error(transparent)]
    PlacementFile(#[from] PlacementFileError),
    #[error("{path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    #[error(transparent)]
    Limit(#[from] crate::limits::LimitError),
}

/// Bad input, but a failure to write.
impl Failure for SimulateError {
    fn kind(&self) -> ExitKind {
        match self {
            SimulateError::Write { .. } => ExitKind::Runtime,
            SimulateError::Output(e) | SimulateError::PlacementFile(PlacementFileError::Write(e)) => e.kind(),
            _ => ExitKind::BadInput,
        }
    }
}

/// A baseline: `deepseek@N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Baseline {
    pub every: usize,
}

fn parse_baseline(s: &str) -> Result<Baseline, String> {
    let n = s.strip_prefix("deepseek@").ok_or_else(|| format!("expected deepseek@N, got {s:?}"))?;
    match n.parse::<usize>() {
        Ok(every) if every > 0 => Ok(Baseline { every }),
        _ => Err(format!("{n:?} is not a positive number of steps")),
    }
}

/// How one step's tokens of an expert go to its replicas when a step is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    /// Equal shares (the engines' fixed rule), in integers: [`crate::split::even_quotas`].
    Even,
    /// The exact min-max split of each step's counts between the live replicas: [`crate::split::split_layer`].
    Split,
}

/// Arguments of `eplb-worker simulate`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Example (the competition's cost model on a 4096-step trace, beside DeepSeek's cadences):\n  \
    eplb-worker simulate --trace trace.npy --num-gpus 16 --num-redundant-experts 16 \\\n    \
    --expert-bytes 88080384 --migration-gbps 900 --step-ms 14.6484375 \\\n    \
    --baseline deepseek@32 --baseline deepseek@1024 --floor")]
pub struct SimulateArgs {
    /// The load trace: `.npy` `[steps][layers][experts]`, or any `plan`/`run` load format (one
    /// iteration a step, no wrap-around).
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Per-iteration CSV: the dataset to replay (default: the first in the file).
    #[arg(long, value_name = "NAME")]
    pub trace_dataset: Option<String>,
    /// G: GPUs (expert-parallel ranks).
    #[arg(long, value_name = "G")]
    pub num_gpus: usize,
    /// Extra physical slots over all GPUs (R = E + N, a multiple of G). Default: one a GPU,
    /// rounded up so that the slots divide.
    #[arg(long, value_name = "N")]
    pub num_redundant_experts: Option<usize>,
    /// Nodes (the hierarchical policy keeps each expert group in one node).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_nodes: usize,
    /// K: expert groups.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub num_groups: usize,
    /// The initial placement (a `plan` output or SGLang JSON); default trivial (slot s holds s mod E).
    #[arg(long, value_name = "FILE")]
    pub init_placement: Option<PathBuf>,
    /// Bytes of one expert's weights (the cost of a changed slot).
    #[arg(long, value_name = "BYTES", default_value_t = COMPETITION_EXPERT_BYTES)]
    pub expert_bytes: u64,
    #[command(flatten)]
    pub manager: ManagerArgs,
    /// A baseline to score beside: deepseek@N, DeepSeek re-planned every N steps (repeatable).
    #[arg(long, value_name = "deepseek@N", value_parser = parse_baseline)]
    pub baseline: Vec<Baseline>,
    /// Also score the hindsight floor: every step planned fresh on its own load, moves free.
    #[arg(long)]
    pub floor: bool,
    /// Also score an oracle: every step planned fresh on this trace's step (same shape as
    /// --trace, e.g. the expected counts the trace was sampled from), moves free, scored on
    /// --trace. The part of the floor's lead that no knowledge of the load can close is noise.
    #[arg(long, value_name = "FILE")]
    pub oracle: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// How each step's tokens go to an expert's replicas for `mean_step_balancedness` and the
    /// dispatch's cost-model seconds: even (the engines' fixed rule) or split (the exact min-max
    /// quotas of each step, issue 22).
    #[arg(long, value_enum, default_value_t = Dispatch::Even)]
    pub dispatch: Dispatch,
    /// Write every placement change as a JSON line `{"step", "layer", "phy2log"}` (step 0: the
    /// initial placement of every layer).
    #[arg(long, value_name = "FILE")]
    pub placements_out: Option<PathBuf>,
}

/// The score of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub mean_par: f64,
    /// Mean over steps of the mean over layers of GPU mean / GPU max.
    pub balancedness: f64,
    pub balancedness_per_step: Vec<f64>,
    pub changed_slots: u64,
    pub layer_switches: u64,
    pub compute_seconds: f64,
    pub transfer_seconds: f64,
    pub modeled_seconds: f64,
    /// The dispatch the next three are scored with.
    pub dispatch: Dispatch,
    /// Mean over steps and layers of mean / max GPU load of the step's integer dispatch.
    pub mean_step_balancedness: f64,
    /// Mean over steps and layers of max / mean GPU load of the step's integer dispatch.
    pub dispatch_mean_par: f64,
    /// The cost model with the dispatch's PAR: trace seconds x dispatch_mean_par + transfer_seconds.
    pub dispatch_modeled_seconds: f64,
}

/// The competition's PAR of one layer: an expert with no token counts 1; each replica carries
/// its expert's load over its copies. `phy2log [num_replicas]`, `load [num_logical]`.
pub fn competition_par(load: &[u64], phy2log: &[usize], slots_per_rank: usize, logcnt: &[usize]) -> f64 {
    let mut max = 0f64;
    let mut sum = 0f64;
    for gpu in phy2log.chunks(slots_per_rank) {
        let l: f64 = gpu.iter().map(|&e| load[e].max(1) as f64 / logcnt[e] as f64).sum();
        max = max.max(l);
        sum += l;
    }
    let n = (phy2log.len() / slots_per_rank) as f64;
    if sum > 0.0 {
        max / (sum / n)
    } else {
        1.0
    }
}

/// Per-step scoring: sums of PAR and balancedness.
struct Score {
    par_sum: f64,
    per_step: Vec<f64>,
    changed: u64,
    switches: u64,
    dispatch: Dispatch,
    dispatch_bal_sum: f64,
    dispatch_par_sum: f64,
    ws: crate::split::Workspace,
    quotas: Vec<i64>,
}

impl Score {
    fn new(steps: usize, dispatch: Dispatch) -> Score {
        Score {
            par_sum: 0.0,
            per_step: Vec::with_capacity(steps),
            changed: 0,
            switches: 0,
            dispatch,
            dispatch_bal_sum: 0.0,
            dispatch_par_sum: 0.0,
            ws: Default::default(),
            quotas: Vec::new(),
        }
    }

    /// Scores `live` on one step's load `[layers, num_logical]`.
    fn step(&mut self, load: ArrayView2<u64>, live: &Placement, spr: usize) -> Result<(), SimulateError> {
        let layers = load.nrows();
        let mut bal = 0.0;
        for l in 0..layers {
            let (w, row, cnt) = (load.row(l).to_vec(), live.phy2log.row(l).to_vec(), live.logcnt.row(l).to_vec());
            let par = competition_par(&w, &row, spr, &cnt);
            self.par_sum += par;
            bal += 1.0 / par;
            let counts: Vec<i64> =
                w.iter().map(|&c| i64::try_from(c)).collect::<Result<_, _>>().map_err(|_| {
                    SimulateError::Config(format!("layer {l}: a count above 2^63-1 cannot be dispatched"))
                })?;
            let tokens = counts.iter().try_fold(0i64, |a, &c| a.checked_add(c)).ok_or_else(|| {
                SimulateError::Config(format!("layer {l}: the step's tokens exceed 2^63-1 and cannot be dispatched"))
            })?;
            let split_err = |e: crate::split::SplitError| SimulateError::Config(format!("layer {l}: {e}"));
            self.quotas.resize(row.len(), 0);
            match self.dispatch {
                Dispatch::Even => {
                    self.quotas = crate::split::even_quotas(&counts, tokens, &row, spr, l).map_err(split_err)?
                }
                Dispatch::Split => {
                    crate::split::split_layer_into(&counts, tokens, &row, spr, &mut self.ws, &mut self.quotas)
                        .map_err(split_err)?;
                }
            }
            let b = crate::split::balancedness(&self.quotas, spr);
            self.dispatch_bal_sum += b;
            self.dispatch_par_sum += 1.0 / b;
        }
        self.per_step.push(bal / layers as f64);
        Ok(())
    }

    fn finish(self, name: String, steps: usize, layers: usize, cost: &Costs) -> CaseResult {
        let mean_par = self.par_sum / (steps * layers).max(1) as f64;
        let balancedness = self.per_step.iter().sum::<f64>() / self.per_step.len().max(1) as f64;
        let compute_seconds = cost.trace_seconds * mean_par;
        let transfer_seconds = self.changed as f64 * cost.copy_seconds;
        let n = (steps * layers).max(1) as f64;
        let dispatch_mean_par = self.dispatch_par_sum / n;
        CaseResult {
            dispatch: self.dispatch,
            mean_step_balancedness: self.dispatch_bal_sum / n,
            dispatch_mean_par,
            dispatch_modeled_seconds: cost.trace_seconds * dispatch_mean_par + transfer_seconds,
            name,
            mean_par,
            balancedness,
            balancedness_per_step: self.per_step,
            changed_slots: self.changed,
            layer_switches: self.switches,
            compute_seconds,
            transfer_seconds,
            modeled_seconds: compute_seconds + transfer_seconds,
        }
    }
}

/// The cost model in seconds, for the score (reports only).
struct Costs {
    trace_seconds: f64,
    copy_seconds: f64,
}

/// Everything one simulation needs.
pub struct Setup {
    pub trace: LoadTrace,
    pub shape: PlacementShape,
    pub initial: Placement,
    pub step_ms: f64,
    pub gbps: f64,
    pub dispatch: Dispatch,
}

/// The most slots times GPUs a layer that `simulate` replays: it plans every layer at every
/// round, and the policy's time per plan grows with both (measured on the dev machine, 4 layers
/// and 40 steps: 1 024 GPUs x 2 048 slots 1.7 s, 2 048 x 4 096 4.6 s, 4 096 x 8 192 24 s; 8 192
/// x 16 384 ran past 90 s). `plan`, one placement, keeps the wider [`crate::limits::check_shape`].
pub const MAX_REPLAY_SLOT_GPUS: u128 = 1 << 25;

/// Refuses (exit 2, at once) a replay that would run for minutes, see [`MAX_REPLAY_SLOT_GPUS`].
fn check_replay_size(num_replicas: usize, num_gpus: usize) -> Result<(), crate::limits::LimitError> {
    let size = num_replicas as u128 * num_gpus as u128;
    if size <= MAX_REPLAY_SLOT_GPUS {
        return Ok(());
    }
    Err(crate::limits::LimitError::Range {
        flag: "--num-gpus",
        value: num_gpus.to_string(),
        why: format!(
            "{num_replicas} slots on {num_gpus} GPUs ({size} slot-GPUs, beyond {MAX_REPLAY_SLOT_GPUS}): simulate plans every layer at every round and would run for many minutes; simulate at most 4096 GPUs with 2 slots a GPU, or plan one placement with `eplb-worker plan`"
        ),
    })
}

/// Reads the trace and checks the shape.
pub fn setup(args: &SimulateArgs) -> Result<Setup, SimulateError> {
    if args.manager.measure_migration {
        return Err(SimulateError::Config(
            "--measure-migration measures run's own migrations; simulate moves no weights: give --migration-gbps"
                .into(),
        ));
    }
    let trace = read_steps(&args.trace, args)?;
    let (layers, num_logical, steps) = (trace.num_layers(), trace.num_logical(), trace.num_steps());
    if steps == 0 || layers == 0 || num_logical == 0 {
        return Err(SimulateError::Config(format!("{}: the trace is empty", args.trace.display())));
    }
    let g = args.num_gpus;
    if g == 0 {
        return Err(SimulateError::Config("--num-gpus must be at least 1".into()));
    }
    let num_replicas = match args.num_redundant_experts {
        Some(n) => num_logical.saturating_add(n),
        None => (num_logical + g).div_ceil(g) * g,
    };
    crate::limits::check_shape(num_replicas, g, ("--num-redundant-experts", "--num-gpus"))?;
    check_replay_size(num_replicas, g)?;
    let shape = PlacementShape { num_replicas, num_gpus: g, num_nodes: args.num_nodes, num_groups: args.num_groups };
    shape.validate(num_logical).map_err(|source| SimulateError::Policy {
        context: "--num-gpus/--num-redundant-experts/--num-nodes/--num-groups".into(),
        source,
    })?;
    let initial = match &args.init_placement {
        Some(path) => {
            let p = file::read_placement(path, num_logical)?;
            p.check_shape(layers, &shape).map_err(|source| SimulateError::Policy {
                context: format!("--init-placement {}", path.display()),
                source,
            })?;
            p
        }
        None => Placement::trivial(layers, num_logical, num_replicas),
    };
    let step_ms = args.manager.step_ms.unwrap_or(COMPETITION_TRACE_SECONDS * 1e3 / steps as f64);
    let gbps = args.manager.migration_gbps.unwrap_or(COMPETITION_GBPS);
    Ok(Setup { trace, shape, initial, step_ms, gbps, dispatch: args.dispatch })
}

/// Replays the trace through a manager (`config`, `policy`) and the [`Controller`] of `run`, the
/// layers committed through [`Live`] as in `run`. Returns the score and, if asked, writes every
/// placement change to `out`.
fn replay(
    setup: &Setup,
    config: ManagerConfig,
    policy: &PolicyConfig,
    name: &str,
    mut out: Option<&mut dyn Write>,
) -> Result<(Score, Placement), SimulateError> {
    let trace = &setup.trace;
    let (layers, num_logical, steps) = (trace.num_layers(), trace.num_logical(), trace.num_steps());
    let spr = setup.shape.slots_per_rank();
    let mut live = Live::new(setup.initial.clone());
    let manager = Manager::new(config, *policy, setup.shape, layers, num_logical);
    // The time-based interval of xLLM's rounds, on the simulated clock.
    let mut controller = Controller::new(manager, Clock::simulated(setup.step_ms));
    let mut score = Score::new(steps, setup.dispatch);
    let write_err = |source| SimulateError::Write { path: PathBuf::from("--placements-out"), source };
    if let Some(o) = out.as_deref_mut() {
        for l in 0..layers {
            writeln!(o, "{}", json!({"step": 0, "layer": l, "phy2log": live.placement().phy2log.row(l).to_vec()}))
                .map_err(write_err)?;
        }
    }
    let bar = crate::progress::bar(steps as u64, name, "steps");
    for (t, load) in trace.steps.iter().enumerate() {
        score.step(load.view(), live.placement(), spr)?;
        controller.observe(load.clone());
        let time_flag = controller.time_flag();
        // One process: every hash is agreed.
        controller.decide(
            t,
            time_flag,
            live.placement(),
            |_| Ok(()),
            |source| SimulateError::Policy { context: format!("{name}: step {t}"), source },
        )?;
        for u in &controller.next_layers() {
            let old = live.placement().phy2log.row(u.layer);
            score.changed += old.iter().zip(&u.new_row).filter(|(a, b)| a != b).count() as u64;
            score.switches += 1;
            live.commit_modeled(Some(controller.manager_mut()), u)
                .map_err(|source| SimulateError::Policy { context: format!("{name}: step {t}"), source })?;
            if let Some(o) = out.as_deref_mut() {
                writeln!(o, "{}", json!({"step": t + 1, "layer": u.layer, "phy2log": u.new_row})).map_err(write_err)?;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((score, live.placement().clone()))
}

/// A trace file (`--trace-dataset` picks the dataset of a per-iteration CSV) with every step
/// checked, before any work.
fn read_steps(path: &std::path::Path, args: &SimulateArgs) -> Result<LoadTrace, SimulateError> {
    let trace = load::read_trace(path, &TraceSelect { dataset: args.trace_dataset.clone() })?;
    for s in 0..trace.num_steps() {
        trace.step(s)?;
    }
    Ok(trace)
}

/// The `--oracle` trace, checked to have the trace's shape.
fn read_oracle(path: &std::path::Path, args: &SimulateArgs, trace: &LoadTrace) -> Result<LoadTrace, SimulateError> {
    let oracle = read_steps(path, args)?;
    let shape = |t: &LoadTrace| (t.num_steps(), t.num_layers(), t.num_logical());
    if shape(&oracle) != shape(trace) {
        let ((s, l, e), (ts, tl, te)) = (shape(&oracle), shape(trace));
        return Err(SimulateError::Config(format!(
            "--oracle {}: {s} steps x {l} layers x {e} experts, but --trace has {ts} x {tl} x {te}; give the load the trace was sampled from, step for step",
            path.display()
        )));
    }
    Ok(oracle)
}

/// Every step planned fresh on `plan_on`'s step (the trace itself: the hindsight floor; another
/// trace of the same shape: the oracle), moves free, scored on the trace.
fn floor(setup: &Setup, kind: PolicyKind, plan_on: &LoadTrace, name: &str) -> Result<Score, SimulateError> {
    let trace = &setup.trace;
    let spr = setup.shape.slots_per_rank();
    let config = PolicyConfig { kind, threads: 0, move_cost: policy::Price::ZERO };
    let mut score = Score::new(trace.num_steps(), setup.dispatch);
    let bar = crate::progress::bar(trace.num_steps() as u64, name, "steps");
    for (t, (load, plan_load)) in trace.steps.iter().zip(&plan_on.steps).enumerate() {
        let p = policy::rebalance(plan_load.view(), &setup.shape, None, &config)
            .map_err(|source| SimulateError::Policy { context: format!("{name}: step {t}"), source })?;
        score.step(load.view(), &p, spr)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(score)
}

/// The manager of `deepseek@N`.
pub fn baseline_config(b: Baseline, layers_per_step: usize, cost: CostModel) -> ManagerConfig {
    ManagerConfig {
        enable: true,
        layers_per_step,
        mode: Mode::Rounds(Rounds {
            interval: Interval::Steps(b.every),
            threshold: f64::INFINITY,
            min_improvement: -1.0,
            window_steps: b.every,
        }),
        cost,
        move_cost: None,
        measure: Default::default(),
    }
}

/// The outcome: our case first, then the baselines, then the floor and the oracle.
#[derive(Debug, Clone, Serialize)]
pub struct SimulateOutcome {
    pub cases: Vec<CaseResult>,
}

/// Runs `simulate`: prints the table on stdout and writes the report.
pub fn run_simulate(args: &SimulateArgs) -> Result<SimulateOutcome, SimulateError> {
    // Before any work: the outputs can be written and destroy no input.
    use crate::output::named;
    crate::output::check_outputs(
        &named([("--report", args.report.as_deref()), ("--placements-out", args.placements_out.as_deref())]),
        &named([
            ("--trace", Some(args.trace.as_path())),
            ("--init-placement", args.init_placement.as_deref()),
            ("--oracle", args.oracle.as_deref()),
        ]),
    )?;
    let setup = setup(args)?;
    let trace = &setup.trace;
    let (layers, num_logical, steps) = (trace.num_layers(), trace.num_logical(), trace.num_steps());
    let oracle = args.oracle.as_deref().map(|path| read_oracle(path, args, trace)).transpose()?;
    let config = args.manager.config(layers, args.expert_bytes, setup.step_ms, setup.gbps);
    let costs = Costs {
        trace_seconds: steps as f64 * setup.step_ms / 1e3,
        copy_seconds: args.expert_bytes as f64 / (setup.gbps * 1e9),
    };
    let shape = setup.shape;
    println!(
        "# eplb-worker simulate: {} ({} steps x {} layers x {} experts)",
        args.trace.display(),
        steps,
        layers,
        num_logical
    );
    println!(
        "#  {} GPUs, {} slots ({} a GPU), {} node(s), {} group(s); policy {}",
        shape.num_gpus,
        shape.num_replicas,
        shape.slots_per_rank(),
        shape.num_nodes,
        shape.num_groups,
        format!("{:?}", args.manager.policy).to_lowercase()
    );
    println!(
        "#  cost model: step {} ms, expert {} B at {} GB/s ({:.3} us a changed slot); modeled time = {:.3} s x mean PAR + changed slots x {:.3} us",
        setup.step_ms,
        args.expert_bytes,
        setup.gbps,
        costs.copy_seconds * 1e6,
        costs.trace_seconds,
        costs.copy_seconds * 1e6
    );
    println!("#  manager: {}", config.describe());
    println!("#");
    let policy = args.manager.policy_config();
    let mut cases = Vec::new();
    let mut placements = args
        .placements_out
        .as_deref()
        .map(|path| crate::output::create_output("--placements-out", path))
        .transpose()?;
    let (score, _) = replay(&setup, config, &policy, "eplb", placements.as_mut().map(|w| w as &mut dyn Write))?;
    if let Some(w) = placements {
        w.commit()?;
    }
    cases.push(score.finish("eplb".into(), steps, layers, &costs));
    for &b in &args.baseline {
        let name = format!("deepseek@{}", b.every);
        let ds = PolicyConfig { kind: PolicyKind::DEEPSEEK, ..policy };
        let c = baseline_config(b, args.manager.eplb_layers_per_step, config.cost);
        let (score, _) = replay(&setup, c, &ds, &name, None)?;
        cases.push(score.finish(name, steps, layers, &costs));
    }
    if args.floor {
        cases.push(floor(&setup, args.manager.policy, trace, "floor")?.finish("floor".into(), steps, layers, &costs));
    }
    if let Some(oracle) = &oracle {
        cases.push(floor(&setup, args.manager.policy, oracle, "oracle")?.finish(
            "oracle".into(),
            steps,
            layers,
            &costs,
        ));
    }
    print!("{}", table(&cases));
    if let Some(path) = &args.report {
        let value = json!({
            "trace": args.trace.display().to_string(),
            "steps": steps,
            "num_layers": layers,
            "num_logical": num_logical,
            "num_gpus": shape.num_gpus,
            "num_replicas": shape.num_replicas,
            "num_nodes": shape.num_nodes,
            "num_groups": shape.num_groups,
            "step_ms": setup.step_ms,
            "expert_bytes": args.expert_bytes,
            "migration_gbps": setup.gbps,
            "manager": config.describe(),
            "dispatch": args.dispatch,
            "cases": cases,
        });
        file::write_json_atomic(path, &value)?;
    }
    Ok(SimulateOutcome { cases })
}

/// The results table (nccl-tests style): one row a case; `vs first` is the modeled time of the
/// first baseline over the case's (above 1: faster).
pub fn table(cases: &[CaseResult]) -> String {
    let mut s = String::from(
        "#          case   mean PAR  balancedness  changed slots  switches  transfer(s)  modeled(s)  vs base  #wrong  step bal  dispatch\n",
    );
    let base = cases.get(1).map(|c| c.modeled_seconds);
    for c in cases {
        let vs = base.map_or("-".to_string(), |b| format!("{:.4}", b / c.modeled_seconds));
        s.push_str(&format!(
            "{:>15} {:>10.5} {:>13.5} {:>14} {:>9} {:>12.4} {:>11.4} {:>8} {:>7} {:>9.5} {:>9}\n",
            c.name,
            c.mean_par,
            c.balancedness,
            c.changed_slots,
            c.layer_switches,
            c.transfer_seconds,
            c.modeled_seconds,
            vs,
            0,
            c.mean_step_balancedness,
            format!("{:?}", c.dispatch).to_lowercase()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn competition_par_matches_the_reference_definition() {
        // 4 experts, 6 slots on 3 GPUs: expert 0 has 2 copies.
        let load = [60u64, 20, 0, 40];
        let phy2log = [0, 1, 0, 2, 3, 1];
        let logcnt = [2, 2, 1, 1];
        // GPU loads: 30+10, 30+1 (no token counts 1), 40+10 -> max 50, mean 121/3.
        let par = competition_par(&load, &phy2log, 2, &logcnt);
        assert!((par - 50.0 / (121.0 / 3.0)).abs() < 1e-12, "{par}");
    }

    #[test]
    fn baselines_parse() {
        assert_eq!(parse_baseline("deepseek@32"), Ok(Baseline { every: 32 }));
        assert!(parse_baseline("deepseek@0").is_err());
        assert!(parse_baseline("random@3").is_err());
    }
}

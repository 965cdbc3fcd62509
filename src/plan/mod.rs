//! `eplb-worker plan`: compute a placement offline from a load file.

pub mod file;

use crate::exit::{ExitKind, Failure};
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use ndarray::Array2;
use serde_json::{json, Value};
use thiserror::Error;

use crate::engine::synthetic::DriftingZipf;
use crate::limits::{self, LimitError};
use crate::load::{self, LoadError, LoadTrace, TraceSelect};
use crate::output::{self, OutputError};
use crate::policy::{self, metrics, Placement, PlacementShape, PolicyConfig, PolicyError, PolicyKind, Price};
use file::PlacementFileError;

/// Arguments of `eplb-worker plan`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Example:\n  eplb-worker plan --load load.csv --num-replicas 16 --num-gpus 4 --output placement.json"
)]
pub struct PlanArgs {
    /// Token counts per layer and logical expert: JSON (an array, or under key weight, counts or logical_count;
    /// [layers][experts] or [steps][layers][experts]), CSV (one row per layer, or the
    /// per-iteration format with dataset,iteration,layer_idx columns) or .npy (2 or 3 dims).
    /// Steps are summed unless --iteration picks one.
    // The text is the flag's --help, where `[layers][experts]` reads as a shape, not a doc link.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "FILE", required_unless_present = "synthetic", conflicts_with = "synthetic")]
    pub load: Option<PathBuf>,
    /// Instead of --load: the built-in drifting zipf-like load with LAYERS x EXPERTS
    /// (e.g. 58x256 for DeepSeek-V3); --iteration picks its step (default 0).
    #[arg(long, value_name = "LAYERSxEXPERTS", value_parser = parse_synthetic)]
    pub synthetic: Option<(usize, usize)>,
    /// Per-iteration CSV: which dataset to read (default: the first in the file).
    #[arg(long, value_name = "NAME")]
    pub dataset: Option<String>,
    /// Plan on this step of the load (0-based) instead of the sum of all steps.
    #[arg(long, value_name = "T")]
    pub iteration: Option<usize>,
    /// Also judge the new placement (and --previous) on this step of the load: metrics.eval.
    #[arg(long, value_name = "T")]
    pub eval_iteration: Option<usize>,
    /// R: physical expert slots per layer, over all GPUs (a multiple of --num-gpus, at least the experts).
    #[arg(long, value_name = "R")]
    pub num_replicas: usize,
    /// G: GPUs (expert-parallel ranks).
    #[arg(long, value_name = "G")]
    pub num_gpus: usize,
    /// N: nodes. With --num-groups a multiple of N, each expert group stays inside one node.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_nodes: usize,
    /// K: expert groups (must divide the experts in hierarchical mode).
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub num_groups: usize,
    /// Placement algorithm.
    #[arg(long, value_parser = PolicyKind::value_parser(), default_value = "incremental")]
    pub policy: PolicyKind,
    /// Incremental policy: the price of moving one expert copy, as a fraction of the mean GPU
    /// load; a change must cut the peak GPU load by more than this per copy it moves.
    #[arg(long, value_name = "FRACTION", default_value_t = crate::policy::incremental::DEFAULT_MOVE_COST,
          value_parser = crate::limits::non_negative)]
    pub move_cost: f64,
    /// The placement now live (a file written by `plan`); its moves are counted in the metrics.
    #[arg(long, value_name = "PLACEMENT.json")]
    pub previous: Option<PathBuf>,
    /// Where to write the placement (JSON: physical_to_logical_map, logical_to_physical_map,
    /// logical_count, metrics).
    #[arg(long, value_name = "PLACEMENT.json")]
    pub output: PathBuf,
    /// Also write a file holding physical_to_logical_map only, which SGLang's
    /// --init-expert-location reads as it is.
    #[arg(long, value_name = "FILE.json")]
    pub sglang_output: Option<PathBuf>,
    /// Policy threads over layers (0: one per core). The result does not depend on it.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Parses `LAYERSxEXPERTS`, e.g. `58x256`.
pub(crate) fn parse_synthetic(s: &str) -> Result<(usize, usize), String> {
    let err = || format!("expected LAYERSxEXPERTS such as 58x256, got {s:?}");
    let (l, e) = s.split_once(['x', 'X']).ok_or_else(err)?;
    let (l, e): (usize, usize) = (l.trim().parse().map_err(|_| err())?, e.trim().parse().map_err(|_| err())?);
    if l == 0 || e == 0 {
        return Err(err());
    }
    Ok((l, e))
}

#[derive(Debug, Error)]
pub enum PlanError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{path}: {source}{}", flag_hint(source))]
    Policy { path: PathBuf, source: PolicyError },
    #[error(transparent)]
    PlacementFile(#[from] PlacementFileError),
    #[error("{path}: --{flag} {step} is out of range: the load has {steps} steps (0..{steps})")]
    StepOutOfRange { path: PathBuf, flag: &'static str, step: usize, steps: usize },
    #[error("--previous {path}: {source}")]
    Previous { path: PathBuf, source: PolicyError },
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Limit(#[from] LimitError),
}

/// The `plan` flag that fixes a policy error, where one does.
fn flag_hint(e: &PolicyError) -> String {
    match e {
        PolicyError::ReplicasNotMultipleOfGpus { next, .. } | PolicyError::TooFewReplicas { next, .. } => {
            format!(" (--num-replicas {next})")
        }
        PolicyError::GroupsDoNotDivide { .. } => " (--num-groups)".into(),
        PolicyError::GpusNotMultipleOfNodes { .. } => " (--num-nodes)".into(),
        _ => String::new(),
    }
}

/// Bad input, but a write that failed at the end.
impl Failure for PlanError {
    fn kind(&self) -> ExitKind {
        match self {
            PlanError::PlacementFile(PlacementFileError::Write(e)) | PlanError::Output(e) => e.kind(),
            _ => ExitKind::BadInput,
        }
    }
}

/// What `plan` computed, for the caller to print.
#[derive(Debug)]
pub struct PlanOutcome {
    pub placement: Placement,
    pub metrics: Value,
    pub summary: String,
}

/// Checks that a plan of `layers x num_logical` experts on `num_replicas` slots fits in host
/// memory: `load_steps` steps of load, `phy2log` and the policy's per-slot tables (about 64 bytes
/// a slot and 32 an expert, per layer).
fn check_plan_memory(
    layers: usize,
    num_logical: usize,
    num_replicas: usize,
    load_steps: usize,
) -> Result<(), LimitError> {
    let need = limits::product(&[layers, num_replicas, 64])
        .zip(limits::product(&[layers, num_logical, 32 + 8 * load_steps.min(usize::MAX / 8 - 4)]))
        .and_then(|(a, b)| a.checked_add(b));
    limits::check_host_memory(
        "the plan",
        need,
        &format!("{layers} layers x {num_replicas} slots, {num_logical} experts, {load_steps} step(s) of load"),
        "plan fewer layers or slots",
    )
}

/// Picks `--iteration` (or the sum of all steps) from a trace.
fn select_step(trace: &LoadTrace, step: Option<usize>, flag: &'static str) -> Result<Array2<u64>, PlanError> {
    match step {
        None => Ok(trace.summed()?),
        Some(t) if t < trace.num_steps() => Ok(trace.step(t)?),
        Some(t) => Err(PlanError::StepOutOfRange { path: trace.path.clone(), flag, step: t, steps: trace.num_steps() }),
    }
}

/// Layers x slots from which `plan` shows a progress bar (DeepSeek-V3: 58 x 288 = 16,704).
const PROGRESS_MIN_SLOTS: usize = 10_000;

/// Runs `plan`: reads the load, computes the placement, writes the output files.
pub fn run_plan(args: &PlanArgs) -> Result<PlanOutcome, PlanError> {
    // Before any work: the outputs can be written and destroy no input, and the shape is sane.
    let outputs =
        output::named([("--output", Some(args.output.as_path())), ("--sglang-output", args.sglang_output.as_deref())]);
    let inputs = output::named([("--load", args.load.as_deref()), ("--previous", args.previous.as_deref())]);
    output::check_outputs(&outputs, &inputs)?;
    limits::check_shape(args.num_replicas, args.num_gpus, ("--num-replicas", "--num-gpus"))?;
    if let Some((layers, experts)) = args.synthetic {
        // The built-in load is generated for every step up to the last one asked for.
        let steps = args.iteration.unwrap_or(0).max(args.eval_iteration.unwrap_or(0)).saturating_add(1);
        check_plan_memory(layers, experts, args.num_replicas, steps)?;
    }
    let trace = match (&args.load, args.synthetic) {
        (Some(path), _) => load::read_trace(path, &TraceSelect { dataset: args.dataset.clone() })?,
        (None, Some((layers, experts))) => {
            let zipf = DriftingZipf::new(layers, experts, 0);
            let last = args.iteration.unwrap_or(0).max(args.eval_iteration.unwrap_or(0));
            LoadTrace {
                steps: (0..=last).map(|t| zipf.step(t)).collect(),
                path: PathBuf::from(format!("synthetic {layers}x{experts}")),
                format: load::LoadFormat::Synthetic,
                scale_bits: None,
                dataset: None,
                datasets: Vec::new(),
            }
        }
        (None, None) => unreachable!("clap requires --load or --synthetic"),
    };
    let source = trace.path.clone();
    let iteration = if args.synthetic.is_some() { Some(args.iteration.unwrap_or(0)) } else { args.iteration };
    let weight = select_step(&trace, iteration, "iteration")?;
    let eval_weight = args.eval_iteration.map(|t| select_step(&trace, Some(t), "eval-iteration")).transpose()?;
    let (layers, num_logical) = weight.dim();
    let shape = PlacementShape {
        num_replicas: args.num_replicas,
        num_gpus: args.num_gpus,
        num_nodes: args.num_nodes,
        num_groups: args.num_groups,
    };
    let policy_err = |e| PlanError::Policy { path: source.clone(), source: e };
    shape.validate(num_logical).map_err(policy_err)?;
    check_plan_memory(layers, num_logical, shape.num_replicas, 1)?;
    let previous = args.previous.as_ref().map(|p| file::read_placement(p, num_logical)).transpose()?;
    if let (Some(prev), Some(path)) = (&previous, &args.previous) {
        prev.check_shape(layers, &shape).map_err(|source| PlanError::Previous { path: path.clone(), source })?;
    }

    let config =
        PolicyConfig { kind: args.policy, threads: args.threads, move_cost: Price::from_fraction(args.move_cost) };
    let start = Instant::now();
    // A bar on a terminal for large inputs (DeepSeek-V3 scale and above), quiet otherwise.
    let bar = crate::progress::bar(layers as u64, "plan", "layers");
    if layers * shape.num_replicas < PROGRESS_MIN_SLOTS {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let placement = policy::rebalance_observed(weight.view(), &shape, previous.as_ref(), &config, &|| bar.inc(1))
        .map_err(policy_err)?;
    bar.finish_and_clear();
    let plan_seconds = start.elapsed().as_secs_f64();

    let (spr, gpn) = (shape.slots_per_rank(), shape.gpus_per_node());
    let report = metrics::balance_report(weight.view(), placement.phy2log.view(), spr, gpn);
    let mut m = json!({
        "policy": args.policy,
        "mode": if shape.is_hierarchical() { "hierarchical" } else { "global" },
        "num_layers": layers,
        "num_logical": num_logical,
        "num_replicas": shape.num_replicas,
        "num_gpus": shape.num_gpus,
        "num_nodes": shape.num_nodes,
        "num_groups": shape.num_groups,
        "slots_per_rank": spr,
        "plan_seconds": plan_seconds,
        "balancedness": report.balancedness,
        "balancedness_per_layer": report.balancedness_per_layer,
        "max_over_mean": report.max_over_mean,
        "node_balancedness": report.node_balancedness,
        "placement_hash": format!("{:016x}", placement.hash()),
    });
    let mut summary = format!(
        "# eplb plan: policy {}, {} mode, {layers} layers x {num_logical} experts -> {} slots on {} GPUs ({} nodes, {} groups)\n\
         # plan time {:.3} ms\n\
         # balancedness {:.4} (worst layer {:.4}), max/mean {:.4}, node balancedness {:.4}\n",
        format!("{:?}", args.policy).to_lowercase(),
        if shape.is_hierarchical() { "hierarchical" } else { "global" },
        shape.num_replicas,
        shape.num_gpus,
        shape.num_nodes,
        shape.num_groups,
        plan_seconds * 1e3,
        report.balancedness,
        report.balancedness_per_layer.iter().copied().fold(f64::INFINITY, f64::min),
        report.max_over_mean,
        report.node_balancedness,
    );
    if let Some(prev) = &previous {
        let moved = metrics::copies_moved_all(prev.phy2log.view(), placement.phy2log.view(), spr);
        let prev_report = metrics::balance_report(weight.view(), prev.phy2log.view(), spr, gpn);
        m["copies_moved"] = json!(moved);
        m["previous_balancedness"] = json!(prev_report.balancedness);
        summary += &format!(
            "# vs --previous: {moved} expert copies moved of {}; balancedness {:.4} -> {:.4}\n",
            layers * shape.num_replicas,
            prev_report.balancedness,
            report.balancedness
        );
    }
    if let (Some(w), Some(t)) = (&eval_weight, args.eval_iteration) {
        let ours = metrics::balance_report(w.view(), placement.phy2log.view(), spr, gpn);
        let mut eval = json!({ "iteration": t, "balancedness": ours.balancedness });
        summary += &format!("# on iteration {t}: balancedness {:.4}", ours.balancedness);
        if let Some(prev) = &previous {
            let theirs = metrics::balance_report(w.view(), prev.phy2log.view(), spr, gpn);
            eval["previous_balancedness"] = json!(theirs.balancedness);
            summary += &format!(" (previous placement {:.4})", theirs.balancedness);
        }
        summary += "\n";
        m["eval"] = eval;
    }
    if let Some(bits) = trace.scale_bits {
        m["load_scale_bits"] = json!(bits);
    }
    file::write_placement("--output", &args.output, &placement, m.clone())?;
    summary += &format!("# wrote {}\n", args.output.display());
    if let Some(path) = &args.sglang_output {
        file::write_sglang("--sglang-output", path, &placement)?;
        summary += &format!("# wrote {} (SGLang --init-expert-location)\n", path.display());
    }
    Ok(PlanOutcome { placement, metrics: m, summary })
}

//! `eplb-worker plot REPORT.json --output DIR`: SVG charts of a `run` or `simulate` report.
//!
//! * `balancedness.svg`: balancedness over steps, static against live (and the re-plan reference
//!   when the report has one), rebalance rounds marked;
//! * `layers.svg`: a heatmap of each layer's balancedness over time (static beside live when the
//!   report has both);
//! * `migrations.svg`: bytes moved and the migration stall per round (when anything moved).
//!
//! The keys read (see [`PlotInput::from_report`]) are documented in docs/cli.md; anything else in
//! the report is ignored.

mod charts;

use crate::exit::{ExitKind, Failure};
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::Value;
use thiserror::Error;

/// Arguments of `eplb-worker plot`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Example:\n  eplb-worker run ... --report report.json && eplb-worker plot report.json --output plots/"
)]
pub struct PlotArgs {
    /// The JSON report of `run --report` or `simulate --report`.
    #[arg(value_name = "REPORT.json")]
    pub report: PathBuf,
    /// Folder for the SVG files (created if missing; files of the same name are replaced).
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
}

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("cannot read report {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("report {path} is not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("report {path}: {what} (plot needs a report of `run --report` or `simulate --report` from this version)")]
    Bad { path: PathBuf, what: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// Bad input for a bad report, a runtime failure when the charts cannot be written.
impl Failure for PlotError {
    fn kind(&self) -> ExitKind {
        match self {
            PlotError::Write { .. } => ExitKind::Runtime,
            _ => ExitKind::BadInput,
        }
    }
}

/// The moves of one round: bytes, and the stall they caused.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RoundMoves {
    pub step: usize,
    pub bytes: u64,
    /// Migration time of the round, over all its layers.
    pub seconds: f64,
    /// The longest stall of one step of the round (the layers migrated on that step).
    pub worst_step_seconds: f64,
}

/// What the charts draw, read from a report.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PlotInput {
    pub title: String,
    /// Steps averaged into one sample, and each sample's first step (`[samples]`).
    pub stride: usize,
    pub step: Vec<usize>,
    /// What the initial placement would have had, when the report has it (`[samples]`).
    pub balancedness_static: Option<Vec<f64>>,
    pub balancedness_live: Vec<f64>,
    /// The live line's name in the legend.
    pub live_name: String,
    /// Reference lines (a re-plan every step, baselines, the floor), `(name, [samples])`.
    pub references: Vec<(String, Vec<f64>)>,
    /// `[samples][layers]`, when the report has them.
    pub layer_balancedness_static: Option<Vec<Vec<f64>>>,
    pub layer_balancedness_live: Option<Vec<Vec<f64>>>,
    /// Steps of the rounds that selected at least one layer.
    pub rebalance_steps: Vec<usize>,
    pub moves: Vec<RoundMoves>,
}

/// Writes the charts; returns the files written.
pub fn run_plot(args: &PlotArgs) -> Result<Vec<PathBuf>, PlotError> {
    let bytes = crate::input::read_regular(&args.report, crate::input::MAX_JSON_BYTES)
        .map_err(|source| PlotError::Read { path: args.report.clone(), source })?;
    let report: Value =
        serde_json::from_slice(&bytes).map_err(|source| PlotError::Json { path: args.report.clone(), source })?;
    let input = PlotInput::from_report(&report).map_err(|what| PlotError::Bad { path: args.report.clone(), what })?;
    std::fs::create_dir_all(&args.output)
        .map_err(|e| PlotError::Write { path: args.output.clone(), reason: e.to_string() })?;
    charts::draw_all(&input, &args.output)
}

impl PlotInput {
    /// Reads the keys `plot` draws from a report:
    ///
    /// * `run`: `series.step`, `series.balancedness_static`, `series.balancedness_live` (equal
    ///   lengths, required), `series.stride` (default 1), `series.balancedness_replan` (optional,
    ///   alias `series.balancedness_baseline`), `series.layer_balancedness_static` and
    ///   `series.layer_balancedness_live` (`[samples][layers]`, optional);
    /// * `simulate` (no `series`): `cases[].name` and `cases[].balancedness_per_step` (one value a
    ///   step): the first case is the live line, a case named `static` the static one, every other
    ///   case (a baseline, the floor) a reference line;
    /// * `rounds[].step` with `rounds[].selected` (the layers, a list) or
    ///   `rounds[].layers_selected` (a count): rounds that selected a layer are marked;
    /// * bytes and stall per round: `layers[]` (`step`, `bytes`, `seconds`, as `run` writes them)
    ///   grouped into the rounds that queued them, or else `rounds[].bytes_moved` and
    ///   `rounds[].stall_seconds` when a report (a simulation) gives them per round;
    /// * a title from `world_size` (or `num_gpus`), `num_layers`, `num_logical`, `policy`, `load`
    ///   (or `trace`) when present.
    pub(crate) fn from_report(report: &Value) -> Result<PlotInput, String> {
        let mut input = match report.get("series") {
            Some(series) => series_input(series)?,
            None => match report.get("cases") {
                Some(cases) => cases_input(cases)?,
                None => return Err("no `series` object (a `run` report) nor `cases` list (a `simulate` report)".into()),
            },
        };
        let n = input.step.len();
        if n == 0 {
            return Err("no step in the series: the run stopped before its first step".into());
        }
        if input.step.windows(2).any(|w| w[0] >= w[1]) {
            return Err("series.step is not increasing".into());
        }
        let lines = [("live", Some(&input.balancedness_live)), ("static", input.balancedness_static.as_ref())];
        for (name, v) in lines.into_iter().chain(input.references.iter().map(|(n, v)| (n.as_str(), Some(v)))) {
            if let Some(len) = v.map(Vec::len).filter(|&l| l != n) {
                return Err(format!("balancedness {name} has {len} values, series.step {n}"));
            }
        }
        for (key, m) in [
            ("layer_balancedness_static", &input.layer_balancedness_static),
            ("layer_balancedness_live", &input.layer_balancedness_live),
        ] {
            if let Some(m) = m {
                let layers = m.first().map_or(0, Vec::len);
                if m.len() != n || layers == 0 || m.iter().any(|r| r.len() != layers) {
                    return Err(format!("series.{key} must be [{n} samples][layers], non-empty and rectangular"));
                }
            }
        }

        let rounds = match report.get("rounds") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(r)) => r.clone(),
            Some(_) => return Err("`rounds` is not a list".into()),
        };
        let mut round_steps = Vec::new();
        for (i, r) in rounds.iter().enumerate() {
            let s = r.get("step").and_then(Value::as_u64).ok_or_else(|| format!("rounds[{i}].step is missing"))?;
            let selected = match (r.get("selected"), r.get("layers_selected")) {
                (Some(Value::Array(a)), _) => a.len() as u64,
                (_, Some(v)) => v.as_u64().ok_or_else(|| format!("rounds[{i}].layers_selected is not a count"))?,
                _ => 1,
            };
            round_steps.push(s as usize);
            if selected > 0 {
                input.rebalance_steps.push(s as usize);
            }
        }
        input.moves = match report.get("layers") {
            Some(Value::Array(layers)) if !layers.is_empty() => moves_from_layers(layers, &round_steps)?,
            _ => moves_from_rounds(&rounds)?,
        };
        input.title = title(report);
        Ok(input)
    }
}

/// The most points a line keeps: a longer `simulate` series is averaged down.
const MAX_POINTS: usize = 1000;

/// A `run` report's `series`.
fn series_input(series: &Value) -> Result<PlotInput, String> {
    let floats = |key: &str| -> Result<Option<Vec<f64>>, String> {
        match series.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => float_list(v).map(Some).map_err(|e| format!("series.{key}: {e}")),
        }
    };
    let matrix = |key: &str| -> Result<Option<Vec<Vec<f64>>>, String> {
        match series.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(rows)) => rows
                .iter()
                .map(float_list)
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
                .map_err(|e| format!("series.{key}: {e}")),
            Some(_) => Err(format!("series.{key} is not a list of lists")),
        }
    };
    let step: Vec<usize> = match series.get("step") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().map(|s| s as usize).ok_or_else(|| format!("series.step: {v} is not a step")))
            .collect::<Result<_, _>>()?,
        _ => return Err("series.step is missing or not a list".into()),
    };
    let live = floats("balancedness_live")?.ok_or("series.balancedness_live is missing")?;
    let stat = floats("balancedness_static")?.ok_or("series.balancedness_static is missing")?;
    let replan = match floats("balancedness_replan")? {
        Some(v) => Some(v),
        None => floats("balancedness_baseline")?,
    };
    Ok(PlotInput {
        title: String::new(),
        stride: series.get("stride").and_then(Value::as_u64).unwrap_or(1).max(1) as usize,
        step,
        balancedness_static: Some(stat),
        balancedness_live: live,
        live_name: "live: the placement eplb keeps".to_string(),
        references: replan.map(|v| vec![("re-plan every step (reference)".to_string(), v)]).unwrap_or_default(),
        layer_balancedness_static: matrix("layer_balancedness_static")?,
        layer_balancedness_live: matrix("layer_balancedness_live")?,
        rebalance_steps: Vec::new(),
        moves: Vec::new(),
    })
}

/// A `simulate` report's `cases`, each with one balancedness a step, averaged down to at most
/// [`MAX_POINTS`] samples.
fn cases_input(cases: &Value) -> Result<PlotInput, String> {
    let cases = cases.as_array().filter(|c| !c.is_empty()).ok_or("`cases` is not a non-empty list")?;
    let mut lines = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let name = c.get("name").and_then(Value::as_str).ok_or_else(|| format!("cases[{i}].name is missing"))?;
        let per_step = c
            .get("balancedness_per_step")
            .ok_or_else(|| format!("cases[{i}].balancedness_per_step is missing"))
            .and_then(|v| float_list(v).map_err(|e| format!("cases[{i}].balancedness_per_step: {e}")))?;
        lines.push((name.to_string(), per_step));
    }
    let steps = lines[0].1.len();
    let stride = steps.div_ceil(MAX_POINTS).max(1);
    let down = |v: &[f64]| v.chunks(stride).map(|c| c.iter().sum::<f64>() / c.len() as f64).collect::<Vec<_>>();
    let (live_name, live) = lines.remove(0);
    let static_at = lines.iter().position(|(n, _)| n == "static");
    let stat = static_at.map(|i| lines.remove(i).1);
    Ok(PlotInput {
        title: String::new(),
        stride,
        step: (0..steps).step_by(stride).collect(),
        balancedness_static: stat.map(|v| down(&v)),
        balancedness_live: down(&live),
        live_name,
        references: lines.into_iter().map(|(n, v)| (n, down(&v))).collect(),
        layer_balancedness_static: None,
        layer_balancedness_live: None,
        rebalance_steps: Vec::new(),
        moves: Vec::new(),
    })
}

fn float_list(v: &Value) -> Result<Vec<f64>, String> {
    let a = v.as_array().ok_or("not a list")?;
    a.iter().map(|x| x.as_f64().filter(|f| f.is_finite()).ok_or_else(|| format!("{x} is not a number"))).collect()
}

/// Groups `run`'s migrated layers (`step`, `bytes`, `seconds`) by the round that queued them: the
/// last round at or before the layer's step.
fn moves_from_layers(layers: &[Value], round_steps: &[usize]) -> Result<Vec<RoundMoves>, String> {
    let mut out: Vec<RoundMoves> = Vec::new();
    // Round step -> its index in `out`, and (round index, step) -> seconds of that step, for the
    // worst step: maps, so that a report of 150 000 layer rows takes linear time (a scan of
    // `out` per row took 19 s). Sums run in row order, as before.
    let mut index: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let mut per_step: std::collections::HashMap<(usize, usize), f64> = std::collections::HashMap::new();
    let sorted = round_steps.windows(2).all(|w| w[0] <= w[1]);
    for (i, l) in layers.iter().enumerate() {
        let field = |k: &str| l.get(k).ok_or_else(|| format!("layers[{i}].{k} is missing"));
        let step = field("step")?.as_u64().ok_or_else(|| format!("layers[{i}].step is not a step"))? as usize;
        let bytes = field("bytes")?.as_u64().ok_or_else(|| format!("layers[{i}].bytes is not a count"))?;
        let seconds = field("seconds")?.as_f64().ok_or_else(|| format!("layers[{i}].seconds is not a number"))?;
        // The last round at or before the step (in the rounds' order, as they were written).
        let round_step = if sorted {
            match round_steps.partition_point(|&s| s <= step) {
                0 => step,
                n => round_steps[n - 1],
            }
        } else {
            round_steps.iter().rev().find(|&&s| s <= step).copied().unwrap_or(step)
        };
        let idx = *index.entry(round_step).or_insert_with(|| {
            out.push(RoundMoves { step: round_step, bytes: 0, seconds: 0.0, worst_step_seconds: 0.0 });
            out.len() - 1
        });
        out[idx].bytes += bytes;
        out[idx].seconds += seconds;
        *per_step.entry((idx, step)).or_insert(0.0) += seconds;
    }
    for ((idx, _), secs) in per_step {
        out[idx].worst_step_seconds = out[idx].worst_step_seconds.max(secs);
    }
    out.sort_by_key(|m| m.step);
    Ok(out)
}

/// Per-round `bytes_moved` and `stall_seconds` (a simulation's estimate), when given.
fn moves_from_rounds(rounds: &[Value]) -> Result<Vec<RoundMoves>, String> {
    let mut out = Vec::new();
    for (i, r) in rounds.iter().enumerate() {
        let Some(bytes) = r.get("bytes_moved") else { continue };
        let bytes = bytes.as_u64().ok_or_else(|| format!("rounds[{i}].bytes_moved is not a count"))?;
        let stall = r.get("stall_seconds").and_then(Value::as_f64).unwrap_or(0.0);
        let step = r.get("step").and_then(Value::as_u64).unwrap_or(0) as usize;
        out.push(RoundMoves { step, bytes, seconds: stall, worst_step_seconds: stall });
    }
    Ok(out)
}

fn title(report: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(w) = report.get("world_size").and_then(Value::as_u64) {
        parts.push(format!("{w} ranks"));
    } else if let Some(g) = report.get("num_gpus").and_then(Value::as_u64) {
        parts.push(format!("{g} GPUs (simulated)"));
    }
    if let (Some(l), Some(e)) =
        (report.get("num_layers").and_then(Value::as_u64), report.get("num_logical").and_then(Value::as_u64))
    {
        parts.push(format!("{l} layers x {e} experts"));
    }
    if let Some(p) = report.get("policy").and_then(Value::as_str) {
        parts.push(format!("policy {p}"));
    }
    if let Some(load) = report.get("load").or_else(|| report.get("trace")).and_then(Value::as_str) {
        // A trace's file name, not its whole path; the built-in load without its parameters.
        let load = load.rsplit('/').next().unwrap_or(load);
        parts.push(load.split(" (").next().unwrap_or(load).to_string());
    }
    parts.join(", ")
}

/// `path` inside `dir`.
fn out_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[cfg(test)]
mod tests;

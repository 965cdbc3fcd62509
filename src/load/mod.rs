//! Load files: per-layer, per-logical-expert token counts ("loads"), one or more steps.
//!
//! Two users read them: `eplb-worker plan --load FILE` sums every step ([`LoadTrace::summed`]),
//! and `eplb-worker run --trace FILE` replays the steps one after another ([`LoadTrace::step`]).
//!
//! Formats, picked by extension:
//! * `.json`: an object whose first present key of `weight`, `counts`, `logical_count` holds
//!   `[layers][experts]` (one step) or `[steps][layers][experts]`;
//! * `.csv`: one row per layer, one column per expert, optional header (one step); or the
//!   per-iteration CSV (a header with `dataset`, `iteration`, `layer_idx`, then one column per
//!   expert), whose iterations of one dataset are the steps;
//! * `.npy`: `[layers, experts]` or `[steps, layers, experts]`, any integer or float dtype.
//!
//! Every step is `weight [layers, num_logical]` of `u64`. Integral values (floats like `123.0`
//! included) convert exactly. If any value is non-integral the whole trace is quantised to fixed
//! point with [`NONINTEGRAL_SCALE_BITS`] fractional bits, deterministically, so that every rank
//! reads the same integers.
//!
//! Nothing here panics on user data: every bad input is a [`LoadError`] naming the file, the
//! place in it and the offending value.

mod csv;
pub(crate) mod json;
mod npy;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use thiserror::Error;

/// Fractional bits used when a trace holds non-integral values: each value `v` becomes
/// `round(v * 2^NONINTEGRAL_SCALE_BITS)`.
pub(crate) const NONINTEGRAL_SCALE_BITS: u32 = 20;

/// The JSON keys that may hold the load, in order of preference.
pub(crate) const JSON_KEYS: [&str; 3] = ["weight", "counts", "logical_count"];

/// The file extensions [`read_trace`] understands.
pub(crate) const SUPPORTED_EXTENSIONS: [&str; 3] = ["json", "csv", "npy"];

/// `.json, .csv or .npy`, for messages.
fn supported_extensions() -> String {
    let dotted: Vec<String> = SUPPORTED_EXTENSIONS.iter().map(|e| format!(".{e}")).collect();
    match dotted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => dotted.join(""),
    }
}

/// Errors of reading a load file. Every message names the file; value errors also name the place
/// (CSV line and column, or `[step, layer, expert]`) and the value.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot read load file {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: unsupported file extension {ext}; load files must end in {}", .path.display(), supported_extensions())]
    UnsupportedExtension { path: PathBuf, ext: String },
    #[error("{}: {what}; a load needs at least one step, one layer and one expert", .path.display())]
    Empty { path: PathBuf, what: String },
    #[error("{}: not valid JSON: {source}", .path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: is a placement file (it has {key}; `eplb-worker plan --output` writes these), not a load: its logical_count is a replica count, not tokens; give a file of token counts (keys {})", .path.display(), JSON_KEYS.join(", "))]
    PlacementNotLoad { path: PathBuf, key: &'static str },
    #[error("{}: the JSON object has none of the keys {}; its keys are: {found}", .path.display(), JSON_KEYS.join(", "))]
    JsonMissingKey { path: PathBuf, found: String },
    #[error("{}: {location}: {detail}", .path.display())]
    Structure { path: PathBuf, location: String, detail: String },
    #[error("{}: {location} has {got} {what}, but {reference} has {expected}; every row must have the same length", .path.display())]
    Ragged { path: PathBuf, location: String, got: usize, what: &'static str, reference: String, expected: usize },
    #[error("{}: {location}: {text:?} is not a number", .path.display())]
    NotANumber { path: PathBuf, location: String, text: String },
    #[error("{}: {location}: negative count {value}; loads are token counts and must be >= 0", .path.display())]
    Negative { path: PathBuf, location: String, value: String },
    #[error("{}: {location}: count {value} is not finite", .path.display())]
    NotFinite { path: PathBuf, location: String, value: String },
    #[error("{}: {location}: overflowing count {value}: more than 2^64-1 tokens", .path.display())]
    Overflow { path: PathBuf, location: String, value: String },
    #[error("{}: {location}: overflowing count {value}: the file holds non-integral values, so every value is scaled by 2^{bits}, and {value} * 2^{bits} exceeds 2^64-1; scale the loads down or round them to integers", .path.display())]
    QuantisedOverflow { path: PathBuf, location: String, value: String, bits: u32 },
    #[error("{}: dataset {dataset:?} is not in the file; available datasets: {}", .path.display(), .available.join(", "))]
    UnknownDataset { path: PathBuf, dataset: String, available: Vec<String> },
    #[error("{}: a dataset ({dataset:?}) was selected, but only a per-iteration CSV has datasets, and this file is {format}; drop the dataset", .path.display())]
    DatasetNotApplicable { path: PathBuf, dataset: String, format: LoadFormat },
    #[error("{}: dataset {dataset:?}, iteration {iteration}: {detail}", .path.display())]
    IterationLayers { path: PathBuf, dataset: String, iteration: u64, detail: String },
    #[error("{}: not a readable .npy file: {detail}", .path.display())]
    Npy { path: PathBuf, detail: String },
    #[error("{}: .npy dtype {dtype} is not supported; use an integer (int8..int64, uint8..uint64) or float (float32, float64) array, e.g. arr.astype(numpy.int64)", .path.display())]
    NpyDtype { path: PathBuf, dtype: String },
    #[error("{}: .npy array has shape {shape:?}; expected 2 dimensions [layers, experts] or 3 dimensions [steps, layers, experts]", .path.display())]
    NpyDims { path: PathBuf, shape: Vec<u64> },
    #[error("{}: layer {layer} sums to {total} tokens {scope}, more than 2^64-1; the policy needs every layer total to fit in u64: scale the counts down", .path.display())]
    LayerSumOverflow { path: PathBuf, layer: usize, total: u128, scope: String },
    #[error("{}: step {step} does not exist; the trace has {num_steps} steps", .path.display())]
    StepOutOfRange { path: PathBuf, step: usize, num_steps: usize },
    #[error("{}: step {step} has shape {got:?}, but step 0 has {expected:?}; every step must have the same shape", .path.display())]
    StepShape { path: PathBuf, step: usize, got: (usize, usize), expected: (usize, usize) },
}

/// The format a load file was read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFormat {
    /// `.json` with a `weight`, `counts` or `logical_count` array.
    Json,
    /// `.csv`, one row per layer.
    Csv,
    /// `.csv` with `dataset`, `iteration`, `layer_idx` columns, one row per (dataset, iteration, layer).
    IterationCsv,
    /// `.npy`, 2 or 3 dimensions.
    Npy,
    /// The built-in drifting zipf-like load (no file).
    Synthetic,
}

impl fmt::Display for LoadFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoadFormat::Json => "JSON",
            LoadFormat::Csv => "CSV (one row per layer)",
            LoadFormat::IterationCsv => "per-iteration CSV",
            LoadFormat::Npy => ".npy",
            LoadFormat::Synthetic => "built-in synthetic load",
        })
    }
}

/// A load trace: one or more steps, each `[layers, num_logical]` token counts.
#[derive(Debug, Clone)]
pub struct LoadTrace {
    /// `steps[s] [layers, num_logical]`; every step has the same shape.
    pub steps: Vec<Array2<u64>>,
    pub path: PathBuf,
    pub format: LoadFormat,
    /// `Some(bits)` when the file held non-integral values and they were quantised to fixed point
    /// with `bits` fractional bits ([`NONINTEGRAL_SCALE_BITS`]); `None` when all values were integral.
    pub scale_bits: Option<u32>,
    /// For the per-iteration CSV: the dataset that was selected, and all datasets in the file.
    pub dataset: Option<String>,
    pub datasets: Vec<String>,
}

/// What to read from a file that holds more than one trace.
#[derive(Debug, Clone, Default)]
pub struct TraceSelect {
    /// The dataset of a per-iteration CSV; `None` takes the first in file order.
    pub dataset: Option<String>,
}

/// Reads a load file; the format comes from the extension (`.json`, `.csv`, `.npy`).
pub fn read_trace(path: &Path, select: &TraceSelect) -> Result<LoadTrace, LoadError> {
    parse_trace(path, None, select)
}

/// Parses the bytes of a load file named `path` (the extension picks the format; errors name
/// `path`), exactly as [`read_trace`] would read that file: the fuzz targets (`fuzz/`) feed it
/// arbitrary bytes, which must give a trace or a [`LoadError`], never a panic.
pub fn parse_trace_bytes(path: &Path, bytes: &[u8], select: &TraceSelect) -> Result<LoadTrace, LoadError> {
    parse_trace(path, Some(bytes), select)
}

/// [`read_trace`] on `bytes` when given, else on the file's contents (read after the extension
/// is checked, so that a bad extension is reported without touching the file).
fn parse_trace(path: &Path, given: Option<&[u8]>, select: &TraceSelect) -> Result<LoadTrace, LoadError> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let parse: fn(&Path, &[u8], &TraceSelect) -> Result<Parsed, LoadError> = match ext.as_deref() {
        Some("json") => |path, bytes, _| json::parse(path, bytes),
        Some("csv") => csv::parse,
        Some("npy") => |path, bytes, _| npy::parse(path, bytes),
        other => {
            return Err(LoadError::UnsupportedExtension {
                path: path.to_path_buf(),
                ext: other.map_or_else(|| "(none)".to_string(), |e| format!(".{e}")),
            })
        }
    };
    let read;
    let bytes = match given {
        Some(bytes) => bytes,
        None => {
            read = crate::input::read_regular(path, crate::input::MAX_TRACE_BYTES)
                .map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
            &read[..]
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(LoadError::Empty { path: path.to_path_buf(), what: "the file is empty".into() });
    }
    let parsed = parse(path, bytes, select)?;
    if parsed.format != LoadFormat::IterationCsv {
        if let Some(dataset) = &select.dataset {
            return Err(LoadError::DatasetNotApplicable {
                path: path.to_path_buf(),
                dataset: dataset.clone(),
                format: parsed.format,
            });
        }
    }
    let (steps, scale_bits) = finish(path, &parsed.grid)?;
    Ok(LoadTrace {
        steps,
        path: path.to_path_buf(),
        format: parsed.format,
        scale_bits,
        dataset: parsed.dataset,
        datasets: parsed.datasets,
    })
}

impl LoadTrace {
    pub fn num_layers(&self) -> usize {
        self.steps.first().map_or(0, |s| s.nrows())
    }

    pub fn num_logical(&self) -> usize {
        self.steps.first().map_or(0, |s| s.ncols())
    }

    pub fn num_steps(&self) -> usize {
        self.steps.len()
    }

    /// Sum over steps, `[layers, num_logical]`; an error if any layer's sum exceeds `u64::MAX`
    /// (the policy needs each layer's total to fit in u64).
    pub fn summed(&self) -> Result<Array2<u64>, LoadError> {
        let dim = self.common_dim()?;
        let mut totals = vec![0u128; dim.0];
        for step in &self.steps {
            for (total, row) in totals.iter_mut().zip(step.outer_iter()) {
                *total += row.iter().map(|&v| u128::from(v)).sum::<u128>();
            }
        }
        let scope = format!("summed over all {} steps", self.steps.len());
        self.check_totals(&totals, &scope)?;
        let mut out = Array2::<u64>::zeros(dim);
        for step in &self.steps {
            // Each entry is at most its layer's total, which fits: saturation never happens.
            out.iter_mut().zip(step.iter()).for_each(|(o, &v)| *o = o.saturating_add(v));
        }
        Ok(out)
    }

    /// One step, `[layers, num_logical]`, checked the same way (every layer total fits in u64).
    pub fn step(&self, i: usize) -> Result<Array2<u64>, LoadError> {
        let step = self.steps.get(i).ok_or_else(|| LoadError::StepOutOfRange {
            path: self.path.clone(),
            step: i,
            num_steps: self.steps.len(),
        })?;
        let totals: Vec<u128> = step.outer_iter().map(|row| row.iter().map(|&v| u128::from(v)).sum()).collect();
        self.check_totals(&totals, &format!("in step {i}"))?;
        Ok(step.clone())
    }

    /// The shape every step shares; an error when there is no step, an empty one, or two differ.
    fn common_dim(&self) -> Result<(usize, usize), LoadError> {
        let first = self
            .steps
            .first()
            .ok_or_else(|| LoadError::Empty { path: self.path.clone(), what: "the trace has no step".into() })?;
        let expected = first.dim();
        if expected.0 == 0 || expected.1 == 0 {
            return Err(LoadError::Empty {
                path: self.path.clone(),
                what: format!("the trace has {} layers x {} experts", expected.0, expected.1),
            });
        }
        for (step, s) in self.steps.iter().enumerate() {
            if s.dim() != expected {
                return Err(LoadError::StepShape { path: self.path.clone(), step, got: s.dim(), expected });
            }
        }
        Ok(expected)
    }

    fn check_totals(&self, totals: &[u128], scope: &str) -> Result<(), LoadError> {
        match totals.iter().position(|&t| t > u128::from(u64::MAX)) {
            Some(layer) => Err(LoadError::LayerSumOverflow {
                path: self.path.clone(),
                layer,
                total: totals.get(layer).copied().unwrap_or_default(),
                scope: scope.to_string(),
            }),
            None => Ok(()),
        }
    }
}

/// One value as read, before validation.
#[derive(Debug, Clone, Copy)]
enum Raw {
    /// A non-negative integer.
    U(u64),
    /// A negative integer (always an error, kept to report it exactly).
    Neg(i64),
    /// A float, not yet checked.
    F(f64),
}

impl fmt::Display for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Raw::U(v) => write!(f, "{v}"),
            Raw::Neg(v) => write!(f, "{v}"),
            // Large floats in scientific notation: 1e20, not 100000000000000000000.
            Raw::F(v) if v.abs() >= 1e16 => write!(f, "{v:e}"),
            Raw::F(v) => write!(f, "{v}"),
        }
    }
}

/// How to name the place of value `k` (flat, step-major then layer then expert).
#[derive(Debug)]
enum Locator {
    /// JSON or npy: `prefix [step s, layer l, expert e]` (no step for a one-step file).
    Index { prefix: String, three_d: bool },
    /// CSV: `line L, column C`, with the line of each `(step, layer)` row and the 0-based column of
    /// expert 0.
    Csv { lines: Vec<usize>, first_col: usize },
}

/// Values of every step, flat in `[steps, layers, experts]` order, with how to name their places.
#[derive(Debug)]
struct Grid {
    steps: usize,
    layers: usize,
    experts: usize,
    values: Vec<Raw>,
    locator: Locator,
}

impl Grid {
    fn location(&self, k: usize) -> String {
        let experts = self.experts.max(1);
        let layers = self.layers.max(1);
        let expert = k % experts;
        let row = k / experts;
        match &self.locator {
            Locator::Index { prefix, three_d } => {
                let (step, layer) = (row / layers, row % layers);
                let sep = if prefix.is_empty() { "" } else { " " };
                if *three_d {
                    format!("{prefix}{sep}[step {step}, layer {layer}, expert {expert}]")
                } else {
                    format!("{prefix}{sep}[layer {layer}, expert {expert}]")
                }
            }
            Locator::Csv { lines, first_col } => match lines.get(row) {
                Some(line) => format!("line {line}, column {} (expert {expert})", first_col + expert + 1),
                None => format!("row {row}, expert {expert}"),
            },
        }
    }
}

/// What a format parser hands back.
#[derive(Debug)]
struct Parsed {
    grid: Grid,
    format: LoadFormat,
    dataset: Option<String>,
    datasets: Vec<String>,
}

/// 2^64 as f64: every float at or above it overflows u64.
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

/// Validates every value and converts the grid to steps of u64, quantising the whole trace when
/// any value is non-integral.
fn finish(path: &Path, grid: &Grid) -> Result<(Vec<Array2<u64>>, Option<u32>), LoadError> {
    if grid.steps == 0 || grid.layers == 0 || grid.experts == 0 {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
            what: format!("{} steps x {} layers x {} experts", grid.steps, grid.layers, grid.experts),
        });
    }
    let err = |k: usize, v: &Raw, make: fn(PathBuf, String, String) -> LoadError| {
        make(path.to_path_buf(), grid.location(k), v.to_string())
    };
    let mut nonintegral = false;
    for (k, v) in grid.values.iter().enumerate() {
        match *v {
            Raw::U(_) => {}
            Raw::Neg(_) => {
                return Err(err(k, v, |path, location, value| LoadError::Negative { path, location, value }))
            }
            Raw::F(f) if !f.is_finite() => {
                return Err(err(k, v, |path, location, value| LoadError::NotFinite { path, location, value }))
            }
            Raw::F(f) if f < 0.0 => {
                return Err(err(k, v, |path, location, value| LoadError::Negative { path, location, value }))
            }
            Raw::F(f) if f >= TWO_POW_64 => {
                return Err(err(k, v, |path, location, value| LoadError::Overflow { path, location, value }))
            }
            Raw::F(f) => nonintegral |= f.fract() != 0.0,
        }
    }
    let bits = if nonintegral { NONINTEGRAL_SCALE_BITS } else { 0 };
    let scale = 1u64 << bits;
    let scale_f = scale as f64; // a power of two: exact, and so is multiplying by it
    let mut out = Vec::with_capacity(grid.values.len());
    for (k, v) in grid.values.iter().enumerate() {
        let converted = match *v {
            Raw::U(u) => u.checked_mul(scale),
            Raw::F(f) => {
                let scaled = (f * scale_f).round();
                // `f` is finite, >= 0 (or -0.0) and, unscaled, below 2^64: the cast is exact.
                (scaled < TWO_POW_64).then_some(scaled as u64)
            }
            Raw::Neg(_) => None,
        };
        match converted {
            Some(c) => out.push(c),
            None => {
                return Err(LoadError::QuantisedOverflow {
                    path: path.to_path_buf(),
                    location: grid.location(k),
                    value: v.to_string(),
                    bits,
                })
            }
        }
    }
    if nonintegral {
        log::warn!(
            "{}: the load holds non-integral values; every value was scaled by 2^{NONINTEGRAL_SCALE_BITS} and \
             rounded to an integer (scale_bits = {NONINTEGRAL_SCALE_BITS})",
            path.display()
        );
    }
    let per_step = grid.layers * grid.experts;
    let steps = out
        .chunks(per_step)
        .map(|chunk| {
            let mut step = Array2::<u64>::zeros((grid.layers, grid.experts));
            step.iter_mut().zip(chunk).for_each(|(dst, &src)| *dst = src);
            step
        })
        .collect::<Vec<_>>();
    if steps.len() != grid.steps || grid.steps.checked_mul(per_step) != Some(out.len()) {
        return Err(LoadError::Structure {
            path: path.to_path_buf(),
            location: "whole file".into(),
            detail: format!(
                "read {} values, expected {} steps x {} layers x {} experts",
                out.len(),
                grid.steps,
                grid.layers,
                grid.experts
            ),
        });
    }
    Ok((steps, nonintegral.then_some(NONINTEGRAL_SCALE_BITS)))
}

/// The shared data folder (`$EPLB_SHARED`, else `<crate>/../shared`), for tests that read the real
/// traces. `None`, after printing `SKIPPED: <what>`, when it is absent, unless
/// `EPLB_REQUIRE_SHARED=1`, which makes its absence a test failure. Unit and integration tests
/// (`tests/common`) both use it.
#[doc(hidden)]
pub fn shared_dir_or_skip(what: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("EPLB_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")));
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("EPLB_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("{what}: the shared folder {} is absent and EPLB_REQUIRE_SHARED=1", dir.display());
    }
    println!("SKIPPED: {what}: the shared folder {} is absent (set EPLB_SHARED)", dir.display());
    None
}

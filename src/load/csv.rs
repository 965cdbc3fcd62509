//! CSV load files: one row per layer (one step), or the per-iteration CSV
//! (`[index,]dataset,iteration,layer_idx,<expert 0>,<expert 1>,...`, one row per dataset, iteration
//! and layer, in any order).

use std::collections::BTreeMap;
use std::path::Path;

use super::{Grid, LoadError, LoadFormat, Locator, Parsed, Raw, TraceSelect};

/// The columns that mark a per-iteration CSV.
const ITERATION_COLUMNS: [&str; 3] = ["dataset", "iteration", "layer_idx"];

/// A field, trimmed and without surrounding double quotes.
fn clean(field: &str) -> &str {
    let f = field.trim();
    f.strip_prefix('"').and_then(|g| g.strip_suffix('"')).map_or(f, str::trim)
}

fn fields(line: &str) -> Vec<&str> {
    line.split(',').map(clean).collect()
}

/// Parses one count; `None` when the text is not a number at all.
fn number(text: &str) -> Option<Raw> {
    if let Ok(u) = text.parse::<u64>() {
        return Some(Raw::U(u));
    }
    if let Ok(i) = text.parse::<i64>() {
        // u64 failed, so it is negative (or "-0").
        return Some(if i < 0 { Raw::Neg(i) } else { Raw::U(0) });
    }
    text.parse::<f64>().ok().map(Raw::F)
}

/// Non-blank lines with their 1-based numbers.
fn lines(path: &Path, bytes: &[u8]) -> Result<Vec<(usize, String)>, LoadError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let valid = bytes.get(..e.valid_up_to()).unwrap_or_default();
        let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
        LoadError::Structure {
            path: path.to_path_buf(),
            location: format!("line {line}"),
            detail: "is not valid UTF-8; save the CSV as UTF-8 text".into(),
        }
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    Ok(text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| (i + 1, l.to_string())).collect())
}

pub(super) fn parse(path: &Path, bytes: &[u8], select: &TraceSelect) -> Result<Parsed, LoadError> {
    let lines = lines(path, bytes)?;
    let Some((first_no, first)) = lines.first() else {
        return Err(LoadError::Empty { path: path.to_path_buf(), what: "the file is empty".into() });
    };
    let header = fields(first);
    let present: Vec<&str> = ITERATION_COLUMNS.iter().copied().filter(|c| header.contains(c)).collect();
    if present.len() == ITERATION_COLUMNS.len() {
        return parse_iterations(path, &lines, select);
    }
    // A header is a row with no number in it; a row with some numbers is data, and anything
    // non-numeric in it is an error below (`0x10`, `1O`), never a silently dropped row.
    let is_header = header.iter().all(|f| number(f).is_none());
    if !present.is_empty() {
        let missing: Vec<&str> = ITERATION_COLUMNS.iter().copied().filter(|c| !header.contains(c)).collect();
        return Err(LoadError::Structure {
            path: path.to_path_buf(),
            location: format!("line {first_no} (header)"),
            detail: format!(
                "has the column(s) {} but not {}; a per-iteration CSV needs all of {}",
                present.join(", "),
                missing.join(", "),
                ITERATION_COLUMNS.join(", ")
            ),
        });
    }
    if header.len() > 1 && header.first().is_some_and(|f| f.is_empty()) {
        return Err(LoadError::Structure {
            path: path.to_path_buf(),
            location: format!("line {first_no}, column 1"),
            detail: "the first field of the first row is empty, as pandas writes for its index column, which \
                     would be read as an expert; save with to_csv(index=False), or drop the first column"
                .into(),
        });
    }
    parse_rows(path, if is_header { lines.get(1..).unwrap_or_default() } else { &lines })
}

/// One row per layer, one column per expert.
fn parse_rows(path: &Path, rows: &[(usize, String)]) -> Result<Parsed, LoadError> {
    let Some((ref_line, ref_row)) = rows.first() else {
        return Err(LoadError::Empty { path: path.to_path_buf(), what: "the CSV has a header but no data row".into() });
    };
    let expected = fields(ref_row).len();
    let mut values = Vec::with_capacity(rows.len() * expected);
    let mut line_of_row = Vec::with_capacity(rows.len());
    for (line_no, line) in rows {
        let f = fields(line);
        if f.len() != expected {
            return Err(LoadError::Ragged {
                path: path.to_path_buf(),
                location: format!("line {line_no}"),
                got: f.len(),
                what: "fields",
                reference: format!("line {ref_line}"),
                expected,
            });
        }
        for (col, text) in f.iter().enumerate() {
            values.push(parse_value(path, *line_no, col, text)?);
        }
        line_of_row.push(*line_no);
    }
    Ok(Parsed {
        grid: Grid {
            steps: 1,
            layers: rows.len(),
            experts: expected,
            values,
            locator: Locator::Csv { lines: line_of_row, first_col: 0 },
        },
        format: LoadFormat::Csv,
        dataset: None,
        datasets: Vec::new(),
    })
}

fn parse_value(path: &Path, line: usize, col: usize, text: &str) -> Result<Raw, LoadError> {
    number(text).ok_or_else(|| {
        let location = format!("line {line}, column {}", col + 1);
        if text.is_empty() {
            LoadError::Structure {
                path: path.to_path_buf(),
                location,
                detail: "empty field (a trailing or doubled comma?)".into(),
            }
        } else {
            LoadError::NotANumber { path: path.to_path_buf(), location, text: text.to_string() }
        }
    })
}

/// The per-iteration CSV: rows grouped by (dataset, iteration); the selected dataset's iterations,
/// ascending, are the steps, and its `layer_idx` values, ascending, the layers.
fn parse_iterations(path: &Path, lines: &[(usize, String)], select: &TraceSelect) -> Result<Parsed, LoadError> {
    let Some(((header_no, header_line), rows)) = lines.split_first() else {
        return Err(LoadError::Empty { path: path.to_path_buf(), what: "the file is empty".into() });
    };
    if rows.is_empty() {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
            what: "the per-iteration CSV has a header but no data row".into(),
        });
    }
    let header = fields(header_line);
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_default();
    let (c_dataset, c_iteration, c_layer) = (col("dataset"), col("iteration"), col("layer_idx"));
    let first_expert = c_layer + 1;
    let experts = header.len().saturating_sub(first_expert);
    if experts == 0 {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
            what: format!("the header (line {header_no}) has no expert column after layer_idx"),
        });
    }
    if c_dataset > c_layer || c_iteration > c_layer {
        return Err(LoadError::Structure {
            path: path.to_path_buf(),
            location: format!("line {header_no} (header)"),
            detail: "the columns dataset and iteration must come before layer_idx; every column after layer_idx is an expert"
                .into(),
        });
    }

    let mut datasets: Vec<String> = Vec::new();
    let mut selected: Option<String> = select.dataset.clone();
    // iteration -> layer_idx -> (line, values of the row's experts)
    let mut table: BTreeMap<u64, BTreeMap<u64, (usize, Vec<Raw>)>> = BTreeMap::new();
    for (line_no, line) in rows {
        let f = fields(line);
        if f.len() != header.len() {
            return Err(LoadError::Ragged {
                path: path.to_path_buf(),
                location: format!("line {line_no}"),
                got: f.len(),
                what: "fields",
                reference: format!("the header (line {header_no})"),
                expected: header.len(),
            });
        }
        let get = |c: usize| f.get(c).copied().unwrap_or_default();
        let dataset = get(c_dataset);
        if !datasets.iter().any(|d| d == dataset) {
            datasets.push(dataset.to_string());
        }
        let selected = selected.get_or_insert_with(|| dataset.to_string());
        if dataset != selected.as_str() {
            continue;
        }
        let index = |c: usize, name: &str| {
            let text = get(c);
            text.parse::<u64>().map_err(|_| LoadError::Structure {
                path: path.to_path_buf(),
                location: format!("line {line_no}, column {}", c + 1),
                detail: format!("{name} {text:?} is not a non-negative integer"),
            })
        };
        let iteration = index(c_iteration, "iteration")?;
        let layer = index(c_layer, "layer_idx")?;
        let mut values = Vec::with_capacity(experts);
        for (c, text) in f.iter().enumerate().skip(first_expert) {
            values.push(parse_value(path, *line_no, c, text)?);
        }
        let layers = table.entry(iteration).or_default();
        if let Some((other, _)) = layers.get(&layer) {
            return Err(LoadError::IterationLayers {
                path: path.to_path_buf(),
                dataset: selected.clone(),
                iteration,
                detail: format!(
                    "layer_idx {layer} appears twice (lines {other} and {line_no}); each layer needs exactly one row"
                ),
            });
        }
        layers.insert(layer, (*line_no, values));
    }

    let Some(selected) = selected else {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
            what: "the per-iteration CSV has a header but no data row".into(),
        });
    };
    if !datasets.contains(&selected) {
        return Err(LoadError::UnknownDataset { path: path.to_path_buf(), dataset: selected, available: datasets });
    }
    let all_layers: std::collections::BTreeSet<u64> = table.values().flat_map(|l| l.keys().copied()).collect();
    let mut values = Vec::with_capacity(table.len() * all_layers.len() * experts);
    let mut line_of_row = Vec::with_capacity(table.len() * all_layers.len());
    for (&iteration, layers) in &table {
        if let Some(missing) = all_layers.iter().find(|l| !layers.contains_key(l)) {
            let known: Vec<String> = all_layers.iter().map(u64::to_string).collect();
            return Err(LoadError::IterationLayers {
                path: path.to_path_buf(),
                dataset: selected,
                iteration,
                detail: format!(
                    "has no row for layer_idx {missing}; every iteration needs one row for each of the layers {}",
                    known.join(", ")
                ),
            });
        }
        for (line_no, row) in layers.values() {
            values.extend_from_slice(row);
            line_of_row.push(*line_no);
        }
    }
    Ok(Parsed {
        grid: Grid {
            steps: table.len(),
            layers: all_layers.len(),
            experts,
            values,
            locator: Locator::Csv { lines: line_of_row, first_col: first_expert },
        },
        format: LoadFormat::IterationCsv,
        dataset: Some(selected),
        datasets,
    })
}

//! JSON load files: `{"weight" | "counts" | "logical_count": [layers][experts] or [steps][layers][experts]}`.

use std::path::Path;

use serde_json::Value;

use super::{Grid, LoadError, LoadFormat, Locator, Parsed, Raw, JSON_KEYS};

/// What a JSON value is, for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed, LoadError> {
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|source| LoadError::Json { path: path.to_path_buf(), source })?;
    let structure =
        |location: String, detail: String| LoadError::Structure { path: path.to_path_buf(), location, detail };
    let Value::Object(obj) = &doc else {
        return Err(structure(
            "top level".into(),
            format!("{} where an object with one of the keys {} was expected", kind(&doc), JSON_KEYS.join(", ")),
        ));
    };
    let Some((key, value)) = JSON_KEYS.iter().find_map(|k| obj.get(*k).map(|v| (*k, v))) else {
        let mut found: Vec<&str> = obj.keys().map(String::as_str).collect();
        found.sort_unstable();
        let found = if found.is_empty() { "(none)".to_string() } else { found.join(", ") };
        return Err(LoadError::JsonMissingKey { path: path.to_path_buf(), found });
    };
    let name = format!("`{key}`");
    let Value::Array(outer) = value else {
        return Err(structure(
            name,
            format!("is {}, expected an array [layers][experts] or [steps][layers][experts]", kind(value)),
        ));
    };
    let empty = |what: String| LoadError::Empty { path: path.to_path_buf(), what };
    let Some(first) = outer.first() else {
        return Err(empty(format!("{name} is an empty array")));
    };
    // The depth comes from the first element: [[n, ...], ...] is one step, [[[n, ...], ...], ...] several.
    let three_d = match first {
        Value::Array(layer0) => match layer0.first() {
            Some(Value::Array(_)) => true,
            Some(_) => false,
            None => return Err(empty(format!("{name} [0] is an empty array"))),
        },
        other => {
            return Err(structure(
                format!("{name} [0]"),
                format!("is {}, expected an array (of experts, or of layers)", kind(other)),
            ))
        }
    };
    let step_arrays: Vec<(Option<usize>, &Vec<Value>)> = if three_d {
        let mut steps = Vec::with_capacity(outer.len());
        for (s, step) in outer.iter().enumerate() {
            match step {
                Value::Array(layers) => steps.push((Some(s), layers)),
                other => {
                    return Err(structure(
                        format!("{name} [step {s}]"),
                        format!("is {}, expected an array of layers", kind(other)),
                    ))
                }
            }
        }
        steps
    } else {
        vec![(None, outer)]
    };

    let mut values = Vec::new();
    let mut shape: Option<(usize, usize)> = None; // (layers, experts) of the first step
    for (step, layers) in &step_arrays {
        let step_label = step.map_or_else(String::new, |s| format!("step {s}, "));
        let step_only = step.map_or_else(String::new, |s| format!(" [step {s}]"));
        if layers.is_empty() {
            return Err(empty(format!("{name}{step_only} has no layer")));
        }
        for (l, layer) in layers.iter().enumerate() {
            let Value::Array(experts) = layer else {
                return Err(structure(
                    format!("{name} [{step_label}layer {l}]"),
                    format!("is {}, expected an array of expert counts", kind(layer)),
                ));
            };
            if experts.is_empty() {
                return Err(empty(format!("{name} [{step_label}layer {l}] has no expert")));
            }
            match shape {
                None => shape = Some((layers.len(), experts.len())),
                Some((nl, ne)) => {
                    if layers.len() != nl {
                        return Err(LoadError::Ragged {
                            path: path.to_path_buf(),
                            location: format!("{name}{step_only}"),
                            got: layers.len(),
                            what: "layers",
                            reference: format!("{name} [step 0]"),
                            expected: nl,
                        });
                    }
                    if experts.len() != ne {
                        let first_label = if step.is_some() { "step 0, layer 0" } else { "layer 0" };
                        return Err(LoadError::Ragged {
                            path: path.to_path_buf(),
                            location: format!("{name} [{step_label}layer {l}]"),
                            got: experts.len(),
                            what: "experts",
                            reference: format!("{name} [{first_label}]"),
                            expected: ne,
                        });
                    }
                }
            }
            for (e, v) in experts.iter().enumerate() {
                let location = || format!("{name} [{step_label}layer {l}, expert {e}]");
                let raw = match v {
                    Value::Number(n) => {
                        if let Some(u) = n.as_u64() {
                            Raw::U(u)
                        } else if let Some(i) = n.as_i64() {
                            Raw::Neg(i)
                        } else if let Some(f) = n.as_f64() {
                            Raw::F(f)
                        } else {
                            return Err(LoadError::NotANumber {
                                path: path.to_path_buf(),
                                location: location(),
                                text: n.to_string(),
                            });
                        }
                    }
                    other => {
                        return Err(structure(location(), format!("is {}, expected a number", kind(other))));
                    }
                };
                values.push(raw);
            }
        }
    }
    let (layers, experts) = shape.unwrap_or((0, 0));
    Ok(Parsed {
        grid: Grid {
            steps: step_arrays.len(),
            layers,
            experts,
            values,
            locator: Locator::Index { prefix: name, three_d },
        },
        format: LoadFormat::Json,
        dataset: None,
        datasets: Vec::new(),
    })
}

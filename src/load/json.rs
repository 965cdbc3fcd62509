//! JSON load files: `{"weight" | "counts" | "logical_count": [layers][experts] or [steps][layers][experts]}`.

use std::fmt;
use std::path::Path;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

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

/// A JSON value read strictly: an object with the same key twice is an error (serde_json keeps
/// the last one without a word, so `{"counts": A, "counts": B}` would silently lose A).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_none<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(Strict(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Strict(Value::Array(v)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut m = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if m.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "the key {key:?} appears twice in one object; keep one of them"
                )));
            }
            let Strict(v) = map.next_value()?;
            m.insert(key, v);
        }
        Ok(Strict(Value::Object(m)))
    }
}

/// Parses JSON strictly: a duplicate key in any object is an error, with its line and column.
pub(crate) fn from_slice_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Strict>(bytes).map(|s| s.0)
}

/// The keys that mark a placement file (`plan --output`, SGLang's --init-expert-location).
const PLACEMENT_KEYS: [&str; 2] = ["physical_to_logical_map", "logical_to_physical_map"];

pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed, LoadError> {
    let doc: Value = from_slice_strict(bytes).map_err(|source| LoadError::Json { path: path.to_path_buf(), source })?;
    let structure =
        |location: String, detail: String| LoadError::Structure { path: path.to_path_buf(), location, detail };
    // A bare array is the counts themselves; an object holds them under one of JSON_KEYS.
    let (name, value) = match &doc {
        Value::Array(_) => ("the top-level array".to_string(), &doc),
        Value::Object(obj) => {
            if let Some(key) = PLACEMENT_KEYS.iter().find(|k| obj.contains_key(**k)) {
                return Err(LoadError::PlacementNotLoad { path: path.to_path_buf(), key });
            }
            let Some((key, value)) = JSON_KEYS.iter().find_map(|k| obj.get(*k).map(|v| (*k, v))) else {
                let mut found: Vec<&str> = obj.keys().map(String::as_str).collect();
                found.sort_unstable();
                let found = if found.is_empty() { "(none)".to_string() } else { found.join(", ") };
                return Err(LoadError::JsonMissingKey { path: path.to_path_buf(), found });
            };
            (format!("`{key}`"), value)
        }
        other => {
            return Err(structure(
                "top level".into(),
                format!(
                    "{} where an array [layers][experts] or an object with one of the keys {} was expected",
                    kind(other),
                    JSON_KEYS.join(", ")
                ),
            ))
        }
    };
    let Value::Array(outer) = value else {
        return Err(structure(
            name,
            format!("is {}, expected an array [layers][experts] or [steps][layers][experts]", kind(value)),
        ));
    };
    let empty = |what: String| LoadError::Empty { path: path.to_path_buf(), what };
    // `got` layers or experts at `location` where the first step or layer, `reference`, has `expected`.
    let ragged = |location: String, got: usize, what: &'static str, reference: String, expected: usize| {
        LoadError::Ragged { path: path.to_path_buf(), location, got, what, reference, expected }
    };
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
                        let location = format!("{name}{step_only}");
                        return Err(ragged(location, layers.len(), "layers", format!("{name} [step 0]"), nl));
                    }
                    if experts.len() != ne {
                        let first_label = if step.is_some() { "step 0, layer 0" } else { "layer 0" };
                        let location = format!("{name} [{step_label}layer {l}]");
                        return Err(ragged(location, experts.len(), "experts", format!("{name} [{first_label}]"), ne));
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

//! `.npy` load files: `[layers, experts]` or `[steps, layers, experts]`, any integer or float
//! dtype, either byte order, C or Fortran order.

use std::path::Path;

use ndarray::{ArrayD, IxDyn, ShapeBuilder};
use npyz::{DType, NpyFile, Order, TypeChar};

use super::{Grid, LoadError, LoadFormat, Locator, Parsed, Raw};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Deepest bracket nesting accepted in the header: real headers nest 2 deep (`{'shape': (2, 3)}`),
/// 4 with a record dtype (`{'descr': [('a', '<f4', (2,))]}`, refused later as not a plain dtype).
/// npyz's header parser (py_literal's grammar) backtracks in time exponential in the nesting depth:
/// fuzzing found a 140-byte header of 13 unclosed `{` that did not finish in a minute, and 16
/// balanced levels took 18 s; at 4 levels every header parses in milliseconds.
const MAX_HEADER_NESTING: usize = 4;

/// Checks what npyz would trust blindly: the preamble, the header length, the nesting depth, and a
/// shape whose element count overflows u64 (npyz multiplies the dimensions unchecked). Returns the
/// offset of the data.
fn precheck(path: &Path, bytes: &[u8]) -> Result<usize, LoadError> {
    let bad = |detail: String| LoadError::Npy { path: path.to_path_buf(), detail };
    if bytes.get(..MAGIC.len()) != Some(MAGIC) {
        return Err(bad("the file does not start with the .npy magic \\x93NUMPY; write it with numpy.save".into()));
    }
    let major = bytes.get(6).copied().ok_or_else(|| bad("the file ends inside the preamble".into()))?;
    let (len_bytes, text_start) = match major {
        1 => (2, 10),
        2 | 3 => (4, 12),
        v => return Err(bad(format!("unknown .npy format version {v}"))),
    };
    let len_field = bytes.get(8..8 + len_bytes).ok_or_else(|| bad("the file ends inside the preamble".into()))?;
    let header_len = len_field.iter().rev().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    let text = bytes.get(text_start..text_start + header_len).ok_or_else(|| {
        bad(format!(
            "the header claims {header_len} bytes, but the file has only {} after the preamble",
            bytes.len().saturating_sub(text_start)
        ))
    })?;
    let text = String::from_utf8_lossy(text);
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_HEADER_NESTING {
                    return Err(bad(format!("the header nests brackets more than {MAX_HEADER_NESTING} deep")));
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    // numpy writes `'shape': (d0, d1, ...)` with plain decimal integers; anything else is refused
    // here rather than left to npyz, whose unchecked arithmetic would have to be trusted with it.
    let dims = header_shape(&text).ok_or_else(|| {
        bad(format!("the header has no 'shape': (...) entry of decimal integers: {:?}", text.trim_end()))
    })?;
    // npyz multiplies the dimensions left to right (and forms partial products for the strides),
    // which overflows before reaching a 0 dimension; such a file is empty anyway.
    if dims.contains(&0) {
        return Err(LoadError::Empty { path: path.to_path_buf(), what: format!("the .npy array has shape {dims:?}") });
    }
    if dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).is_none() {
        return Err(bad(format!("the shape {dims:?} has more than 2^64 elements")));
    }
    Ok(text_start + header_len)
}

/// The integers of the header's `'shape': (...)` entry, when it reads as one of plain decimals.
fn header_shape(text: &str) -> Option<Vec<u64>> {
    let mut entries = ["'shape'", "\"shape\""].into_iter().flat_map(|key| {
        text.match_indices(key).filter_map(move |(i, _)| {
            let rest = text.get(i + key.len()..)?.trim_start();
            rest.strip_prefix(':').map(str::trim_start)
        })
    });
    let start = entries.next()?;
    if entries.next().is_some() {
        return None; // a repeated key: which one npyz would take is not ours to guess
    }
    let close = match start.chars().next()? {
        '(' => ')',
        '[' => ']',
        _ => return None,
    };
    let inner = start.get(1..)?;
    let inner = inner.get(..inner.find(close)?)?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| if s.bytes().all(|b| b.is_ascii_digit()) { s.parse::<u64>().ok() } else { None })
        .collect()
}

pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed, LoadError> {
    let data_offset = precheck(path, bytes)?;
    let npy = NpyFile::new(bytes).map_err(|e| LoadError::Npy { path: path.to_path_buf(), detail: e.to_string() })?;
    let shape = npy.shape().to_vec();
    let dtype = npy.dtype();
    let DType::Plain(ts) = &dtype else {
        return Err(LoadError::NpyDtype { path: path.to_path_buf(), dtype: dtype.descr() });
    };
    if shape.len() != 2 && shape.len() != 3 {
        return Err(LoadError::NpyDims { path: path.to_path_buf(), shape });
    }
    if shape.contains(&0) {
        return Err(LoadError::Empty { path: path.to_path_buf(), what: format!("the .npy array has shape {shape:?}") });
    }
    let dims: Vec<usize> = shape.iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect();
    let count = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let item = ts.num_bytes().unwrap_or(usize::MAX);
    let needed = count.and_then(|c| c.checked_mul(item));
    let available = bytes.len().saturating_sub(data_offset);
    match needed {
        Some(n) if n <= available => {}
        _ => {
            return Err(LoadError::Npy {
                path: path.to_path_buf(),
                detail: format!(
                    "shape {shape:?} of {} needs {} data bytes, but the file holds {available}; the file is truncated",
                    dtype.descr(),
                    needed.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string())
                ),
            })
        }
    }
    let order = npy.order();
    let unsupported = || LoadError::NpyDtype { path: path.to_path_buf(), dtype: dtype.descr() };
    let flat = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Int, 1) => read::<i8>(path, npy, |v| signed(v.into()))?,
        (TypeChar::Int, 2) => read::<i16>(path, npy, |v| signed(v.into()))?,
        (TypeChar::Int, 4) => read::<i32>(path, npy, |v| signed(v.into()))?,
        (TypeChar::Int, 8) => read::<i64>(path, npy, signed)?,
        (TypeChar::Uint, 1) => read::<u8>(path, npy, |v| Raw::U(v.into()))?,
        (TypeChar::Uint, 2) => read::<u16>(path, npy, |v| Raw::U(v.into()))?,
        (TypeChar::Uint, 4) => read::<u32>(path, npy, |v| Raw::U(v.into()))?,
        (TypeChar::Uint, 8) => read::<u64>(path, npy, Raw::U)?,
        (TypeChar::Float, 4) => read::<f32>(path, npy, |v| Raw::F(v.into()))?,
        (TypeChar::Float, 8) => read::<f64>(path, npy, Raw::F)?,
        _ => return Err(unsupported()),
    };
    // Values come in file order; put them in logical ([steps, layers, experts], row-major) order.
    let values: Vec<Raw> = match order {
        Order::C => flat,
        Order::Fortran => ArrayD::from_shape_vec(IxDyn(&dims).f(), flat)
            .map_err(|e| LoadError::Npy { path: path.to_path_buf(), detail: e.to_string() })?
            .iter()
            .copied()
            .collect(),
    };
    let three_d = dims.len() == 3;
    let (steps, layers, experts) = match *dims.as_slice() {
        [l, e] => (1, l, e),
        [s, l, e] => (s, l, e),
        _ => return Err(LoadError::NpyDims { path: path.to_path_buf(), shape }),
    };
    Ok(Parsed {
        grid: Grid { steps, layers, experts, values, locator: Locator::Index { prefix: String::new(), three_d } },
        format: LoadFormat::Npy,
        dataset: None,
        datasets: Vec::new(),
    })
}

fn signed(v: i64) -> Raw {
    u64::try_from(v).map_or(Raw::Neg(v), Raw::U)
}

/// Reads every element as `T` (npyz handles the byte order) and converts it.
fn read<T: npyz::Deserialize>(
    path: &Path,
    npy: NpyFile<&[u8]>,
    conv: impl Fn(T) -> Raw,
) -> Result<Vec<Raw>, LoadError> {
    let err = |detail: String| LoadError::Npy { path: path.to_path_buf(), detail };
    let reader = npy.data::<T>().map_err(|e| err(e.to_string()))?;
    let mut out = Vec::with_capacity(usize::try_from(reader.len()).unwrap_or(0));
    for v in reader {
        out.push(conv(v.map_err(|e| err(format!("reading the data: {e}")))?));
    }
    Ok(out)
}

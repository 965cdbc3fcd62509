use std::path::{Path, PathBuf};

use ndarray::{arr2, Array2};

use super::*;

/// A fresh path in this process's temp folder.
fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("eplb-load-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write(name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = tmp(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn read(path: &Path) -> LoadTrace {
    read_trace(path, &TraceSelect::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// The error of reading `path`, after checking that its message names the file.
fn read_err(path: &Path, select: &TraceSelect) -> LoadError {
    let err = read_trace(path, select).expect_err("the file should not load");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "message does not name the file: {msg}");
    err
}

fn err_of(name: &str, contents: impl AsRef<[u8]>) -> (LoadError, String) {
    let path = write(name, contents);
    let err = read_err(&path, &TraceSelect::default());
    let msg = err.to_string();
    (err, msg)
}

/// A version-1.0 .npy file: magic, version, header dict padded to 64 bytes, data.
fn npy(descr: &str, fortran: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape_text = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let order = if fortran { "True" } else { "False" };
    npy_raw(&format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape_text}, }}"), data)
}

/// A version-1.0 .npy file with the header dict `dict`.
fn npy_raw(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

// ---------------------------------------------------------------- JSON

#[test]
fn json_2d_each_key() {
    for key in JSON_KEYS {
        let path = write(&format!("key_{key}.json"), format!(r#"{{"other": 1, "{key}": [[1, 2, 3], [4, 5, 6]]}}"#));
        let t = read(&path);
        assert_eq!(t.format, LoadFormat::Json);
        assert_eq!((t.num_steps(), t.num_layers(), t.num_logical()), (1, 2, 3));
        assert_eq!(t.steps[0], arr2(&[[1, 2, 3], [4, 5, 6]]));
        assert_eq!(t.scale_bits, None);
        assert_eq!(t.dataset, None);
        assert!(t.datasets.is_empty());
        assert_eq!(t.path, path);
    }
    // The first present key wins.
    let t = read(&write("key_order.json", r#"{"logical_count": [[9]], "counts": [[7]], "weight": [[5]]}"#));
    assert_eq!(t.steps[0], arr2(&[[5]]));
    let t = read(&write("key_order2.json", r#"{"logical_count": [[9]], "counts": [[7]]}"#));
    assert_eq!(t.steps[0], arr2(&[[7]]));
}

#[test]
fn json_a_bare_array_is_the_counts() {
    let t = read(&write("bare2d.json", "[[1, 2, 3], [4, 5, 6]]"));
    assert_eq!((t.num_steps(), t.num_layers(), t.num_logical()), (1, 2, 3));
    assert_eq!(t.steps[0], arr2(&[[1, 2, 3], [4, 5, 6]]));
    let t = read(&write("bare3d.json", "[[[1, 2]], [[3, 4]]]"));
    assert_eq!((t.num_steps(), t.num_layers(), t.num_logical()), (2, 1, 2));
    assert_eq!(t.summed().unwrap(), arr2(&[[4, 6]]));
}

#[test]
fn json_3d_steps_sum_and_step() {
    let t =
        read(&write("steps.json", r#"{"logical_count": [[[1, 2], [3, 4], [5, 6]], [[10, 20], [30, 40], [50, 60]]]}"#));
    assert_eq!((t.num_steps(), t.num_layers(), t.num_logical()), (2, 3, 2));
    assert_eq!(t.step(1).unwrap(), arr2(&[[10, 20], [30, 40], [50, 60]]));
    assert_eq!(t.summed().unwrap(), arr2(&[[11, 22], [33, 44], [55, 66]]));
}

#[test]
fn json_integral_floats_and_big_integers_are_exact() {
    let t = read(&write(
        "exact.json",
        r#"{"counts": [[147896.0, 0.0, 9007199254740993, 18446744073709551615], [1e19, 12, -0.0, 3]]}"#,
    ));
    assert_eq!(t.scale_bits, None);
    assert_eq!(t.steps[0].row(0).to_vec(), vec![147_896, 0, 9_007_199_254_740_993, u64::MAX]);
    assert_eq!(t.steps[0].row(1).to_vec(), vec![10_000_000_000_000_000_000, 12, 0, 3]);
}

#[test]
fn nonintegral_values_quantise_the_whole_trace() {
    let t = read(&write("decayed.json", r#"{"weight": [[12.5, 1], [0.25, 3.0]]}"#));
    assert_eq!(t.scale_bits, Some(NONINTEGRAL_SCALE_BITS));
    let s = 1u64 << NONINTEGRAL_SCALE_BITS;
    assert_eq!(t.steps[0], arr2(&[[25 * s / 2, s], [s / 4, 3 * s]]));
    // Rounding to nearest at the 2^-20 grid, deterministic.
    let t = read(&write("decayed.csv", "0.1,2\n"));
    assert_eq!(t.steps[0], arr2(&[[(0.1f64 * s as f64).round() as u64, 2 * s]]));
    assert_eq!(t.steps[0][[0, 0]], 104_858);
}

#[test]
fn json_errors() {
    let (e, msg) = err_of("nokey.json", r#"{"foo": [[1]], "bar": 2}"#);
    assert!(matches!(e, LoadError::JsonMissingKey { .. }), "{e:?}");
    assert!(msg.contains("bar, foo") && msg.contains("weight, counts, logical_count"), "{msg}");

    let (e, msg) = err_of("notobj.json", "\"1, 2\"");
    assert!(matches!(e, LoadError::Structure { .. }), "{e:?}");
    assert!(msg.contains("a string where an array"), "{msg}");

    let (e, _) = err_of("syntax.json", r#"{"counts": [[1, 2]"#);
    assert!(matches!(e, LoadError::Json { .. }), "{e:?}");

    let (e, msg) = err_of("ragged.json", r#"{"counts": [[1, 2, 3], [4, 5]]}"#);
    assert!(matches!(e, LoadError::Ragged { got: 2, expected: 3, .. }), "{e:?}");
    assert!(msg.contains("layer 1"), "{msg}");

    let (e, msg) = err_of("ragged3.json", r#"{"counts": [[[1], [2]], [[3]]]}"#);
    assert!(matches!(e, LoadError::Ragged { got: 1, expected: 2, what: "layers", .. }), "{e:?}");
    assert!(msg.contains("step 1"), "{msg}");

    let (e, msg) = err_of("string.json", r#"{"counts": [[1, "2"]]}"#);
    assert!(matches!(e, LoadError::Structure { .. }), "{e:?}");
    assert!(msg.contains("[layer 0, expert 1]") && msg.contains("a string"), "{msg}");

    let (e, msg) = err_of("neg.json", r#"{"counts": [[[1, 2]], [[3, -4]]]}"#);
    assert!(matches!(e, LoadError::Negative { .. }), "{e:?}");
    assert!(msg.contains("[step 1, layer 0, expert 1]") && msg.contains("-4"), "{msg}");

    let (e, msg) = err_of("negf.json", r#"{"counts": [[1, -0.5]]}"#);
    assert!(matches!(e, LoadError::Negative { .. }), "{e:?}");
    assert!(msg.contains("-0.5"), "{msg}");

    let (e, msg) = err_of("overflow.json", r#"{"counts": [[1, 18446744073709551616]]}"#);
    assert!(matches!(e, LoadError::Overflow { .. }), "{e:?}");
    assert!(msg.contains("overflowing count") && msg.contains("expert 1"), "{msg}");

    assert!(msg.contains("1.8446744073709552e19"), "{msg}");
    let (e, msg) = err_of("overflowf.json", r#"{"counts": [[1e20]]}"#);
    assert!(matches!(e, LoadError::Overflow { .. }), "{e:?}");
    assert!(msg.contains("1e20"), "{msg}");

    let (e, msg) = err_of("qoverflow.json", r#"{"counts": [[0.5, 18446744073709551615]]}"#);
    assert!(matches!(e, LoadError::QuantisedOverflow { bits: 20, .. }), "{e:?}");
    assert!(msg.contains("18446744073709551615") && msg.contains("expert 1"), "{msg}");

    for (name, text) in [
        ("empty0.json", r#"{"counts": []}"#),
        ("empty1.json", r#"{"counts": [[]]}"#),
        ("empty2.json", r#"{"counts": [[[]]]}"#),
        ("empty3.json", r#"{"counts": [[[1]], []]}"#),
    ] {
        let (e, _) = err_of(name, text);
        assert!(matches!(e, LoadError::Empty { .. }), "{name}: {e:?}");
    }
    let (e, _) = err_of("empty.json", "");
    assert!(matches!(e, LoadError::Empty { .. }), "{e:?}");
    let (e, _) = err_of("nested.json", "[".repeat(10_000));
    assert!(matches!(e, LoadError::Json { .. }), "{e:?}");
}

// ---------------------------------------------------------------- CSV

#[test]
fn csv_with_and_without_header() {
    let t = read(&write("plain.csv", "1,2,3\n4, 5 ,6\n"));
    assert_eq!(t.format, LoadFormat::Csv);
    assert_eq!(t.steps, vec![arr2(&[[1, 2, 3], [4, 5, 6]])]);
    let t = read(&write("header.csv", "e0,e1,e2\r\n\r\n 1 ,2,3\r\n\n4,5,6.0\r\n\n"));
    assert_eq!(t.steps, vec![arr2(&[[1, 2, 3], [4, 5, 6]])]);
    assert_eq!(t.scale_bits, None);
}

#[test]
fn csv_errors() {
    let (e, msg) = err_of("ragged.csv", "a,b,c\n1,2,3\n\n4,5\n");
    assert!(matches!(e, LoadError::Ragged { got: 2, expected: 3, .. }), "{e:?}");
    assert!(msg.contains("line 4") && msg.contains("line 2"), "{msg}");

    let (e, msg) = err_of("nan.csv", "1,2\n3,nan\n");
    assert!(matches!(e, LoadError::NotFinite { .. }), "{e:?}");
    assert!(msg.contains("line 2, column 2") && msg.contains("NaN"), "{msg}");

    let (e, msg) = err_of("inf.csv", "1,inf\n");
    assert!(matches!(e, LoadError::NotFinite { .. }), "{e:?}");
    assert!(msg.contains("inf"), "{msg}");

    let (e, msg) = err_of("neg.csv", "1,2\n3,-7\n");
    assert!(matches!(e, LoadError::Negative { .. }), "{e:?}");
    assert!(msg.contains("line 2, column 2") && msg.contains("-7"), "{msg}");

    let (e, msg) = err_of("word.csv", "1,2\n3,x7\n");
    assert!(matches!(e, LoadError::NotANumber { .. }), "{e:?}");
    assert!(msg.contains("line 2, column 2") && msg.contains("x7"), "{msg}");

    let (e, msg) = err_of("trailing.csv", "1,2,\n");
    assert!(matches!(e, LoadError::Structure { .. }), "{e:?}");
    assert!(msg.contains("line 1, column 3"), "{msg}");

    let (e, msg) = err_of("overflow.csv", "1,18446744073709551616\n");
    assert!(matches!(e, LoadError::Overflow { .. }), "{e:?}");
    assert!(msg.contains("line 1, column 2"), "{msg}");

    let (e, _) = err_of("empty.csv", "\n  \n");
    assert!(matches!(e, LoadError::Empty { .. }), "{e:?}");
    let (e, _) = err_of("onlyheader.csv", "a,b\n\n");
    assert!(matches!(e, LoadError::Empty { .. }), "{e:?}");
    let (e, _) = err_of("latin1.csv", b"1,2\n3,\xff\n");
    assert!(matches!(e, LoadError::Structure { .. }), "{e:?}");
}

// ---------------------------------------------------------------- per-iteration CSV

/// Two datasets, 2 iterations x 2 layers x 3 experts each, rows layer-major (not by iteration).
const ITER_CSV: &str = "\
,dataset,iteration,layer_idx,0,1,2
0,wiki,1,0,10,11,12
1,wiki,0,0,0,1,2
2,books,0,0,100,101,102
3,wiki,1,1,13,14,15
4,books,1,0,110,111,112
5,wiki,0,1,3,4,5
6,books,0,1,103,104,105
7,books,1,1,113,114,115
";

#[test]
fn iteration_csv_groups_and_selects() {
    let path = write("iter.csv", ITER_CSV);
    let t = read(&path);
    assert_eq!(t.format, LoadFormat::IterationCsv);
    assert_eq!(t.dataset.as_deref(), Some("wiki"));
    assert_eq!(t.datasets, vec!["wiki".to_string(), "books".to_string()]);
    assert_eq!(t.steps, vec![arr2(&[[0, 1, 2], [3, 4, 5]]), arr2(&[[10, 11, 12], [13, 14, 15]])]);
    let t = read_trace(&path, &TraceSelect { dataset: Some("books".into()) }).unwrap();
    assert_eq!(t.dataset.as_deref(), Some("books"));
    assert_eq!(t.steps, vec![arr2(&[[100, 101, 102], [103, 104, 105]]), arr2(&[[110, 111, 112], [113, 114, 115]])]);
    assert_eq!(t.summed().unwrap(), arr2(&[[210, 212, 214], [216, 218, 220]]));
    // No index column, layers not starting at 0.
    let t = read(&write("iter_noindex.csv", "dataset,iteration,layer_idx,a,b\nx,5,7,1,2\nx,5,3,3,4\n"));
    assert_eq!(t.steps, vec![arr2(&[[3, 4], [1, 2]])]);
}

#[test]
fn iteration_csv_errors() {
    let path = write("iter_unknown.csv", ITER_CSV);
    let e = read_err(&path, &TraceSelect { dataset: Some("c4".into()) });
    assert!(matches!(e, LoadError::UnknownDataset { .. }), "{e:?}");
    assert!(e.to_string().contains("wiki, books"), "{e}");

    let (e, msg) = err_of("iter_dup.csv", ",dataset,iteration,layer_idx,0\n0,x,0,0,1\n1,x,0,1,1\n2,x,0,0,5\n");
    assert!(matches!(e, LoadError::IterationLayers { iteration: 0, .. }), "{e:?}");
    assert!(msg.contains("layer_idx 0 appears twice") && msg.contains("lines 2 and 4"), "{msg}");

    let (e, msg) = err_of("iter_missing.csv", ",dataset,iteration,layer_idx,0\n0,x,0,0,1\n1,x,0,1,1\n2,x,1,0,5\n");
    assert!(matches!(e, LoadError::IterationLayers { iteration: 1, .. }), "{e:?}");
    assert!(msg.contains("no row for layer_idx 1"), "{msg}");

    let (e, msg) = err_of("iter_ragged.csv", ",dataset,iteration,layer_idx,0,1\n0,x,0,0,1\n");
    assert!(matches!(e, LoadError::Ragged { got: 5, expected: 6, .. }), "{e:?}");
    assert!(msg.contains("line 2"), "{msg}");

    let (e, msg) = err_of("iter_neg.csv", ",dataset,iteration,layer_idx,0,1\n0,x,0,0,1,-2\n");
    assert!(matches!(e, LoadError::Negative { .. }), "{e:?}");
    assert!(msg.contains("line 2, column 6") && msg.contains("-2"), "{msg}");

    let (e, msg) = err_of("iter_badidx.csv", ",dataset,iteration,layer_idx,0\n0,x,zero,0,1\n");
    assert!(matches!(e, LoadError::Structure { .. }), "{e:?}");
    assert!(msg.contains("line 2, column 3") && msg.contains("zero"), "{msg}");

    let (e, msg) = err_of("iter_partial.csv", "dataset,layer_idx,0\nx,0,1\n");
    assert!(matches!(e, LoadError::Structure { .. }), "{e:?}");
    assert!(msg.contains("iteration"), "{msg}");

    let (e, _) = err_of("iter_noexperts.csv", "dataset,iteration,layer_idx\nx,0,0\n");
    assert!(matches!(e, LoadError::Empty { .. }), "{e:?}");
    let (e, _) = err_of("iter_norows.csv", "dataset,iteration,layer_idx,0\n");
    assert!(matches!(e, LoadError::Empty { .. }), "{e:?}");
}

// ---------------------------------------------------------------- npy

fn le_bytes<const N: usize, T>(values: &[T], to: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(to).collect()
}

#[test]
fn npy_float32_c_order() {
    let data = le_bytes(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], |v| v.to_le_bytes());
    let t = read(&write("f4.npy", npy("<f4", false, &[2, 3], &data)));
    assert_eq!(t.format, LoadFormat::Npy);
    assert_eq!(t.steps, vec![arr2(&[[1, 2, 3], [4, 5, 6]])]);
    assert_eq!(t.scale_bits, None);
}

#[test]
fn npy_int64_3d_and_other_dtypes() {
    let data = le_bytes(&(0..12i64).collect::<Vec<_>>(), |v| v.to_le_bytes());
    let t = read(&write("i8.npy", npy("<i8", false, &[2, 2, 3], &data)));
    assert_eq!((t.num_steps(), t.num_layers(), t.num_logical()), (2, 2, 3));
    assert_eq!(t.steps[1], arr2(&[[6, 7, 8], [9, 10, 11]]));
    // Big-endian u16, single-byte u1, f8 with a non-integral value.
    let data = le_bytes(&[1u16, 258], |v| v.to_be_bytes());
    assert_eq!(read(&write("be.npy", npy(">u2", false, &[1, 2], &data))).steps[0], arr2(&[[1, 258]]));
    assert_eq!(read(&write("u1.npy", npy("|u1", false, &[1, 2], &[7, 255]))).steps[0], arr2(&[[7, 255]]));
    let data = le_bytes(&[1.5f64, 2.0], |v| v.to_le_bytes());
    let t = read(&write("f8.npy", npy("<f8", false, &[2, 1], &data)));
    assert_eq!(t.scale_bits, Some(20));
    assert_eq!(t.steps[0], arr2(&[[3 << 19], [2 << 20]]));
}

#[test]
fn npy_fortran_order() {
    // Logical [[1, 2, 3], [4, 5, 6]] stored column-major.
    let data = le_bytes(&[1i32, 4, 2, 5, 3, 6], |v| v.to_le_bytes());
    let t = read(&write("fortran.npy", npy("<i4", true, &[2, 3], &data)));
    assert_eq!(t.steps, vec![arr2(&[[1, 2, 3], [4, 5, 6]])]);
    // 3-D: element [s, l, e] at s + 2*l + 4*e.
    let logical = Array2::from_shape_fn((2, 2 * 2), |(s, k)| (100 * s + k) as u32);
    let mut data = vec![0u32; 8];
    for s in 0..2 {
        for l in 0..2 {
            for e in 0..2 {
                data[s + 2 * l + 4 * e] = logical[[s, l * 2 + e]];
            }
        }
    }
    let t = read(&write("fortran3.npy", npy("<u4", true, &[2, 2, 2], &le_bytes(&data, |v| v.to_le_bytes()))));
    assert_eq!(t.steps, vec![arr2(&[[0, 1], [2, 3]]), arr2(&[[100, 101], [102, 103]])]);
}

#[test]
fn npy_errors() {
    let (e, msg) = err_of("neg.npy", npy("<i2", false, &[1, 1, 2], &le_bytes(&[3i16, -3], |v| v.to_le_bytes())));
    assert!(matches!(e, LoadError::Negative { .. }), "{e:?}");
    assert!(msg.contains("[step 0, layer 0, expert 1]") && msg.contains("-3"), "{msg}");

    let (e, msg) = err_of("nan.npy", npy("<f4", false, &[2, 1], &le_bytes(&[1.0f32, f32::NAN], |v| v.to_le_bytes())));
    assert!(matches!(e, LoadError::NotFinite { .. }), "{e:?}");
    assert!(msg.contains("[layer 1, expert 0]"), "{msg}");

    let (e, _) = err_of("inf.npy", npy("<f8", false, &[1, 1], &f64::INFINITY.to_le_bytes()));
    assert!(matches!(e, LoadError::NotFinite { .. }), "{e:?}");

    let (e, _) = err_of("big.npy", npy("<f8", false, &[1, 1], &1e300f64.to_le_bytes()));
    assert!(matches!(e, LoadError::Overflow { .. }), "{e:?}");

    let (e, msg) = err_of("1d.npy", npy("<i8", false, &[2], &[0; 16]));
    assert!(matches!(e, LoadError::NpyDims { .. }), "{e:?}");
    assert!(msg.contains("[2]"), "{msg}");
    let (e, _) = err_of("4d.npy", npy("<u1", false, &[1, 1, 1, 1], &[0]));
    assert!(matches!(e, LoadError::NpyDims { .. }), "{e:?}");

    for (name, descr, size) in
        [("bool.npy", "|b1", 1), ("f2.npy", "<f2", 2), ("c8.npy", "<c8", 8), ("str.npy", "|S4", 4)]
    {
        let (e, msg) = err_of(name, npy(descr, false, &[1, 1], &vec![0; size]));
        assert!(matches!(e, LoadError::NpyDtype { .. }), "{name}: {e:?}");
        assert!(msg.contains(descr.trim_start_matches(['<', '|'])), "{msg}");
    }

    let (e, msg) = err_of("short.npy", npy("<i4", false, &[2, 2], &[0; 12]));
    assert!(matches!(e, LoadError::Npy { .. }), "{e:?}");
    assert!(msg.contains("truncated"), "{msg}");

    let (e, _) = err_of("zero.npy", npy("<i4", false, &[0, 3], &[]));
    assert!(matches!(e, LoadError::Empty { .. }), "{e:?}");

    let (e, _) = err_of("huge.npy", npy("<u1", true, &[1 << 40, 1 << 40, 0], &[]));
    assert!(matches!(e, LoadError::Empty { .. }), "{e:?}");
    let (e, msg) = err_of("huge2.npy", npy("<u1", false, &[1 << 40, 1 << 40], &[]));
    assert!(matches!(e, LoadError::Npy { .. }), "{e:?}");
    assert!(msg.contains("2^64"), "{msg}");
    let (e, _) = err_of("huge3.npy", npy("<u8", false, &[1 << 31, 1 << 31], &[]));
    assert!(matches!(e, LoadError::Npy { .. }), "{e:?}");

    let (e, msg) = err_of("magic.npy", b"PK\x03\x04 not an npy");
    assert!(matches!(e, LoadError::Npy { .. }), "{e:?}");
    assert!(msg.contains("magic"), "{msg}");
    let (e, _) = err_of("preamble.npy", b"\x93NUMPY\x01");
    assert!(matches!(e, LoadError::Npy { .. }), "{e:?}");
    let (e, _) = err_of("headerlen.npy", b"\x93NUMPY\x01\x00\xff\xff{'descr'");
    assert!(matches!(e, LoadError::Npy { .. }), "{e:?}");
    let mut deep = npy("<u1", false, &[1, 1], &[1]);
    let nested = format!(
        "{{'descr': '<u1', 'fortran_order': False, 'shape': (1, 1), 'x': {}{}}}",
        "(".repeat(5000),
        ")".repeat(5000)
    );
    deep.truncate(8);
    deep.extend_from_slice(&(nested.len() as u16).to_le_bytes());
    deep.extend_from_slice(nested.as_bytes());
    let (e, _) = err_of("deep.npy", deep);
    assert!(matches!(e, LoadError::Npy { .. }), "{e:?}");
    // Unclosed braces before a valid dict: npyz's parser backtracks exponentially in their depth
    // (fuzz/regressions/load_npy/ has the case fuzzing found; it ran for minutes before the bound).
    let unclosed = format!("{}{{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }}", "{".repeat(12));
    let (e, msg) = err_of("unclosed.npy", npy_raw(&unclosed, &[0; 24]));
    assert!(matches!(e, LoadError::Npy { .. }), "{e:?}");
    assert!(msg.contains("nests brackets more than 4 deep"), "{msg}");
    let (e, _) = err_of("garbage.npy", b"\x93NUMPY\x01\x00\x04\x00}{)(");
    assert!(matches!(e, LoadError::Npy { .. }), "{e:?}");
    for (name, dict) in [
        ("hex.npy", "{'descr': '<u1', 'fortran_order': False, 'shape': (0x1, 1), }"),
        ("noshape.npy", "{'descr': '<u1', 'fortran_order': False, }"),
        ("twoshapes.npy", "{'descr': '<u1', 'fortran_order': False, 'shape': (1, 1), 'shape': (1, 1)}"),
    ] {
        let (e, msg) = err_of(name, npy_raw(dict, &[1]));
        assert!(matches!(e, LoadError::Npy { .. }), "{name}: {e:?}");
        assert!(msg.contains("shape"), "{msg}");
    }
    // Double quotes and a list for the shape are fine.
    let t = read(&write("dq.npy", npy_raw(r#"{"descr": "<u1", "fortran_order": False, "shape": [1, 2]}"#, &[1, 2])));
    assert_eq!(t.steps[0], arr2(&[[1, 2]]));
    let (e, _) = err_of("empty.npy", b"");
    assert!(matches!(e, LoadError::Empty { .. }), "{e:?}");
}

// ---------------------------------------------------------------- general

#[test]
fn general_errors() {
    let (e, msg) = err_of("load.txt", "1,2\n");
    assert!(matches!(e, LoadError::UnsupportedExtension { .. }), "{e:?}");
    assert!(msg.contains(".txt") && msg.contains(".json, .csv or .npy"), "{msg}");
    let (e, _) = err_of("noext", "1,2\n");
    assert!(matches!(e, LoadError::UnsupportedExtension { .. }), "{e:?}");

    let missing = tmp("does_not_exist.json");
    let e = read_err(&missing, &TraceSelect::default());
    assert!(matches!(e, LoadError::Io { .. }), "{e:?}");

    let path = write("dataset_on_json.json", r#"{"counts": [[1]]}"#);
    let e = read_err(&path, &TraceSelect { dataset: Some("wiki".into()) });
    assert!(matches!(e, LoadError::DatasetNotApplicable { .. }), "{e:?}");
}

#[test]
fn layer_totals_must_fit_u64() {
    let half = u64::MAX / 2 + 1;
    let t = read(&write("sumover.json", format!(r#"{{"counts": [[[1, 2], [{half}, 0]], [[3, 4], [{half}, 0]]]}}"#)));
    let e = t.summed().unwrap_err();
    assert!(matches!(e, LoadError::LayerSumOverflow { layer: 1, .. }), "{e:?}");
    assert!(e.to_string().contains(&t.path.display().to_string()), "{e}");
    assert!(t.step(0).is_ok() && t.step(1).is_ok());

    let t = read(&write("stepover.json", format!(r#"{{"counts": [[1, 2], [{half}, {half}]]}}"#)));
    let e = t.step(0).unwrap_err();
    assert!(matches!(e, LoadError::LayerSumOverflow { layer: 1, .. }), "{e:?}");
    assert!(e.to_string().contains("step 0"), "{e}");
    assert!(matches!(t.summed(), Err(LoadError::LayerSumOverflow { layer: 1, .. })));

    let e = t.step(1).unwrap_err();
    assert!(matches!(e, LoadError::StepOutOfRange { step: 1, num_steps: 1, .. }), "{e:?}");

    // Hand-built traces: no step, or steps of different shapes.
    let mut bad = t.clone();
    bad.steps.clear();
    assert!(matches!(bad.summed(), Err(LoadError::Empty { .. })));
    bad.steps = vec![Array2::zeros((2, 2)), Array2::zeros((2, 3))];
    assert!(matches!(bad.summed(), Err(LoadError::StepShape { step: 1, .. })));
}

// ---------------------------------------------------------------- real traces

fn traces(what: &str) -> Option<PathBuf> {
    shared_dir_or_skip(what).map(|d| d.join("traces"))
}

#[test]
fn real_qwen3_sglang_recorder() {
    let Some(dir) = traces("real_qwen3_sglang_recorder") else { return };
    for (file, layers, total) in
        [("counts30b_qwen3-30b-a3b.json", 48, 33_308_600u64), ("counts235b_qwen3-235b-a22b-fp8.json", 94, 33_308_480)]
    {
        let t = read(&dir.join("qwen3_sglang_recorder").join(file));
        assert_eq!((t.num_steps(), t.num_layers(), t.num_logical()), (1, layers, 128), "{file}");
        assert_eq!(t.scale_bits, None, "{file}");
        let w = t.summed().unwrap();
        for (layer, row) in w.outer_iter().enumerate() {
            assert_eq!(row.sum(), total, "{file} layer {layer}");
        }
    }
}

#[test]
fn real_harmoeny_iteration_csvs() {
    let Some(dir) = traces("real_harmoeny_iteration_csvs") else { return };
    let datasets = ["bookcorpus", "random", "wikitext", "wmt19"].map(String::from).to_vec();
    for (file, iterations, experts) in
        [("expert_freq_qwen_policy_datasets.csv", 20, 60), ("expert_freq_switch128_datasets.csv", 30, 128)]
    {
        let path = dir.join("harmoeny_qwen15moe_switch").join(file);
        let t = read(&path);
        assert_eq!(t.format, LoadFormat::IterationCsv);
        assert_eq!(t.datasets, datasets, "{file}");
        assert_eq!(t.dataset.as_deref(), Some("bookcorpus"));
        assert_eq!((t.num_steps(), t.num_layers(), t.num_logical()), (iterations, 12, experts), "{file}");
        assert_eq!(t.scale_bits, None);
        for d in &datasets {
            let t = read_trace(&path, &TraceSelect { dataset: Some(d.clone()) }).unwrap();
            assert_eq!((t.num_steps(), t.num_layers(), t.num_logical()), (iterations, 12, experts), "{file} {d}");
            assert!(t.summed().unwrap().iter().any(|&v| v > 0));
        }
    }
    // Qwen1.5-MoE, top-1: every layer of every iteration routes 98,304 tokens.
    let t = read(&dir.join("harmoeny_qwen15moe_switch/expert_freq_qwen_policy_datasets.csv"));
    for s in 0..t.num_steps() {
        for row in t.step(s).unwrap().outer_iter() {
            assert_eq!(row.sum(), 98_304, "step {s}");
        }
    }
}

/// Truncated and corrupted versions of valid files load or fail, but never panic.
#[test]
fn corrupted_files_never_panic() {
    let npy_ok =
        npy("<f8", true, &[2, 2, 3], &le_bytes(&(0..12).map(f64::from).collect::<Vec<_>>(), |v| v.to_le_bytes()));
    let seeds: [(&str, Vec<u8>); 4] = [
        ("fuzz.json", br#"{"counts": [[[1, 2.5], [3, 4]], [[5, 6], [7, 8e3]]]}"#.to_vec()),
        ("fuzz.csv", b"a,b,c\n1,2,3\n4,5.5,6\n".to_vec()),
        ("fuzz_iter.csv", ITER_CSV.as_bytes().to_vec()),
        ("fuzz.npy", npy_ok),
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet = b"0123456789-.,e\n[]{}\"():' \x00\xff";
    for (name, seed) in &seeds {
        let path = tmp(name);
        for cut in 0..seed.len() {
            std::fs::write(&path, &seed[..cut]).unwrap();
            let _ = read_trace(&path, &TraceSelect::default());
        }
        for _ in 0..400 {
            let mut bytes = seed.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = alphabet[(next() % alphabet.len() as u64) as usize];
            }
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(t) = read_trace(&path, &TraceSelect::default()) {
                let _ = t.summed();
            }
        }
    }
}

// ---------------------------------------------------------------- strictness (issue 12)

#[test]
fn a_first_row_with_numbers_is_data_and_its_bad_fields_are_errors() {
    // `0x10` and `1O` once made the first row a "header" that was dropped without a word.
    for (name, text, bad) in [("hex.csv", "0x10,2,3\n4,5,6\n", "0x10"), ("letter_o.csv", "1O,2,3\n4,5,6\n", "1O")] {
        let (e, msg) = err_of(name, text);
        assert!(matches!(e, LoadError::NotANumber { .. }), "{e:?}");
        assert!(msg.contains("line 1, column 1") && msg.contains(bad), "{msg}");
    }
    // A header is a row with no number in it, wherever the words are.
    let t = read(&write("words.csv", "layer0_e0,e1,e2\n1,2,3\n"));
    assert_eq!(t.steps, vec![arr2(&[[1, 2, 3]])]);
}

#[test]
fn a_pandas_index_column_is_refused() {
    for (name, text) in [("pandas.csv", ",e0,e1\n0,5,6\n1,3,4\n"), ("pandas_int.csv", ",0,1\n0,5,6\n1,3,4\n")] {
        let (e, msg) = err_of(name, text);
        assert!(matches!(e, LoadError::Structure { .. }), "{e:?}");
        assert!(msg.contains("index=False"), "{msg}");
    }
}

#[test]
fn duplicate_json_keys_are_errors_at_any_depth() {
    let (e, msg) = err_of("dup.json", r#"{"counts": [[1, 2]], "counts": [[3, 4]]}"#);
    assert!(matches!(e, LoadError::Json { .. }), "{e:?}");
    assert!(msg.contains("\"counts\" appears twice"), "{msg}");
    let (_, msg) = err_of("dup_inner.json", r#"{"weight": [[1]], "meta": {"a": 1, "a": 2}}"#);
    assert!(msg.contains("\"a\" appears twice"), "{msg}");
}

#[test]
fn a_placement_file_is_not_a_load() {
    let text = r#"{"physical_to_logical_map": [[0, 1, 0]], "logical_to_physical_map": [[[0, 2], [1, -1]]],
                  "logical_count": [[2, 1]], "metrics": {}}"#;
    let (e, msg) = err_of("placement.json", text);
    assert!(matches!(e, LoadError::PlacementNotLoad { .. }), "{e:?}");
    assert!(msg.contains("placement file") && msg.contains("physical_to_logical_map"), "{msg}");
}

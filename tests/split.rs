//! The split (issue 22) against its golden cases (`python/tests/data/split_golden.json`, written
//! by `examples/split_golden.rs`): Rust must reproduce the quotas the numpy and PyTorch versions
//! are checked against (`python/tests/test_split.py`), so the three agree token for token; and on
//! every case the result is a split (per-expert sums, non-negative) whose max load is the optimum
//! certified by a Hall set bound.

use eplb::exit::Failure;
use eplb::split::{even_quotas, gpu_loads, split_layer, SplitError};
use serde_json::Value;

fn golden() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/python/tests/data/split_golden.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn ints<T: TryFrom<i64>>(v: &Value) -> Vec<T>
where
    T::Error: std::fmt::Debug,
{
    v.as_array().unwrap().iter().map(|x| T::try_from(x.as_i64().unwrap()).unwrap()).collect()
}

#[test]
fn rust_reproduces_the_golden_quotas() {
    let cases = golden();
    assert!(cases.len() >= 100);
    for c in &cases {
        let (counts, phy2log): (Vec<i64>, Vec<usize>) = (ints(&c["counts"]), ints(&c["phy2log"]));
        let spr = c["slots_per_rank"].as_u64().unwrap() as usize;
        let tokens = c["tokens"].as_i64().unwrap();
        let s = split_layer(&counts, tokens, &phy2log, spr).unwrap();
        assert_eq!(s.quotas, ints::<i64>(&c["quotas"]), "{}", c["name"]);
        assert_eq!(s.max_load, c["max_load"].as_i64().unwrap(), "{}", c["name"]);
        let layer = c["layer"].as_u64().unwrap() as usize;
        assert_eq!(
            even_quotas(&counts, tokens, &phy2log, spr, layer).unwrap(),
            ints::<i64>(&c["even"]),
            "{}",
            c["name"]
        );
        // A split: every expert's tokens, no negative quota; the max load is the reported one.
        for (e, &want) in counts.iter().enumerate() {
            let sum: i64 = (0..phy2log.len()).filter(|&p| phy2log[p] == e).map(|p| s.quotas[p]).sum();
            assert_eq!(sum, want, "{}", c["name"]);
        }
        assert!(s.quotas.iter().all(|&q| q >= 0));
        assert_eq!(gpu_loads(&s.quotas, spr).into_iter().max().unwrap(), s.max_load);
        // Never worse than the even split.
        let even = even_quotas(&counts, tokens, &phy2log, spr, layer).unwrap();
        assert!(s.max_load <= gpu_loads(&even, spr).into_iter().max().unwrap(), "{}", c["name"]);
    }
}

/// Optimality, certified: the max load equals a lower bound that every split obeys, the largest
/// over "closed" GPU sets Y (closed: every expert with tokens that has a replica outside Y has
/// none inside... here: GPU sets formed as unions of the components that the replicated experts
/// join, and single GPUs) of ceil((tokens that must stay inside Y) / |Y|), and ceil(N / G).
#[test]
fn the_max_load_meets_a_hall_bound_on_small_cases() {
    // Exhaustive over GPU subsets for G <= 12.
    for c in golden() {
        let (counts, phy2log): (Vec<i64>, Vec<usize>) = (ints(&c["counts"]), ints(&c["phy2log"]));
        let spr = c["slots_per_rank"].as_u64().unwrap() as usize;
        let g = phy2log.len() / spr;
        if g > 12 {
            continue;
        }
        let mut mask_of = vec![0u32; counts.len()];
        for (p, &e) in phy2log.iter().enumerate() {
            mask_of[e] |= 1 << (p / spr);
        }
        let mut bound = 0i64;
        for y in 1u32..(1 << g) {
            let inside: i64 = (0..counts.len()).filter(|&e| mask_of[e] & !y == 0).map(|e| counts[e]).sum();
            let n = y.count_ones() as i64;
            bound = bound.max((inside + n - 1) / n);
        }
        assert_eq!(c["max_load"].as_i64().unwrap(), bound, "{}: not the optimum", c["name"]);
    }
}

#[test]
fn bad_input_is_a_typed_error_with_exit_2() {
    let e = split_layer(&[5, 0, 2], 7, &[0, 1], 1).unwrap_err();
    assert_eq!(e, SplitError::NoReplica { expert: 2, count: 2 });
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("no replica"), "{e}");
    let e = split_layer(&[5, -1], 4, &[0, 1], 1).unwrap_err();
    assert!(matches!(e, SplitError::NegativeCount { expert: 1, count: -1 }), "{e}");
    let e = split_layer(&[5, 1], 7, &[0, 1], 1).unwrap_err();
    assert!(e.to_string().contains("sum to 6") && e.to_string().contains("has 7"), "{e}");
}

//! Writes the golden cases of the split (issue 22) that Rust (`tests/split.rs`) and Python
//! (`python/tests/test_split.py`: numpy and PyTorch) must all reproduce exactly:
//!
//!     cargo run --release --example split_golden -- python/tests/data/split_golden.json
//!
//! Cases: random placements (duplicates on one GPU included) with random and skewed counts, and
//! placements of the incremental and spread policies on zipf-like sampled loads.
use eplb::engine::splitmix64;
use eplb::policy::{self, PlacementShape, PolicyConfig, PolicyKind};
use eplb::split::{even_quotas, split_layer};
use serde_json::json;

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| "python/tests/data/split_golden.json".into());
    let mut state = 2026u64;
    let mut rnd = |n: u64| {
        state = splitmix64(state);
        state % n.max(1)
    };
    let mut cases = Vec::new();
    // Random small and medium cases.
    for i in 0..120 {
        let e = 2 + rnd(40) as usize;
        let g = 1 + rnd(12) as usize;
        let spr = e.div_ceil(g) + rnd(3) as usize;
        let p = g * spr;
        let mut phy2log: Vec<usize> = (0..p).map(|s| if s < e { s } else { rnd(e as u64) as usize }).collect();
        for s in (1..p).rev() {
            let j = rnd(s as u64 + 1) as usize;
            phy2log.swap(s, j);
        }
        let skew = 1 + rnd(4);
        let counts: Vec<i64> =
            (0..e).map(|x| if rnd(5) == 0 { 0 } else { (rnd(200 / (1 + (x as u64 % 7) * skew) + 1)) as i64 }).collect();
        cases.push((format!("random{i}"), counts, phy2log, spr, i % 5));
    }
    // Policy placements on zipf-like sampled loads: E=128, G in {8, 16, 32}, R = E + G.
    for (i, &(g, tokens)) in [(8usize, 4096u64), (16, 4096), (32, 4096), (16, 16384), (64, 8192)].iter().enumerate() {
        let e = if g == 64 { 256 } else { 128 };
        let shape = PlacementShape { num_replicas: e + g, num_gpus: g, num_nodes: 1, num_groups: 1 };
        let expected: Vec<u64> =
            (0..e).map(|x| 1_000_000 / (1 + (splitmix64(x as u64 + i as u64 * 977) % e as u64))).collect();
        let sum: u64 = expected.iter().sum();
        for kind in [PolicyKind::INCREMENTAL, PolicyKind::SPREAD] {
            let config = PolicyConfig { kind, threads: 1, ..PolicyConfig::default() };
            let w = ndarray::Array2::from_shape_vec((1, e), expected.clone()).unwrap();
            let place = policy::rebalance(w.view(), &shape, None, &config).unwrap();
            let row = place.phy2log.row(0).to_vec();
            let mut counts = vec![0i64; e];
            for _ in 0..tokens {
                let mut u = rnd(sum);
                let mut x = 0;
                while u >= expected[x] {
                    u -= expected[x];
                    x += 1;
                }
                counts[x] += 1;
            }
            cases.push((format!("{kind:?}-g{g}-t{tokens}").to_lowercase(), counts, row, shape.slots_per_rank(), i));
        }
    }
    let out: Vec<_> = cases
        .into_iter()
        .map(|(name, counts, phy2log, spr, layer)| {
            let tokens: i64 = counts.iter().sum();
            let s = split_layer(&counts, tokens, &phy2log, spr).unwrap();
            let even = even_quotas(&counts, tokens, &phy2log, spr, layer).unwrap();
            json!({"name": name, "counts": counts, "tokens": tokens, "phy2log": phy2log, "slots_per_rank": spr,
                   "layer": layer, "quotas": s.quotas, "max_load": s.max_load, "even": even})
        })
        .collect();
    let n = out.len();
    std::fs::write(&path, serde_json::to_string(&json!({"cases": out})).unwrap() + "\n").unwrap();
    eprintln!("{path}: {n} cases");
}

//! The split's cost on one CPU core (issue 22; docs/bench/split.md):
//!
//!     cargo run --release --example split_bench [-- REPS [PLACEMENTS.json]]
//!
//! Per layer: 256 logical experts, 64 ranks; R = 288 (32 redundant slots: 4.5 a rank does not
//! divide, so 320 = one a rank, and 288 on 32 ranks are measured beside), placements of the
//! incremental (default) and spread policies planned on a zipf-like load, each step's counts a
//! multinomial sample of 8 x 4096 (token, k) pairs of that load. One thread; the time is the
//! median over REPS rounds (default 21) of the mean time of one layer over 64 sampled layers.
//! With PLACEMENTS.json, also writes the four placements and the expected load (for
//! scripts/bench_split_gpu.py, which times the GPU split on the same placements:
//! python/tests/data/split_bench_placements.json is this file, committed).
use std::time::Instant;

use eplb::engine::splitmix64;
use eplb::policy::{self, PlacementShape, PolicyConfig, PolicyKind};
use eplb::split::{split_layer_into, Workspace};

fn main() {
    let reps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(21);
    let e = 256usize;
    let out = std::env::args().nth(2);
    let mut placements = Vec::new();
    println!("| shape | policy | tokens | median us/layer | min us/layer | mean max/ceil(N/G) |");
    println!("|---|---|---|---|---|---|");
    for &(g, r) in &[(64usize, 320usize), (32, 288)] {
        let shape = PlacementShape { num_replicas: r, num_gpus: g, num_nodes: 1, num_groups: 1 };
        let expected: Vec<u64> = (0..e).map(|x| 1_000_000 / (1 + (splitmix64(x as u64 + 7) % e as u64))).collect();
        let sum: u64 = expected.iter().sum();
        let cdf: Vec<u64> = expected
            .iter()
            .scan(0, |c, &w| {
                Some({
                    *c += w;
                    *c
                })
            })
            .collect();
        for kind in [PolicyKind::INCREMENTAL, PolicyKind::SPREAD] {
            let config = PolicyConfig { kind, threads: 1, ..PolicyConfig::default() };
            let w = ndarray::Array2::from_shape_vec((1, e), expected.clone()).unwrap();
            let row = policy::rebalance(w.view(), &shape, None, &config).unwrap().phy2log.row(0).to_vec();
            placements.push(serde_json::json!({
                "name": format!("{}-g{g}-r{r}", format!("{kind:?}").to_lowercase()),
                "num_gpus": g,
                "slots_per_rank": r / g,
                "expected": expected,
                "phy2log": row,
            }));
            let tokens = 8 * 4096i64;
            let mut state = 99u64;
            let layers: Vec<Vec<i64>> = (0..64)
                .map(|_| {
                    let mut c = vec![0i64; e];
                    for _ in 0..tokens {
                        state = splitmix64(state);
                        c[cdf.partition_point(|&x| x <= state % sum)] += 1;
                    }
                    c
                })
                .collect();
            let mut ws = Workspace::default();
            let mut quotas = vec![0i64; r];
            let mut times = Vec::new();
            let mut ratio = 0.0;
            for _ in 0..reps {
                let t0 = Instant::now();
                ratio = 0.0;
                for c in &layers {
                    let m = split_layer_into(c, tokens, &row, r / g, &mut ws, &mut quotas).unwrap();
                    ratio += m as f64 / ((tokens + g as i64 - 1) / g as i64) as f64;
                }
                times.push(t0.elapsed().as_secs_f64() * 1e6 / layers.len() as f64);
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "| E={e} G={g} R={r} | {kind:?} | {tokens} | {:.1} | {:.1} | {:.4} |",
                times[reps / 2],
                times[0],
                ratio / layers.len() as f64
            );
        }
    }
    if let Some(path) = out {
        let text = serde_json::to_string(&serde_json::json!({ "placements": placements })).unwrap();
        std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("write {path}: {e}"));
        println!("wrote {path}");
    }
}

//! `--policy deepseek` against DeepSeek's reference EPLB (`../shared/golden/deepseek_reference.json`).

mod common;

use eplb::policy::{self, metrics, PlacementShape, PolicyConfig, PolicyKind};
use ndarray::Array2;
use serde_json::Value;

struct Case {
    name: String,
    weight: Array2<u64>,
    shape: PlacementShape,
    phy2log: Array2<usize>,
    logcnt: Array2<usize>,
    log2phy: Vec<Vec<Vec<i64>>>,
}

fn matrix<T: Copy + Default>(v: &Value, f: impl Fn(&Value) -> T) -> Array2<T> {
    let rows: Vec<Vec<T>> =
        v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(&f).collect()).collect();
    Array2::from_shape_fn((rows.len(), rows[0].len()), |(i, j)| rows[i][j])
}

fn cases() -> Option<Vec<Case>> {
    let dir = common::shared_dir()?;
    let text = std::fs::read_to_string(dir.join("golden/deepseek_reference.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let u = |k: &str, c: &Value| c[k].as_u64().unwrap() as usize;
    Some(
        doc["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Case {
                name: c["name"].as_str().unwrap().to_string(),
                weight: matrix(&c["weight"], |x| x.as_u64().unwrap()),
                shape: PlacementShape {
                    num_replicas: u("num_replicas", c),
                    num_gpus: u("num_gpus", c),
                    num_nodes: u("num_nodes", c),
                    num_groups: u("num_groups", c),
                },
                phy2log: matrix(&c["phy2log"], |x| x.as_u64().unwrap() as usize),
                logcnt: matrix(&c["logcnt"], |x| x.as_u64().unwrap() as usize),
                log2phy: serde_json::from_value(c["log2phy"].clone()).unwrap(),
            })
            .collect(),
    )
}

#[test]
fn deepseek_policy_reproduces_the_reference() {
    let Some(cases) = cases() else { return };
    let config = PolicyConfig { kind: PolicyKind::DEEPSEEK, ..PolicyConfig::default() };
    let (mut layers, mut equal) = (0, 0);
    for case in &cases {
        let ours = policy::rebalance(case.weight.view(), &case.shape, None, &config).unwrap();
        assert_eq!(ours.logcnt, case.logcnt, "{}: logcnt differs", case.name);
        let spr = case.shape.slots_per_rank();
        let gpn = case.shape.gpus_per_node();
        for l in 0..case.weight.nrows() {
            layers += 1;
            let w = case.weight.row(l).to_vec();
            if ours.phy2log.row(l) == case.phy2log.row(l) {
                equal += 1;
            } else {
                let a = metrics::layer_balance(&w, &ours.phy2log.row(l).to_vec(), spr, gpn);
                let b = metrics::layer_balance(&w, &case.phy2log.row(l).to_vec(), spr, gpn);
                eprintln!(
                    "{} layer {l}: phy2log differs; max GPU load ours {} reference {}",
                    case.name, a.max_gpu_load, b.max_gpu_load
                );
                assert!(
                    a.max_gpu_load <= b.max_gpu_load * (1.0 + 1e-12),
                    "{} layer {l}: worse max GPU load",
                    case.name
                );
            }
            // log2phy holds the same slots as the reference's (which orders them by creation rank).
            for e in 0..case.weight.ncols() {
                let mut theirs: Vec<i64> = case.log2phy[l][e].iter().copied().filter(|&s| s >= 0).collect();
                theirs.sort();
                let ours_e: Vec<i64> =
                    ours.log2phy.slice(ndarray::s![l, e, ..]).iter().copied().filter(|&s| s >= 0).collect();
                if ours.phy2log.row(l) == case.phy2log.row(l) {
                    assert_eq!(ours_e, theirs, "{} layer {l} expert {e}: log2phy differs", case.name);
                }
            }
        }
        if case.name == "readme_example" {
            assert_eq!(ours.phy2log, case.phy2log, "the README example must be exact");
        }
    }
    eprintln!("phy2log equal on {equal} of {layers} layers");
    assert!(equal as f64 >= 0.85 * layers as f64, "phy2log equal on only {equal} of {layers} layers");
}

#[test]
fn incremental_is_never_worse_than_deepseek_on_the_golden_inputs() {
    let Some(cases) = cases() else { return };
    let plan = |case: &Case, kind| {
        policy::rebalance(case.weight.view(), &case.shape, None, &PolicyConfig { kind, ..PolicyConfig::default() })
            .unwrap()
    };
    for case in &cases {
        let (ours, theirs) = (plan(case, PolicyKind::INCREMENTAL), plan(case, PolicyKind::DEEPSEEK));
        let spr = case.shape.slots_per_rank();
        let gpn = case.shape.resolved().gpus_per_node();
        for l in 0..case.weight.nrows() {
            let w = case.weight.row(l).to_vec();
            let a = metrics::layer_balance(&w, &ours.phy2log.row(l).to_vec(), spr, gpn);
            let b = metrics::layer_balance(&w, &theirs.phy2log.row(l).to_vec(), spr, gpn);
            assert!(a.max_gpu_load <= b.max_gpu_load, "{} layer {l}: max GPU load {a:?} vs DeepSeek {b:?}", case.name);
            // Hierarchical mode: the groups' nodes are at least as balanced as DeepSeek's.
            if case.shape.is_hierarchical() {
                // (up to the rounding of per-replica loads, below 2^-24 token a replica)
                assert!(a.node_balancedness >= b.node_balancedness - 1e-9, "{} layer {l}: node balance", case.name);
            }
        }
    }
}

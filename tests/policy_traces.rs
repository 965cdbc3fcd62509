//! The incremental policy on the shared real traces, against the issue's thresholds: fresh
//! balance on Qwen3-235B, and copies moved against next-step balance on the drifting Qwen1.5-MoE
//! trace. The protocol is the one of `scripts/bench_policy.sh`, in process.

mod common;

use std::path::Path;

use eplb::load::{read_trace, LoadTrace, TraceSelect};
use eplb::policy::{self, metrics, Placement, PlacementShape, PolicyConfig, PolicyKind};

fn global(num_replicas: usize, num_gpus: usize) -> PlacementShape {
    PlacementShape { num_replicas, num_gpus, num_nodes: 1, num_groups: 1 }
}

fn config(kind: PolicyKind) -> PolicyConfig {
    PolicyConfig { kind, ..PolicyConfig::default() }
}

fn trace(dir: &Path, file: &str, dataset: Option<&str>) -> LoadTrace {
    read_trace(&dir.join("traces").join(file), &TraceSelect { dataset: dataset.map(String::from) }).unwrap()
}

#[test]
fn fresh_plans_of_qwen3_235b_reach_the_issue_balance() {
    let Some(dir) = common::shared_dir() else { return };
    let weight = trace(&dir, "qwen3_sglang_recorder/counts235b_qwen3-235b-a22b-fp8.json", None).summed().unwrap();
    for (r, g, need) in [(160, 32, 0.995), (192, 64, 0.97)] {
        let shape = global(r, g);
        let balance = |kind| {
            let p = policy::rebalance(weight.view(), &shape, None, &config(kind)).unwrap();
            metrics::balance_report(weight.view(), p.phy2log.view(), shape.slots_per_rank(), 1).balancedness
        };
        let (ours, deepseek) = (balance(PolicyKind::INCREMENTAL), balance(PolicyKind::DEEPSEEK));
        eprintln!("Qwen3-235B EP{g} R={r}: incremental {ours:.4}, deepseek {deepseek:.4}");
        assert!(ours >= need, "EP{g} R={r}: mean balancedness {ours:.4} < {need}");
        assert!(ours > deepseek, "EP{g} R={r}: {ours:.4} is not above DeepSeek's {deepseek:.4}");
    }
}

/// Plans every iteration t >= 1 of `trace` (the incremental policy from its own plan of t-1,
/// DeepSeek fresh) and judges it on t+1: `(copies moved, mean next-step balancedness)`.
fn drift(trace: &LoadTrace, shape: &PlacementShape, kind: PolicyKind) -> (usize, f64) {
    let spr = shape.slots_per_rank();
    let (mut moved, mut balance, mut prev) = (0, Vec::new(), None::<Placement>);
    for t in 0..trace.num_steps() - 1 {
        let p = policy::rebalance(trace.step(t).unwrap().view(), shape, prev.as_ref(), &config(kind)).unwrap();
        if let Some(old) = &prev {
            moved += metrics::copies_moved_all(old.phy2log.view(), p.phy2log.view(), spr);
            let next = trace.step(t + 1).unwrap();
            balance.push(metrics::balance_report(next.view(), p.phy2log.view(), spr, 1).balancedness);
        }
        prev = Some(p);
    }
    (moved, balance.iter().sum::<f64>() / balance.len() as f64)
}

#[test]
fn drifting_qwen15_moves_at_most_a_quarter_of_deepseeks_copies_at_its_balance() {
    let Some(dir) = common::shared_dir() else { return };
    for dataset in ["wikitext", "wmt19"] {
        let t = trace(&dir, "harmoeny_qwen15moe_switch/expert_freq_qwen_policy_datasets.csv", Some(dataset));
        assert_eq!(t.num_steps(), 20);
        for (g, r) in [(4, 64), (6, 66)] {
            let shape = global(r, g);
            let (ours, ours_balance) = drift(&t, &shape, PolicyKind::INCREMENTAL);
            let (theirs, theirs_balance) = drift(&t, &shape, PolicyKind::DEEPSEEK);
            let ratio = ours as f64 / theirs as f64;
            eprintln!(
                "{dataset} EP{g} R={r}: moved {ours} vs DeepSeek {theirs} ({ratio:.3}), \
                 next-step balancedness {ours_balance:.4} vs {theirs_balance:.4}"
            );
            assert!(ratio <= 0.25, "{dataset} EP{g}: moved {ours} copies, DeepSeek {theirs}");
            assert!(
                ours_balance >= theirs_balance - 0.002,
                "{dataset} EP{g}: next-step balancedness {ours_balance:.4} < DeepSeek's {theirs_balance:.4} - 0.002"
            );
        }
    }
}

#[test]
fn plans_of_real_traces_do_not_depend_on_threads_or_repetition() {
    let Some(dir) = common::shared_dir() else { return };
    let t = trace(&dir, "harmoeny_qwen15moe_switch/expert_freq_qwen_policy_datasets.csv", Some("wmt19"));
    let weight = trace(&dir, "qwen3_sglang_recorder/counts30b_qwen3-30b-a3b.json", None).summed().unwrap();
    let hier = PlacementShape { num_replicas: 72, num_gpus: 12, num_nodes: 2, num_groups: 4 };
    let plan = |w: ndarray::ArrayView2<u64>, shape: &PlacementShape, prev: Option<&Placement>, threads| {
        policy::rebalance(w, shape, prev, &PolicyConfig { threads, ..PolicyConfig::default() }).unwrap()
    };
    for shape in [global(66, 6), hier] {
        let prev = plan(t.step(3).unwrap().view(), &shape, None, 1);
        let one = plan(t.step(4).unwrap().view(), &shape, Some(&prev), 1);
        for threads in [1, 2, 3] {
            assert_eq!(plan(t.step(4).unwrap().view(), &shape, Some(&prev), threads), one, "{threads} threads");
        }
    }
    let shape = global(192, 64);
    let one = plan(weight.view(), &shape, None, 1);
    assert_eq!(plan(weight.view(), &shape, None, 2), one);
    assert_eq!(one.hash(), plan(weight.view(), &shape, None, 0).hash());
}

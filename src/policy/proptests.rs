//! Property tests over random shapes and loads, for every policy.

use ndarray::Array2;

use super::{metrics, rebalance, Placement, PlacementShape, PolicyConfig, PolicyKind};
use crate::engine::splitmix64;

/// A small deterministic generator for test cases.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// A random valid shape and load: `(weight [layers, num_logical], shape)`.
fn case(g: &mut Gen) -> (Array2<u64>, PlacementShape) {
    let num_nodes = g.pick(&[1, 1, 2, 4]);
    let gpus_per_node = g.pick(&[1, 2, 3, 4, 8]);
    let num_gpus = num_nodes * gpus_per_node;
    let num_groups = g.pick(&[1, num_nodes, 2 * num_nodes, 3, 8]);
    let group_size = 1 + g.below(12) as usize;
    let num_logical = num_groups * group_size;
    let min_slots = num_logical.div_ceil(num_gpus);
    let slots_per_rank = min_slots + g.below(4) as usize;
    let shape = PlacementShape { num_replicas: slots_per_rank * num_gpus, num_gpus, num_nodes, num_groups };
    let layers = 1 + g.below(4) as usize;
    let kind = g.below(4);
    let weight = Array2::from_shape_fn((layers, num_logical), |(_, e)| match kind {
        0 => g.below(1000),                            // uniform
        1 => 1_000_000 / (1 + e as u64) + g.below(10), // zipf-like
        2 => g.pick(&[0, 0, 0, 5, 7]),                 // many zeros and ties
        _ => g.next() >> (4 + g.below(40)),            // wide range, huge values
    });
    (weight, shape)
}

fn check_invariants(p: &Placement, shape: &PlacementShape, num_logical: usize, ctx: &str) {
    let spr = shape.slots_per_rank();
    for (l, row) in p.phy2log.outer_iter().enumerate() {
        assert_eq!(row.len(), shape.num_replicas, "{ctx}");
        assert_eq!(row.len() % spr, 0, "{ctx}");
        let logcnt = metrics::logcnt_of(&row.to_vec(), num_logical);
        assert!(logcnt.iter().all(|&c| c >= 1), "{ctx} layer {l}: an expert has no replica");
        assert_eq!(logcnt.iter().sum::<usize>(), shape.num_replicas, "{ctx}");
        assert_eq!(p.logcnt.row(l).to_vec(), logcnt, "{ctx}");
        for (e, &count) in logcnt.iter().enumerate() {
            for k in 0..p.log2phy.dim().2 {
                let s = p.log2phy[[l, e, k]];
                if k < count {
                    assert_eq!(row[s as usize], e, "{ctx}: log2phy disagrees with phy2log");
                } else {
                    assert_eq!(s, -1, "{ctx}");
                }
            }
        }
        if shape.is_hierarchical() && shape.num_nodes > 1 {
            // Every group's replicas sit on one node.
            let group_size = num_logical / shape.num_groups;
            let slots_per_node = shape.num_replicas / shape.num_nodes;
            let mut node_of = vec![usize::MAX; shape.num_groups];
            for (s, &e) in row.iter().enumerate() {
                let n = s / slots_per_node;
                let g = e / group_size;
                assert!(node_of[g] == usize::MAX || node_of[g] == n, "{ctx} layer {l}: group {g} spans nodes");
                node_of[g] = n;
            }
        }
    }
}

#[test]
fn invariants_and_determinism_over_random_cases() {
    let mut g = Gen(42);
    for i in 0..150 {
        let (weight, shape) = case(&mut g);
        let num_logical = weight.ncols();
        for kind in [PolicyKind::DEEPSEEK, PolicyKind::INCREMENTAL] {
            let ctx = format!("case {i} {kind:?} {shape:?} E={num_logical}");
            let config = PolicyConfig { kind, threads: 1, ..PolicyConfig::default() };
            let p = rebalance(weight.view(), &shape, None, &config).unwrap();
            check_invariants(&p, &shape, num_logical, &ctx);
            // Identical across repeated runs and thread counts.
            for threads in [1, 2, 3] {
                let again = rebalance(weight.view(), &shape, None, &PolicyConfig { threads, ..config }).unwrap();
                assert_eq!(again, p, "{ctx}: differs with {threads} threads");
            }
            // With a previous placement (the trivial one, and a plan for another load).
            let trivial = Placement::trivial(weight.nrows(), num_logical, shape.num_replicas);
            let other = weight.mapv(|w| w / 2 + 3);
            let planned = rebalance(other.view(), &shape, None, &config).unwrap();
            // Free moves (every candidate is computed) on even cases, the default price on odd.
            let config =
                PolicyConfig { move_cost: if i % 2 == 0 { super::Price::ZERO } else { config.move_cost }, ..config };
            for prev in [&trivial, &planned] {
                let q = rebalance(weight.view(), &shape, Some(prev), &config).unwrap();
                check_invariants(&q, &shape, num_logical, &format!("{ctx} with previous"));
                let again =
                    rebalance(weight.view(), &shape, Some(prev), &PolicyConfig { threads: 2, ..config }).unwrap();
                assert_eq!(again, q, "{ctx}: with previous, differs across thread counts");
            }
        }
    }
}

#[test]
fn incremental_keeps_a_placement_that_is_already_good() {
    // A balanced load planned once: planning again from that plan on the same load moves nothing.
    let mut g = Gen(7);
    for _ in 0..30 {
        let (weight, shape) = case(&mut g);
        let config = PolicyConfig { kind: PolicyKind::INCREMENTAL, threads: 1, ..PolicyConfig::default() };
        let first = rebalance(weight.view(), &shape, None, &config).unwrap();
        let second = rebalance(weight.view(), &shape, Some(&first), &config).unwrap();
        let moved = metrics::copies_moved_all(first.phy2log.view(), second.phy2log.view(), shape.slots_per_rank());
        assert_eq!(moved, 0, "{shape:?}: re-planning the same load moved {moved} copies");
    }
}

#[test]
fn incremental_is_never_worse_than_deepseek() {
    // Fresh plans: the peak GPU load of every layer is at most DeepSeek's.
    let mut g = Gen(99);
    let fresh = |kind| PolicyConfig { kind, threads: 1, ..PolicyConfig::default() };
    for i in 0..600 {
        let (weight, shape) = case(&mut g);
        let ours = rebalance(weight.view(), &shape, None, &fresh(PolicyKind::INCREMENTAL)).unwrap();
        let theirs = rebalance(weight.view(), &shape, None, &fresh(PolicyKind::DEEPSEEK)).unwrap();
        let (spr, gpn) = (shape.slots_per_rank(), shape.resolved().gpus_per_node());
        for l in 0..weight.nrows() {
            let w = weight.row(l).to_vec();
            let a = metrics::layer_balance(&w, &ours.phy2log.row(l).to_vec(), spr, gpn);
            let b = metrics::layer_balance(&w, &theirs.phy2log.row(l).to_vec(), spr, gpn);
            assert!(a.max_gpu_load <= b.max_gpu_load, "case {i} {shape:?} layer {l}: {a:?} vs DeepSeek {b:?}");
        }
    }
}

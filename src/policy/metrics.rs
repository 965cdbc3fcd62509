//! How good a placement is on a load: per-GPU loads, balancedness, and how much a change moves.
//!
//! A logical expert's tokens are split evenly over its replicas, as engines dispatch them; a GPU's
//! load is the sum of its slots' per-replica loads.

use ndarray::{ArrayView1, ArrayView2, Axis};
use serde::Serialize;

use super::fixed::{normalized, per_replica, to_f64, Fixed};

/// Per-GPU loads of one layer (`weight` already [`normalized`]).
///
/// * `weight [num_logical]`, `phy2log [num_replicas]`, `logcnt [num_logical]`;
/// * returns `gpu_load [num_gpus]` with `num_gpus = num_replicas / slots_per_rank`.
pub fn gpu_loads(weight: &[u64], phy2log: &[usize], logcnt: &[usize], slots_per_rank: usize) -> Vec<Fixed> {
    phy2log.chunks(slots_per_rank).map(|slots| slots.iter().map(|&e| per_replica(weight[e], logcnt[e])).sum()).collect()
}

/// Replicas per expert of one layer: `logcnt [num_logical]` from `phy2log [num_replicas]`.
pub fn logcnt_of(phy2log: &[usize], num_logical: usize) -> Vec<usize> {
    let mut logcnt = vec![0usize; num_logical];
    for &e in phy2log {
        logcnt[e] += 1;
    }
    logcnt
}

/// Mean over max of `loads` (1 when all are zero): SGLang's balancedness for one layer.
pub fn balancedness_of(loads: &[Fixed]) -> f64 {
    let max = loads.iter().copied().max().unwrap_or(0);
    if max == 0 {
        return 1.0;
    }
    let sum: Fixed = loads.iter().sum();
    to_f64(sum) / loads.len() as f64 / to_f64(max)
}

/// Balance of one layer of a placement under one load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LayerBalance {
    /// Mean GPU load over max GPU load (1 is perfect).
    pub balancedness: f64,
    /// Max GPU load over mean GPU load (1 is perfect).
    pub max_over_mean: f64,
    /// Mean node load over max node load.
    pub node_balancedness: f64,
    /// The largest GPU load, in tokens.
    pub max_gpu_load: f64,
}

/// The balance of `phy2log` (one layer) under `weight` (one layer), with `gpus_per_node` GPUs a node.
pub fn layer_balance(weight: &[u64], phy2log: &[usize], slots_per_rank: usize, gpus_per_node: usize) -> LayerBalance {
    let weight = &*normalized(weight);
    let logcnt = logcnt_of(phy2log, weight.len());
    let loads = gpu_loads(weight, phy2log, &logcnt, slots_per_rank);
    let node_loads: Vec<Fixed> = loads.chunks(gpus_per_node).map(|g| g.iter().sum()).collect();
    let balancedness = balancedness_of(&loads);
    LayerBalance {
        balancedness,
        max_over_mean: if balancedness > 0.0 { 1.0 / balancedness } else { f64::INFINITY },
        node_balancedness: balancedness_of(&node_loads),
        max_gpu_load: to_f64(loads.iter().copied().max().unwrap_or(0)),
    }
}

/// Balance of a whole placement under a load, per layer and averaged over layers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BalanceReport {
    /// Mean over layers of the per-layer balancedness.
    pub balancedness: f64,
    pub balancedness_per_layer: Vec<f64>,
    /// Mean over layers of max GPU load / mean GPU load.
    pub max_over_mean: f64,
    /// Mean over layers of the node-level balancedness.
    pub node_balancedness: f64,
}

/// The balance of `phy2log [layers, num_replicas]` under `weight [layers, num_logical]`.
pub fn balance_report(
    weight: ArrayView2<u64>,
    phy2log: ArrayView2<usize>,
    slots_per_rank: usize,
    gpus_per_node: usize,
) -> BalanceReport {
    let per_layer: Vec<LayerBalance> = weight
        .axis_iter(Axis(0))
        .zip(phy2log.axis_iter(Axis(0)))
        .map(|(w, p)| layer_balance(&w.to_vec(), &p.to_vec(), slots_per_rank, gpus_per_node))
        .collect();
    let n = per_layer.len().max(1) as f64;
    BalanceReport {
        balancedness: per_layer.iter().map(|b| b.balancedness).sum::<f64>() / n,
        balancedness_per_layer: per_layer.iter().map(|b| b.balancedness).collect(),
        max_over_mean: per_layer.iter().map(|b| b.max_over_mean).sum::<f64>() / n,
        node_balancedness: per_layer.iter().map(|b| b.node_balancedness).sum::<f64>() / n,
    }
}

/// Expert copies that must travel to go from `old` to `new` (one layer each, `[num_replicas]`):
/// the (GPU, expert) copies of `new` that `old` does not already have on that GPU, counted as a
/// multiset. Moving an expert between slots of one GPU is not counted: it needs no transfer.
pub fn copies_moved(old: ArrayView1<usize>, new: ArrayView1<usize>, slots_per_rank: usize) -> usize {
    let old = old.to_vec();
    let new = new.to_vec();
    old.chunks(slots_per_rank)
        .zip(new.chunks(slots_per_rank))
        .map(|(o, n)| {
            let mut have = o.to_vec();
            n.iter()
                .filter(|e| match have.iter().position(|h| h == *e) {
                    Some(i) => {
                        have.swap_remove(i);
                        false
                    }
                    None => true,
                })
                .count()
        })
        .sum()
}

/// [`copies_moved`] summed over every layer of `old` and `new` (`[layers, num_replicas]`).
pub fn copies_moved_all(old: ArrayView2<usize>, new: ArrayView2<usize>, slots_per_rank: usize) -> usize {
    old.axis_iter(Axis(0)).zip(new.axis_iter(Axis(0))).map(|(o, n)| copies_moved(o, n, slots_per_rank)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    #[test]
    fn gpu_loads_split_tokens_over_replicas() {
        // expert 0: 10 tokens on 2 replicas, expert 1: 4 tokens
        let loads = gpu_loads(&[10, 4], &[0, 1, 0, 0], &[3, 1], 2);
        assert!((to_f64(loads[0]) - (10.0 / 3.0 + 4.0)).abs() < 1e-6);
        assert!((to_f64(loads[1]) - 20.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn balance_of_perfect_and_skewed_layers() {
        let b = layer_balance(&[5, 5, 5, 5], &[0, 1, 2, 3], 2, 1);
        assert_eq!(b.balancedness, 1.0);
        let b = layer_balance(&[9, 1, 1, 1], &[0, 1, 2, 3], 2, 1);
        // GPU0 = 10, GPU1 = 2, mean 6: 0.6
        assert!((b.balancedness - 0.6).abs() < 1e-12);
        assert!((b.max_over_mean - 1.0 / 0.6).abs() < 1e-12);
        // one GPU a node: the nodes are as unbalanced as the GPUs.
        assert_eq!(b.node_balancedness, b.balancedness);
        assert_eq!(b.max_gpu_load, 10.0);
        // one node holding both GPUs is balanced at node level.
        let b = layer_balance(&[9, 1, 1, 1], &[0, 1, 2, 3], 2, 2);
        assert_eq!(b.node_balancedness, 1.0);
        assert_eq!(layer_balance(&[0, 0], &[0, 1], 1, 1).balancedness, 1.0);
    }

    #[test]
    fn copies_moved_ignores_moves_within_a_gpu() {
        let old = arr1(&[0usize, 1, 2, 3]);
        assert_eq!(copies_moved(old.view(), arr1(&[1usize, 0, 3, 2]).view(), 2), 0);
        assert_eq!(copies_moved(old.view(), arr1(&[2usize, 0, 1, 3]).view(), 2), 2);
        // duplicates count as a multiset: a second copy of 0 on GPU 0 must travel
        assert_eq!(copies_moved(old.view(), arr1(&[0usize, 0, 2, 3]).view(), 2), 1);
    }
}

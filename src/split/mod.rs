//! Per-step token splitting between an expert's replicas (issue 22): the same integers on every
//! rank, so that every sender and receiver agree where each token goes without a coordinator.
//!
//! # The problem
//! One layer, one step: `counts[e]` tokens (token, k pairs) routed to logical expert `e` over all
//! ranks, and the live placement `phy2log [num_physical]`, GPU `g` owning slots
//! `[g * slots_per_rank, (g + 1) * slots_per_rank)`. Find integer `quotas [num_physical]`, a
//! slot's tokens of its expert, with `sum over e's slots = counts[e]`, minimising the largest
//! GPU load (the sum of its slots' quotas).
//!
//! # The algorithm ([`split_layer`]), exact
//! An expert whose replicas are all on one GPU puts all its tokens there (a *fixed* load `f[g]`).
//! The others with tokens (*flexible* experts, ascending index) send `x[e][g] >= 0` to each GPU
//! `g` holding one of their replicas (their *edges*, GPUs ascending). For a bound `T`, a flow
//! network: source -> flexible expert (capacity `counts[e]`) -> GPU (unbounded, along the
//! edges) -> sink (capacity `T - f[g]`). A split of maximum load `<= T` exists iff the maximum
//! flow saturates every source edge, and then an integer one exists (integral capacities).
//!
//! 1. `T = max(ceil(N / G), max f[g])` (`N` the step's tokens, `G` the GPUs): no split does
//!    better, and every GPU capacity `T - f[g]` is `>= 0`. Every flexible expert's remaining
//!    supply is its count; `x = 0`.
//! 2. While supply remains: a breadth-first search from every expert with supply (distance 0)
//!    over the residual graph (expert -> each GPU of its edges; GPU -> each expert `e` with
//!    `x[e][g] > 0`), level by level. The *target* is the GPU with spare capacity (load `< T`)
//!    at the smallest distance, the lowest index among those. The path back from it takes, at
//!    each step, the lowest-index node of the previous level with the needed edge (an expert
//!    adjacent to the GPU; a GPU that expert sends `> 0` to). It moves
//!    `delta = min(supply of its first expert, T - load of the target, x along its back edges)`.
//! 3. If no GPU with spare capacity is reachable: let `X`, `Y` be the experts and GPUs reached.
//!    Every GPU of `Y` is full (load `T`), every expert sending to `Y` is in `X` (the back
//!    edges), and every edge of `X` ends in `Y`. So any split puts `f(Y) + counts(X)
//!    = |Y| T + r` (r: the supply left) on the `|Y|` GPUs of `Y`: the optimum `T* >= T +
//!    ceil(r / |Y|)`. `T` becomes that bound (the flow stays feasible: capacities only grow)
//!    and step 2 goes on.
//!
//! `T` is always a lower bound of `T*` (steps 1 and 3) and the loop ends only when every token
//! is placed with every GPU load `<= T`: the result's maximum load **is the optimum `T*`**
//! exactly, in integers. It ends: each augmentation moves `delta >= 1` along a shortest path
//! (Edmonds-Karp: finitely many between two raises of `T`), each raise adds `>= 1` to `T`, and
//! at `T = N` every expert's tokens fit on any one of its GPUs.
//!
//! Then `quotas`: a fixed expert gives each GPU's tokens to its slots there; a flexible one
//! gives `x[e][g]`; within one GPU, `k` slots of an expert share `q` tokens as `q / k` each,
//! the first `q mod k` (ascending slots) one more. Experts without tokens get 0 everywhere.
//! Everything is integer and follows the stated orders, so [`split_layer`], the numpy
//! `eplb_client.split.split_layer` and the PyTorch `split_layers` give the same quotas (checked
//! against one golden file by both test suites).
//!
//! # Which token goes where ([`replica_slot`])
//! The tokens of expert `e` in one step are ordered by (source rank, position in that rank's
//! dispatch order); the token at index `k` of that order goes to the replica (slots ascending)
//! `j` with `sum(quotas of replicas < j) <= k < sum(quotas of replicas <= j)`. A sender needs
//! the exclusive prefix over ranks of its expert counts (an all-gather of `[ranks, experts]`
//! counts, or the dispatch layout); every receiver knows its quotas.
//!
//! The *even* dispatch ([`even_quotas`]), engines' fixed rule, for comparison: replica `j` of
//! `n` (slots ascending) gets `counts / n` tokens, and one more where `(j + n - layer mod n)
//! mod n < counts mod n` (the tokens `k` with `(k + layer) mod n = j` of `counts` tokens).

use crate::exit::{ExitKind, Failure};
use thiserror::Error;

/// Bad input: the split refuses rather than misroute a token (exit 2).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SplitError {
    #[error("expert {expert} has a negative token count {count}; counts are token (token, k) pairs of this step")]
    NegativeCount { expert: usize, count: i64 },
    #[error("the counts sum to {sum} tokens, but the step has {tokens}; give every rank's counts (the all-reduced ones) of this layer and step")]
    CountsSum { sum: i128, tokens: i64 },
    #[error(
        "expert {expert} has {count} tokens but no replica in the placement; give the live phy2log row of this layer"
    )]
    NoReplica { expert: usize, count: i64 },
    #[error("phy2log slot {slot} holds expert {expert}, but there are {num_logical} experts")]
    ExpertOutOfRange { slot: usize, expert: usize, num_logical: usize },
    #[error("{num_physical} slots do not divide into ranks of slots_per_rank = {slots_per_rank}")]
    Shape { num_physical: usize, slots_per_rank: usize },
}

/// Every split error is bad input.
impl Failure for SplitError {
    fn kind(&self) -> ExitKind {
        ExitKind::BadInput
    }
}

/// One layer's split: quotas per physical slot and the largest GPU load (the optimum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// quotas `[num_physical]`: tokens slot `p` computes this step.
    pub quotas: Vec<i64>,
    /// max over GPUs of the sum of its slots' quotas.
    pub max_load: i64,
}

/// Checks the input of one layer; returns the total.
fn check(counts: &[i64], tokens: i64, phy2log: &[usize], slots_per_rank: usize) -> Result<(), SplitError> {
    if slots_per_rank == 0 || !phy2log.len().is_multiple_of(slots_per_rank) || phy2log.is_empty() {
        return Err(SplitError::Shape { num_physical: phy2log.len(), slots_per_rank });
    }
    let mut sum: i128 = 0;
    for (expert, &count) in counts.iter().enumerate() {
        if count < 0 {
            return Err(SplitError::NegativeCount { expert, count });
        }
        sum += count as i128;
    }
    if sum != tokens as i128 {
        return Err(SplitError::CountsSum { sum, tokens });
    }
    let mut has = vec![false; counts.len()];
    for (slot, &expert) in phy2log.iter().enumerate() {
        if expert >= counts.len() {
            return Err(SplitError::ExpertOutOfRange { slot, expert, num_logical: counts.len() });
        }
        has[expert] = true;
    }
    if let Some(expert) = (0..counts.len()).find(|&e| counts[e] > 0 && !has[e]) {
        return Err(SplitError::NoReplica { expert, count: counts[expert] });
    }
    Ok(())
}

/// The even dispatch of one layer (the engines' `(token + layer) mod replicas` rule in counts):
/// see the module documentation. Same checks as [`split_layer`].
pub fn even_quotas(
    counts: &[i64],
    tokens: i64,
    phy2log: &[usize],
    slots_per_rank: usize,
    layer: usize,
) -> Result<Vec<i64>, SplitError> {
    check(counts, tokens, phy2log, slots_per_rank)?;
    let mut n = vec![0i64; counts.len()];
    for &e in phy2log {
        n[e] += 1;
    }
    let mut j = vec![0i64; counts.len()];
    let mut quotas = vec![0i64; phy2log.len()];
    for (p, &e) in phy2log.iter().enumerate() {
        let (c, k) = (counts[e], n[e]);
        let shifted = (j[e] + k - (layer as i64 % k)) % k;
        quotas[p] = c / k + i64::from(shifted < c % k);
        j[e] += 1;
    }
    Ok(quotas)
}

/// GPU loads of `quotas` (sum of each rank's slots).
pub fn gpu_loads(quotas: &[i64], slots_per_rank: usize) -> Vec<i64> {
    quotas.chunks(slots_per_rank).map(|c| c.iter().sum()).collect()
}

/// Balancedness of one layer's dispatch: mean / max GPU load (1 when no token).
pub fn balancedness(quotas: &[i64], slots_per_rank: usize) -> f64 {
    let loads = gpu_loads(quotas, slots_per_rank);
    let max = loads.iter().copied().max().unwrap_or(0);
    if max <= 0 {
        return 1.0;
    }
    let sum: i64 = loads.iter().sum();
    sum as f64 / loads.len() as f64 / max as f64
}

/// Reusable buffers of [`split_layer_into`], so that a caller splitting many layers allocates once.
#[derive(Debug, Default, Clone)]
pub struct Workspace {
    /// per expert: first edge, edge count (flexible experts only), flexible index or u32::MAX
    flex_of: Vec<u32>,
    flex_expert: Vec<u32>,
    edge_start: Vec<u32>,
    edge_gpu: Vec<u32>,
    /// per edge: its slots on that GPU (how many)
    edge_slots: Vec<u32>,
    x: Vec<i64>,
    supply: Vec<i64>,
    load: Vec<i64>,
    /// per GPU: its incoming edges, by flexible expert ascending
    gpu_start: Vec<u32>,
    gpu_edges: Vec<u32>,
    dist_e: Vec<u32>,
    dist_g: Vec<u32>,
    frontier: Vec<u32>,
    next: Vec<u32>,
    reached_g: Vec<u32>,
    first_slot_on_gpu: Vec<u32>,
}

const UNSEEN: u32 = u32::MAX;

/// The exact min-max split of one layer (see the module documentation for the algorithm, its
/// tie-breaks and the proof that the result is optimal).
///
/// * `counts [num_logical]`: this step's tokens of each logical expert, over all ranks;
/// * `tokens`: the step's tokens of this layer (the counts must sum to it);
/// * `phy2log [num_physical]`: the live placement row; `slots_per_rank` slots a GPU.
pub fn split_layer(counts: &[i64], tokens: i64, phy2log: &[usize], slots_per_rank: usize) -> Result<Split, SplitError> {
    let mut ws = Workspace::default();
    let mut quotas = vec![0i64; phy2log.len()];
    let max_load = split_layer_into(counts, tokens, phy2log, slots_per_rank, &mut ws, &mut quotas)?;
    Ok(Split { quotas, max_load })
}

/// [`split_layer`] into `quotas` (length `num_physical`) with reusable buffers; returns the max load.
pub fn split_layer_into(
    counts: &[i64],
    tokens: i64,
    phy2log: &[usize],
    slots_per_rank: usize,
    ws: &mut Workspace,
    quotas: &mut [i64],
) -> Result<i64, SplitError> {
    check(counts, tokens, phy2log, slots_per_rank)?;
    let num_logical = counts.len();
    let num_gpus = phy2log.len() / slots_per_rank;
    assert_eq!(quotas.len(), phy2log.len(), "quotas must have num_physical entries");

    // Replicas per (expert, GPU) in slot order: slots of one GPU are contiguous, so an expert's
    // GPUs come ascending when its slots are read ascending. `first` = its first slot's GPU.
    // Count distinct GPUs per expert.
    let mut ngpu = vec![0u32; num_logical];
    let mut last_gpu = vec![UNSEEN; num_logical];
    for (p, &e) in phy2log.iter().enumerate() {
        let g = (p / slots_per_rank) as u32;
        if last_gpu[e] != g {
            last_gpu[e] = g;
            ngpu[e] += 1;
        }
    }
    ws.flex_of.clear();
    ws.flex_of.resize(num_logical, UNSEEN);
    ws.flex_expert.clear();
    ws.edge_start.clear();
    for e in 0..num_logical {
        if ngpu[e] >= 2 && counts[e] > 0 {
            ws.flex_of[e] = ws.flex_expert.len() as u32;
            ws.flex_expert.push(e as u32);
        }
    }
    let m = ws.flex_expert.len();
    // Edge offsets of each flexible expert (edges ascending by GPU).
    let mut off = 0u32;
    for &e in &ws.flex_expert {
        ws.edge_start.push(off);
        off += ngpu[e as usize];
    }
    ws.edge_start.push(off);
    let num_edges = off as usize;
    ws.edge_gpu.clear();
    ws.edge_gpu.resize(num_edges, UNSEEN);
    ws.edge_slots.clear();
    ws.edge_slots.resize(num_edges, 0);
    ws.load.clear();
    ws.load.resize(num_gpus, 0);
    {
        let mut fill = vec![0u32; m];
        for (p, &e) in phy2log.iter().enumerate() {
            let g = (p / slots_per_rank) as u32;
            let f = ws.flex_of[e];
            if f == UNSEEN {
                continue;
            }
            let f = f as usize;
            let base = ws.edge_start[f] as usize;
            let k = fill[f] as usize;
            if k > 0 && ws.edge_gpu[base + k - 1] == g {
                ws.edge_slots[base + k - 1] += 1;
            } else {
                ws.edge_gpu[base + k] = g;
                ws.edge_slots[base + k] = 1;
                fill[f] += 1;
            }
        }
    }
    // Fixed loads: experts on one GPU (with tokens).
    for e in 0..num_logical {
        if ws.flex_of[e] == UNSEEN && counts[e] > 0 {
            // its only GPU: the GPU of any of its slots (recorded in last_gpu)
            ws.load[last_gpu[e] as usize] += counts[e];
        }
    }
    // Incoming edges per GPU, flexible expert ascending (edges are generated in that order).
    ws.gpu_start.clear();
    ws.gpu_start.resize(num_gpus + 1, 0);
    for &g in &ws.edge_gpu {
        ws.gpu_start[g as usize + 1] += 1;
    }
    for g in 0..num_gpus {
        ws.gpu_start[g + 1] += ws.gpu_start[g];
    }
    ws.gpu_edges.clear();
    ws.gpu_edges.resize(num_edges, 0);
    {
        let mut pos: Vec<u32> = ws.gpu_start[..num_gpus].to_vec();
        for edge in 0..num_edges {
            let g = ws.edge_gpu[edge] as usize;
            ws.gpu_edges[pos[g] as usize] = edge as u32;
            pos[g] += 1;
        }
    }
    let mut edge_expert = vec![0u32; num_edges];
    for f in 0..m {
        for edge in ws.edge_start[f]..ws.edge_start[f + 1] {
            edge_expert[edge as usize] = f as u32;
        }
    }

    ws.x.clear();
    ws.x.resize(num_edges, 0);
    ws.supply.clear();
    ws.supply.extend(ws.flex_expert.iter().map(|&e| counts[e as usize]));
    let g64 = num_gpus as i64;
    let mut t = (tokens + g64 - 1) / g64;
    t = t.max(ws.load.iter().copied().max().unwrap_or(0));
    let mut remaining: i64 = ws.supply.iter().sum();

    ws.dist_e.resize(m, UNSEEN);
    ws.dist_g.resize(num_gpus, UNSEEN);
    while remaining > 0 {
        // Level-synchronous BFS from every expert with supply.
        ws.dist_e.iter_mut().for_each(|d| *d = UNSEEN);
        ws.dist_g.iter_mut().for_each(|d| *d = UNSEEN);
        ws.frontier.clear();
        for f in 0..m {
            if ws.supply[f] > 0 {
                ws.dist_e[f] = 0;
                ws.frontier.push(f as u32);
            }
        }
        ws.reached_g.clear();
        let mut level = 0u32;
        let mut target = UNSEEN;
        loop {
            // experts (level) -> GPUs (level + 1)
            ws.next.clear();
            for &f in &ws.frontier {
                let f = f as usize;
                for edge in ws.edge_start[f]..ws.edge_start[f + 1] {
                    let g = ws.edge_gpu[edge as usize] as usize;
                    if ws.dist_g[g] == UNSEEN {
                        ws.dist_g[g] = level + 1;
                        ws.next.push(g as u32);
                    }
                }
            }
            if ws.next.is_empty() {
                break;
            }
            ws.reached_g.extend_from_slice(&ws.next);
            if let Some(&g) = ws.next.iter().filter(|&&g| ws.load[g as usize] < t).min() {
                target = g;
                break;
            }
            // GPUs (level + 1) -> experts sending to them (level + 2)
            std::mem::swap(&mut ws.frontier, &mut ws.next);
            ws.next.clear();
            for &g in &ws.frontier {
                let g = g as usize;
                for i in ws.gpu_start[g]..ws.gpu_start[g + 1] {
                    let edge = ws.gpu_edges[i as usize] as usize;
                    let f = edge_expert[edge] as usize;
                    if ws.x[edge] > 0 && ws.dist_e[f] == UNSEEN {
                        ws.dist_e[f] = level + 2;
                        ws.next.push(f as u32);
                    }
                }
            }
            if ws.next.is_empty() {
                break;
            }
            std::mem::swap(&mut ws.frontier, &mut ws.next);
            level += 2;
        }
        if target == UNSEEN {
            // A Hall set: raise T to its bound.
            let y = ws.reached_g.len() as i64;
            t += (remaining + y - 1) / y;
            continue;
        }
        // The path back: (edge, forward?) pairs from the target to a source expert.
        let mut path: Vec<(usize, bool)> = Vec::new();
        let mut g = target as usize;
        let mut delta = t - ws.load[g];
        let src;
        loop {
            let dg = ws.dist_g[g];
            // lowest-index expert at dg - 1 with an edge to g
            let mut chosen = UNSEEN as usize;
            for i in ws.gpu_start[g]..ws.gpu_start[g + 1] {
                let edge = ws.gpu_edges[i as usize] as usize;
                if ws.dist_e[edge_expert[edge] as usize] == dg - 1 {
                    chosen = edge;
                    break;
                }
            }
            let f = edge_expert[chosen] as usize;
            path.push((chosen, true));
            if dg - 1 == 0 {
                src = f;
                break;
            }
            // lowest-index GPU at dg - 2 that f sends > 0 to
            let de = ws.dist_e[f];
            let mut back = UNSEEN as usize;
            for edge in ws.edge_start[f]..ws.edge_start[f + 1] {
                let edge = edge as usize;
                if ws.x[edge] > 0 && ws.dist_g[ws.edge_gpu[edge] as usize] == de - 1 {
                    back = edge;
                    break;
                }
            }
            delta = delta.min(ws.x[back]);
            path.push((back, false));
            g = ws.edge_gpu[back] as usize;
        }
        delta = delta.min(ws.supply[src]);
        for &(edge, forward) in &path {
            ws.x[edge] += if forward { delta } else { -delta };
        }
        ws.supply[src] -= delta;
        ws.load[target as usize] += delta;
        remaining -= delta;
    }

    // Quotas per slot.
    quotas.iter_mut().for_each(|q| *q = 0);
    // per (expert, GPU): tokens and the slots there, in slot order
    ws.first_slot_on_gpu.clear();
    let mut p = 0;
    while p < phy2log.len() {
        // runs of one expert's slots on one GPU need not be contiguous: count them per GPU
        let g = p / slots_per_rank;
        let gpu_slots = &phy2log[g * slots_per_rank..(g + 1) * slots_per_rank];
        for (i, &e) in gpu_slots.iter().enumerate() {
            if counts[e] == 0 || gpu_slots[..i].contains(&e) {
                continue;
            }
            let k = gpu_slots.iter().filter(|&&x| x == e).count() as i64;
            let q = if ws.flex_of[e] == UNSEEN {
                counts[e]
            } else {
                let f = ws.flex_of[e] as usize;
                let edge = (ws.edge_start[f]..ws.edge_start[f + 1])
                    .find(|&edge| ws.edge_gpu[edge as usize] as usize == g)
                    .expect("a flexible expert has an edge to every GPU of its slots");
                ws.x[edge as usize]
            };
            let mut j = 0i64;
            for (s, &x) in gpu_slots.iter().enumerate() {
                if x == e {
                    quotas[g * slots_per_rank + s] = q / k + i64::from(j < q % k);
                    j += 1;
                }
            }
        }
        p += slots_per_rank;
    }
    Ok(t)
}

/// The slot of the token at index `k` (0-based, in the order of the module documentation) of an
/// expert whose replicas are `slots` (ascending) with `quotas` (all slots' quotas): the first
/// replica whose running quota sum exceeds `k`. None when `k` is not below the expert's tokens.
pub fn replica_slot(slots: &[usize], quotas: &[i64], k: i64) -> Option<usize> {
    let mut end = 0i64;
    for &s in slots {
        end += quotas[s];
        if k < end {
            return Some(s);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The optimum by brute force over every split (tiny cases).
    fn brute(counts: &[i64], phy2log: &[usize], spr: usize) -> i64 {
        let g = phy2log.len() / spr;
        let mut best = i64::MAX;
        // enumerate per-expert distributions over its slots
        fn rec(e: usize, counts: &[i64], phy2log: &[usize], spr: usize, loads: &mut Vec<i64>, best: &mut i64) {
            if e == counts.len() {
                *best = (*best).min(*loads.iter().max().unwrap());
                return;
            }
            let slots: Vec<usize> = (0..phy2log.len()).filter(|&p| phy2log[p] == e).collect();
            let mut assign = vec![0i64; slots.len()];
            fn parts(i: usize, left: i64, a: &mut Vec<i64>, f: &mut dyn FnMut(&[i64])) {
                if i + 1 == a.len() {
                    a[i] = left;
                    f(a);
                    return;
                }
                for v in 0..=left {
                    a[i] = v;
                    parts(i + 1, left - v, a, f);
                }
            }
            if slots.is_empty() {
                rec(e + 1, counts, phy2log, spr, loads, best);
                return;
            }
            parts(0, counts[e], &mut assign, &mut |a: &[i64]| {
                for (i, &s) in slots.iter().enumerate() {
                    loads[s / spr] += a[i];
                }
                rec(e + 1, counts, phy2log, spr, loads, best);
                for (i, &s) in slots.iter().enumerate() {
                    loads[s / spr] -= a[i];
                }
            });
        }
        let mut loads = vec![0i64; g];
        rec(0, counts, phy2log, spr, &mut loads, &mut best);
        best
    }

    fn lcg(state: &mut u64) -> u64 {
        *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *state >> 33
    }

    #[test]
    fn the_split_is_optimal_on_small_random_cases() {
        let mut s = 12345u64;
        for case in 0..400 {
            let e = 2 + (lcg(&mut s) % 4) as usize;
            let g = 2 + (lcg(&mut s) % 3) as usize;
            let spr = 1 + (lcg(&mut s) % 3) as usize;
            if g * spr < e {
                continue;
            }
            let mut phy2log: Vec<usize> =
                (0..g * spr).map(|p| if p < e { p } else { (lcg(&mut s) as usize) % e }).collect();
            // shuffle
            for i in (1..phy2log.len()).rev() {
                let j = (lcg(&mut s) as usize) % (i + 1);
                phy2log.swap(i, j);
            }
            let counts: Vec<i64> = (0..e).map(|_| (lcg(&mut s) % 7) as i64).collect();
            let tokens = counts.iter().sum();
            let split = split_layer(&counts, tokens, &phy2log, spr).unwrap();
            let loads = gpu_loads(&split.quotas, spr);
            assert_eq!(*loads.iter().max().unwrap(), split.max_load, "case {case}");
            assert_eq!(split.max_load, brute(&counts, &phy2log, spr), "case {case}: {counts:?} {phy2log:?} spr {spr}");
            for (x, &want) in counts.iter().enumerate().take(e) {
                let sum: i64 = (0..phy2log.len()).filter(|&p| phy2log[p] == x).map(|p| split.quotas[p]).sum();
                assert_eq!(sum, want, "case {case}");
            }
            assert!(split.quotas.iter().all(|&q| q >= 0));
        }
    }

    #[test]
    fn flow_moves_along_a_chain_of_replicas() {
        // GPU0: A, B; GPU1: B, C; GPU2: C, D. A heavy on GPU0 pushes B to GPU1, C to GPU2.
        let phy2log = [0, 1, 1, 2, 2, 3];
        let counts = [30, 30, 30, 0];
        let s = split_layer(&counts, 90, &phy2log, 2).unwrap();
        assert_eq!(s.max_load, 30);
        assert_eq!(s.quotas, vec![30, 0, 30, 0, 30, 0]);
    }

    #[test]
    fn even_quotas_follow_the_rotation() {
        // expert 0: 3 replicas, 7 tokens; layer 1: replica j gets the k with (k+1)%3 == j
        // k=0..6 -> (k+1)%3: 1,2,0,1,2,0,1 -> j0: 2, j1: 3, j2: 2
        let q = even_quotas(&[7, 2], 9, &[0, 0, 1, 0], 2, 1).unwrap();
        assert_eq!(q, vec![2, 3, 2, 2]);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(split_layer(&[1, -1], 0, &[0, 1], 1), Err(SplitError::NegativeCount { expert: 1, .. })));
        assert!(matches!(split_layer(&[1, 2], 4, &[0, 1], 1), Err(SplitError::CountsSum { sum: 3, tokens: 4 })));
        assert!(matches!(split_layer(&[1, 2], 3, &[0, 0], 1), Err(SplitError::NoReplica { expert: 1, count: 2 })));
        assert!(matches!(split_layer(&[1, 2], 3, &[0, 5], 1), Err(SplitError::ExpertOutOfRange { .. })));
        assert!(matches!(split_layer(&[1, 2], 3, &[0, 1, 0], 2), Err(SplitError::Shape { .. })));
        // an expert without tokens may lack a replica
        assert!(split_layer(&[3, 0], 3, &[0, 0], 1).is_ok());
    }

    #[test]
    fn replica_slot_fills_quotas_in_order() {
        let quotas = [2, 0, 3, 1];
        let slots = [0, 2, 3];
        let got: Vec<_> = (0..7).map(|k| replica_slot(&slots, &quotas, k)).collect();
        assert_eq!(got, vec![Some(0), Some(0), Some(2), Some(2), Some(2), Some(3), None]);
    }
}

//! DeepSeek's reference EPLB (`eplb.py`), ported as pure per-layer functions in exact arithmetic.
//!
//! The reference works in float32 and sorts with PyTorch's unstable sort; this port compares
//! loads exactly (see [`super::fixed`]) and breaks every tie by an explicit rule:
//! * items are taken by (load descending, index ascending);
//! * the lightest pack is chosen by (load ascending, pack index ascending);
//! * a redundant replica goes to the expert with the largest per-replica load `w / c`, the
//!   lowest expert index among equals.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::fixed::{normalized, per_replica, Fixed};
use super::{PlacementShape, Policy, Price};

/// DeepSeek's reference EPLB (`--policy deepseek`): [`hierarchical_layer`] on the resolved shape,
/// a fresh placement every time (the live row and the price are not used).
#[derive(Debug, Clone, Copy, Default)]
pub struct Deepseek;

impl Policy for Deepseek {
    fn place_layer(
        &self,
        weight: &[u64],
        shape: &PlacementShape,
        _previous: Option<&[usize]>,
        _price: Price,
    ) -> Vec<usize> {
        hierarchical_layer(weight, &shape.resolved())
    }
}

/// `replicate_experts` of the reference, for one row.
///
/// * `weight [num_logical]`: tokens per logical expert;
/// * returns `phy2log [num_physical]` (the first `num_logical` slots hold experts `0..num_logical`,
///   then the redundant replicas in creation order), `phyrank [num_physical]` (the replica's
///   creation rank, 0 for the original) and `logcnt [num_logical]`.
pub fn replicate(weight: &[u64], num_physical: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let num_logical = weight.len();
    assert!(num_physical >= num_logical, "replicate: fewer slots than experts");
    let mut phy2log: Vec<usize> = (0..num_logical).collect();
    let mut phyrank = vec![0usize; num_logical];
    let mut logcnt = vec![1usize; num_logical];
    phy2log.reserve(num_physical - num_logical);
    phyrank.reserve(num_physical - num_logical);
    // Max-heap on (per-replica load, lowest index first), packed into one integer key.
    let key = |load: Fixed, e: usize| ((load as u128) << 64) | (u64::MAX - e as u64) as u128;
    let mut heap: BinaryHeap<u128> = weight.iter().enumerate().map(|(e, &w)| key(per_replica(w, 1), e)).collect();
    for _ in num_logical..num_physical {
        let top = heap.pop().expect("heap holds every expert");
        let e = (u64::MAX - top as u64) as usize;
        phy2log.push(e);
        phyrank.push(logcnt[e]);
        logcnt[e] += 1;
        heap.push(key(per_replica(weight[e], logcnt[e]), e));
    }
    (phy2log, phyrank, logcnt)
}

/// `balanced_packing` of the reference, for one row.
///
/// * `weight [num_items]`: the items' loads (any exact unit);
/// * returns `pack_index [num_items]` and `rank_in_pack [num_items]`: every pack receives exactly
///   `num_items / num_packs` items, heaviest item first, each into the lightest pack not yet full.
pub fn balanced_packing(weight: &[Fixed], num_packs: usize) -> (Vec<usize>, Vec<usize>) {
    let num_items = weight.len();
    assert!(num_packs > 0 && num_items.is_multiple_of(num_packs), "balanced_packing: items do not divide into packs");
    let items_per_pack = num_items / num_packs;
    if items_per_pack == 1 {
        // As the reference: item i goes to pack i.
        return ((0..num_items).collect(), vec![0; num_items]);
    }
    let order = sort_desc(weight);
    let mut pack_index = vec![0usize; num_items];
    let mut rank_in_pack = vec![0usize; num_items];
    let mut pack_items = vec![0usize; num_packs];
    // Min-heap on (pack load, pack index) over the packs that are not full, packed into one key.
    let key = |load: Fixed, p: usize| ((load as u128) << 64) | p as u128;
    let mut packs: BinaryHeap<Reverse<u128>> = (0..num_packs).map(|p| Reverse(key(0, p))).collect();
    for &item in &order {
        let Reverse(top) = packs.pop().expect("a pack with room exists while items remain");
        let (load, p) = ((top >> 64) as Fixed, top as u64 as usize);
        pack_index[item] = p;
        rank_in_pack[item] = pack_items[p];
        pack_items[p] += 1;
        if pack_items[p] < items_per_pack {
            packs.push(Reverse(key(load + weight[item], p)));
        }
    }
    (pack_index, rank_in_pack)
}

/// Indices of `weight` by (load descending, index ascending).
pub fn sort_desc(weight: &[Fixed]) -> Vec<usize> {
    let mut keyed: Vec<u128> = weight.iter().enumerate().map(|(i, &w)| (((!w) as u128) << 64) | i as u128).collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|k| k as u64 as usize).collect()
}

/// The inverse of a permutation.
fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0usize; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// `rebalance_experts_hierarchical` of the reference, for one layer.
///
/// * `weight [num_logical]`: tokens per logical expert;
/// * returns `phy2log [num_replicas]`: GPU g owns slots `[g*S, (g+1)*S)` with `S = slots_per_rank`.
///
/// `shape` must be valid for `weight.len()` experts and already resolved to the hierarchical form
/// (`num_groups % num_nodes == 0`; the global policy passes one group and one node).
pub fn hierarchical_layer(weight: &[u64], shape: &PlacementShape) -> Vec<usize> {
    let weight = &*normalized(weight);
    let num_logical = weight.len();
    let (num_groups, num_nodes) = (shape.num_groups, shape.num_nodes);
    let group_size = num_logical / num_groups;
    let groups_per_node = num_groups / num_nodes;
    let logical_per_node = num_logical / num_nodes;
    let physical_per_node = shape.num_replicas / num_nodes;
    let gpus_per_node = shape.num_gpus / num_nodes;
    let slots_per_rank = shape.slots_per_rank();

    // Step 1: pack groups onto nodes. tokens_per_group [num_groups]
    let tokens_per_group: Vec<Fixed> = weight.chunks(group_size).map(|g| g.iter().map(|&w| w as Fixed).sum()).collect();
    let (group_pack, group_rank) = balanced_packing(&tokens_per_group, num_nodes);
    // log2mlog [num_logical]: logical expert -> node-major ("meta-logical") index.
    let log2mlog: Vec<usize> = (0..num_logical)
        .map(|e| {
            let g = e / group_size;
            (group_pack[g] * groups_per_node + group_rank[g]) * group_size + e % group_size
        })
        .collect();
    let mlog2log = inverse(&log2mlog);

    let mut phy2log = Vec::with_capacity(shape.num_replicas);
    for node in 0..num_nodes {
        // Step 2: replicate within the node. tokens_per_mlog [logical_per_node]
        let mlog_base = node * logical_per_node;
        let tokens_per_mlog: Vec<u64> = (0..logical_per_node).map(|j| weight[mlog2log[mlog_base + j]]).collect();
        let (phy2mlog, _phyrank, mlogcnt) = replicate(&tokens_per_mlog, physical_per_node);

        // Step 3: pack the node's replicas onto its GPUs. tokens_per_phy [physical_per_node]
        let tokens_per_phy: Vec<Fixed> =
            phy2mlog.iter().map(|&m| per_replica(tokens_per_mlog[m], mlogcnt[m])).collect();
        let (pack_index, rank_in_pack) = balanced_packing(&tokens_per_phy, gpus_per_node);
        // pphy2phy [physical_per_node]: slot within the node -> replica.
        let phy2pphy: Vec<usize> =
            (0..physical_per_node).map(|p| pack_index[p] * slots_per_rank + rank_in_pack[p]).collect();
        let pphy2phy = inverse(&phy2pphy);
        phy2log.extend(pphy2phy.iter().map(|&p| mlog2log[mlog_base + phy2mlog[p]]));
    }
    phy2log
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fixed::from_tokens;

    #[test]
    fn replicate_gives_extra_slots_to_largest_per_replica_load() {
        let (phy2log, phyrank, logcnt) = replicate(&[10, 4, 9], 6);
        // 10 -> 5 (count 2), then 9 -> 4.5 (count 2), then 5 vs 4.5 vs 4: expert 0 -> 3.33
        assert_eq!(phy2log, vec![0, 1, 2, 0, 2, 0]);
        assert_eq!(phyrank, vec![0, 0, 0, 1, 1, 2]);
        assert_eq!(logcnt, vec![3, 1, 2]);
    }

    #[test]
    fn replicate_breaks_ties_by_lowest_index() {
        let (phy2log, _, logcnt) = replicate(&[6, 6, 6], 5);
        assert_eq!(phy2log, vec![0, 1, 2, 0, 1]);
        assert_eq!(logcnt, vec![2, 2, 1]);
        // 6/2 == 3/1: the lower index (0) wins over expert 1.
        let (phy2log, _, _) = replicate(&[6, 3], 3);
        assert_eq!(phy2log, vec![0, 1, 0]);
    }

    #[test]
    fn balanced_packing_fills_lightest_pack() {
        let w: Vec<Fixed> = [5u64, 1, 4, 2, 3, 3].iter().map(|&x| from_tokens(x)).collect();
        let (pack, rank) = balanced_packing(&w, 2);
        // order: 5(0) 4(2) 3(4) 3(5) 2(3) 1(1)
        // 5->p0, 4->p1, 3(4)->p1 (4<5), 3(5)->p0 (5<7), 2->p0? p0=8 full? p0 has 2 items: 5,3 -> 8; p1 7 -> 2 to p1 -> p1 full, 1 -> p0
        assert_eq!(pack, vec![0, 0, 1, 1, 1, 0]);
        assert_eq!(rank, vec![0, 2, 0, 2, 1, 1]);
    }

    #[test]
    fn balanced_packing_one_item_per_pack_is_identity() {
        let w: Vec<Fixed> = vec![3, 9, 1];
        assert_eq!(balanced_packing(&w, 3), (vec![0, 1, 2], vec![0, 0, 0]));
    }
}

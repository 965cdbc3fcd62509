//! The incremental policy: replica counts and packing chosen together by local search, starting
//! from the live placement when there is one, and moving only what buys real balance.
//!
//! Per layer:
//! 1. **Groups to nodes** (hierarchical mode): each group keeps the node it lives on in the
//!    previous placement (fresh: DeepSeek's balanced packing); then pairs of groups on different
//!    nodes are swapped while that lowers the heavier node enough to pay for the experts it moves.
//! 2. **Within each node**, two candidates are built and the cheaper one wins, by
//!    `peak GPU load + move_cost * mean GPU load * copies moved`:
//!    * *stay*: the previous placement, improved by local search in which every move must cut
//!      the peak by at least `move_cost * mean` per expert copy it sends over the network;
//!    * *fresh*: greedy replica counts and packing (as DeepSeek), improved by cost-free local
//!      search, then its GPUs relabelled and its slots reordered to keep as many experts in place
//!      as possible.
//!
//! The local search ([`Search`]) repeatedly takes the most loaded GPU and applies the best of:
//! * **swap**: exchange a replica on it with a lighter replica on another GPU;
//! * **recount**: turn one replica of an expert with several replicas into a new replica of
//!   another expert, where either the slot is on the peak GPU or the gaining expert is: this
//!   changes the replica counts, and so every per-replica load of both experts, together with the
//!   packing.
//!
//! A move is taken only when the largest load among the GPUs it touches drops below the peak, so
//! the sorted vector of GPU loads falls lexicographically and the search ends. All loads are
//! [`Fixed`] integers and all ties break by index, so every rank computes the same plan.

use super::deepseek::{balanced_packing, replicate};
use super::fixed::{from_tokens, normalized, per_replica, Fixed};
use super::PlacementShape;

/// Default price of moving one expert copy, as a fraction of the layer's mean GPU load: a move
/// must lower the peak GPU load by at least this much per copy it sends.
pub const DEFAULT_MOVE_COST: f64 = 0.01;

/// Upper bound on local-search moves per node and layer, a guard only: each move strictly lowers
/// the sorted load vector, so the search ends long before in practice.
const MAX_MOVES_PER_GPU: usize = 64;
const ROUNDS: usize = 4;

/// `move_cost` as parts per million, so the threshold is exact integer arithmetic.
fn move_cost_ppm(move_cost: f64) -> u128 {
    if move_cost.is_finite() && move_cost > 0.0 {
        (move_cost * 1e6).round() as u128
    } else {
        0
    }
}

/// The incremental policy for one layer.
///
/// * `weight [num_logical]`: tokens per logical expert;
/// * `previous [num_replicas]`: the live `phy2log` row, if any;
/// * returns `phy2log [num_replicas]`.
///
/// `shape` is resolved (hierarchical, or one group and one node) and valid for `weight.len()`.
pub fn layer(weight: &[u64], shape: &PlacementShape, previous: Option<&[usize]>, move_cost: f64) -> Vec<usize> {
    let num_logical = weight.len();
    let num_nodes = shape.num_nodes;
    let group_size = num_logical / shape.num_groups;
    let groups_per_node = shape.num_groups / num_nodes;
    let slots_per_node = shape.num_replicas / num_nodes;
    let slots_per_rank = shape.slots_per_rank();
    let weight = &*normalized(weight);
    let total: u64 = weight.iter().sum();
    // The threshold one copy moved must pay for, in Fixed units: move_cost * mean GPU load.
    let per_copy: Fixed =
        u64::try_from(from_tokens(total) as u128 / shape.num_gpus as u128 * move_cost_ppm(move_cost) / 1_000_000)
            .unwrap_or(Fixed::MAX);

    let node_of_group = groups_to_nodes(weight, shape, previous, per_copy);
    let mut phy2log = vec![0usize; shape.num_replicas];
    for node in 0..num_nodes {
        // The node's experts, ascending: local index i <-> logical expert experts[i].
        let experts: Vec<usize> = (0..shape.num_groups)
            .filter(|&g| node_of_group[g] == node)
            .flat_map(|g| g * group_size..(g + 1) * group_size)
            .collect();
        debug_assert_eq!(experts.len(), groups_per_node * group_size);
        let mut local_of = vec![usize::MAX; num_logical];
        for (i, &e) in experts.iter().enumerate() {
            local_of[e] = i;
        }
        let w_node: Vec<u64> = experts.iter().map(|&e| weight[e]).collect();
        let range = node * slots_per_node..(node + 1) * slots_per_node;
        // The previous slots of this node in local indices; None where a slot held an expert of
        // another node (its group moved).
        let prev_node: Option<Vec<Option<usize>>> = previous.map(|p| {
            p[range.clone()].iter().map(|&e| if local_of[e] != usize::MAX { Some(local_of[e]) } else { None }).collect()
        });
        let slots = solve_node(&w_node, slots_per_node, slots_per_rank, prev_node.as_deref(), per_copy);
        for (s, &i) in range.zip(slots.iter()) {
            phy2log[s] = experts[i];
        }
    }
    phy2log
}

/// Node of every group: `node_of_group [num_groups]`, exactly `groups_per_node` groups a node.
fn groups_to_nodes(weight: &[u64], shape: &PlacementShape, previous: Option<&[usize]>, per_copy: Fixed) -> Vec<usize> {
    let (num_groups, num_nodes) = (shape.num_groups, shape.num_nodes);
    if num_nodes == 1 {
        return vec![0; num_groups];
    }
    let group_size = weight.len() / num_groups;
    let groups_per_node = num_groups / num_nodes;
    let slots_per_node = shape.num_replicas / num_nodes;
    let group_load: Vec<Fixed> = weight.chunks(group_size).map(|g| g.iter().map(|&w| from_tokens(w)).sum()).collect();
    let mut node_of_group = vec![usize::MAX; num_groups];
    // replicas_on[g][n]: replicas of group g's experts on node n in the previous placement.
    let mut replicas_on = vec![vec![0usize; num_nodes]; num_groups];
    match previous {
        Some(prev) => {
            for (s, &e) in prev.iter().enumerate() {
                replicas_on[e / group_size][s / slots_per_node] += 1;
            }
            // Each group to the node holding most of its replicas, while that node has room;
            // the groups with the strongest attachment choose first (ties: lower group index).
            let mut order: Vec<usize> = (0..num_groups).collect();
            order.sort_by_key(|&g| (std::cmp::Reverse(*replicas_on[g].iter().max().unwrap_or(&0)), g));
            let mut room = vec![groups_per_node; num_nodes];
            for g in order {
                let best = (0..num_nodes)
                    .filter(|&n| room[n] > 0)
                    .max_by_key(|&n| (replicas_on[g][n], std::cmp::Reverse(n)))
                    .expect("a node has room while groups remain");
                node_of_group[g] = best;
                room[best] -= 1;
            }
        }
        None => {
            let (pack, _) = balanced_packing(&group_load, num_nodes);
            node_of_group = pack;
        }
    }
    // Swap pairs of groups between the heaviest node and another while it lowers the pair's
    // heavier node by more than the copies the swap moves are worth.
    let node_loads = |nog: &[usize]| {
        let mut l = vec![0 as Fixed; num_nodes];
        for (g, &n) in nog.iter().enumerate() {
            l[n] += group_load[g];
        }
        l
    };
    for _ in 0..num_groups * num_groups {
        let loads = node_loads(&node_of_group);
        let heavy = (0..num_nodes).max_by_key(|&n| (loads[n], std::cmp::Reverse(n))).expect("nodes exist");
        let mut best: Option<(Fixed, usize, usize)> = None;
        for a in (0..num_groups).filter(|&g| node_of_group[g] == heavy) {
            for b in (0..num_groups).filter(|&g| node_of_group[g] != heavy) {
                if group_load[b] >= group_load[a] {
                    continue;
                }
                let other = node_of_group[b];
                let delta = group_load[a] - group_load[b];
                let new_max = (loads[heavy] - delta).max(loads[other] + delta);
                if new_max >= loads[heavy] {
                    continue;
                }
                // Copies a swap sends: the replicas each group has outside its new node.
                let outside = |g: usize, n: usize| replicas_on[g].iter().sum::<usize>() - replicas_on[g][n];
                let moved = outside(a, other) + outside(b, heavy);
                let gain = loads[heavy] - new_max;
                if gain <= per_copy.saturating_mul(moved as u64) {
                    continue;
                }
                if best.is_none_or(|(m, _, _)| new_max < m) {
                    best = Some((new_max, a, b));
                }
            }
        }
        match best {
            Some((_, a, b)) => {
                let (na, nb) = (node_of_group[a], node_of_group[b]);
                node_of_group[a] = nb;
                node_of_group[b] = na;
            }
            None => break,
        }
    }
    node_of_group
}

/// The within-node problem: `weight [num_local]` over `num_slots` slots, `slots_per_rank` a GPU.
///
/// * `prev [num_slots]`: the previous local expert of every slot (None: an expert of another node);
/// * returns the local expert of every slot `[num_slots]`.
fn solve_node(
    weight: &[u64],
    num_slots: usize,
    slots_per_rank: usize,
    prev: Option<&[Option<usize>]>,
    per_copy: Fixed,
) -> Vec<usize> {
    let num_gpus = num_slots / slots_per_rank;
    // Fresh: greedy counts and packing (DeepSeek's), then cost-free local search.
    let (phy2local, _, count) = replicate(weight, num_slots);
    let items: Vec<Fixed> = phy2local.iter().map(|&e| per_replica(weight[e], count[e])).collect();
    let (pack, rank) = balanced_packing(&items, num_gpus);
    let mut start = vec![0usize; num_slots];
    for (p, &e) in phy2local.iter().enumerate() {
        start[pack[p] * slots_per_rank + rank[p]] = e;
    }
    let mut fresh = Search::new(weight, slots_per_rank, start, None, 0);
    fresh.run();
    let Some(prev) = prev else {
        return fresh.slot_expert;
    };

    // Stay: the previous placement, repaired, improved only where the gain pays for the moves.
    let mut stay = Search::new(weight, slots_per_rank, repair(weight, prev, slots_per_rank), Some(prev), per_copy);
    stay.run();
    let stay = keep_slots(&stay.slot_expert, prev, slots_per_rank);
    let fresh = keep_slots(&relabel_gpus(&fresh.slot_expert, prev, slots_per_rank), prev, slots_per_rank);
    let score = |se: &[usize]| {
        let s = Search::new(weight, slots_per_rank, se.to_vec(), Some(prev), 0);
        s.peak().1.saturating_add(per_copy.saturating_mul(s.moved as u64))
    };
    if score(&fresh) < score(&stay) {
        fresh
    } else {
        stay
    }
}

/// Makes a previous node placement valid: fills the slots that held other nodes' experts and
/// gives every expert at least one replica (taking slots from the experts that lose least).
fn repair(weight: &[u64], prev: &[Option<usize>], slots_per_rank: usize) -> Vec<usize> {
    let num_local = weight.len();
    let mut count = vec![0usize; num_local];
    for e in prev.iter().flatten() {
        count[*e] += 1;
    }
    let mut slots: Vec<Option<usize>> = prev.to_vec();
    // Missing experts need a slot: free one from the expert whose remaining replicas would carry
    // the least, w / (c - 1), taking its last slot (ties: lower expert, later slot).
    let missing = count.iter().filter(|&&c| c == 0).count();
    let mut free = slots.iter().filter(|s| s.is_none()).count();
    while free < missing {
        let x = (0..num_local)
            .filter(|&e| count[e] >= 2)
            .min_by_key(|&e| (per_replica(weight[e], count[e] - 1), e))
            .expect("a node has at least as many slots as experts");
        let s = (0..slots.len()).rev().find(|&s| slots[s] == Some(x)).expect("expert x has a slot");
        slots[s] = None;
        count[x] -= 1;
        free += 1;
    }
    // Fill free slots: missing experts first (heaviest first), then the expert with the largest
    // per-replica load, each into the free slot of the least loaded GPU.
    let mut order: Vec<usize> = (0..num_local).filter(|&e| count[e] == 0).collect();
    order.sort_by_key(|&e| (std::cmp::Reverse(weight[e]), e));
    let mut order = order.into_iter();
    while let Some(_) = slots.iter().position(Option::is_none) {
        let e = order.next().unwrap_or_else(|| {
            (0..num_local).max_by_key(|&e| (per_replica(weight[e], count[e]), std::cmp::Reverse(e))).expect("experts")
        });
        let gpu_load = |g: usize| -> Fixed {
            slots[g * slots_per_rank..(g + 1) * slots_per_rank]
                .iter()
                .flatten()
                .map(|&x| per_replica(weight[x], count[x].max(1)))
                .sum()
        };
        let s = (0..slots.len())
            .filter(|&s| slots[s].is_none())
            .min_by_key(|&s| (gpu_load(s / slots_per_rank), s))
            .expect("a free slot exists");
        slots[s] = Some(e);
        count[e] += 1;
    }
    slots.into_iter().map(|s| s.expect("every slot is filled")).collect()
}

/// Renumbers the GPUs of `slot_expert` so that each lands on the previous GPU it shares most
/// experts with (greedy matching by overlap, ties by lower indices).
fn relabel_gpus(slot_expert: &[usize], prev: &[Option<usize>], slots_per_rank: usize) -> Vec<usize> {
    let num_gpus = slot_expert.len() / slots_per_rank;
    let overlap = |n: usize, o: usize| -> usize {
        let mut have: Vec<usize> =
            prev[o * slots_per_rank..(o + 1) * slots_per_rank].iter().flatten().copied().collect();
        slot_expert[n * slots_per_rank..(n + 1) * slots_per_rank]
            .iter()
            .filter(|e| match have.iter().position(|h| h == *e) {
                Some(i) => {
                    have.swap_remove(i);
                    true
                }
                None => false,
            })
            .count()
    };
    let mut pairs: Vec<(usize, usize, usize)> = Vec::new();
    for n in 0..num_gpus {
        for o in 0..num_gpus {
            let k = overlap(n, o);
            if k > 0 {
                pairs.push((k, n, o));
            }
        }
    }
    pairs.sort_by_key(|&(k, n, o)| (std::cmp::Reverse(k), n, o));
    let mut target = vec![usize::MAX; num_gpus];
    let mut taken = vec![false; num_gpus];
    for (_, n, o) in pairs {
        if target[n] == usize::MAX && !taken[o] {
            target[n] = o;
            taken[o] = true;
        }
    }
    let mut free = (0..num_gpus).filter(|&o| !taken[o]);
    for t in target.iter_mut().filter(|t| **t == usize::MAX) {
        *t = free.next().expect("as many old GPUs as new");
    }
    let mut out = vec![0usize; slot_expert.len()];
    for n in 0..num_gpus {
        let o = target[n];
        out[o * slots_per_rank..(o + 1) * slots_per_rank]
            .copy_from_slice(&slot_expert[n * slots_per_rank..(n + 1) * slots_per_rank]);
    }
    out
}

/// Reorders the slots inside every GPU so that an expert that was already in a slot of that GPU
/// stays in that very slot.
fn keep_slots(slot_expert: &[usize], prev: &[Option<usize>], slots_per_rank: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(slot_expert.len());
    for (new, old) in slot_expert.chunks(slots_per_rank).zip(prev.chunks(slots_per_rank)) {
        let mut rest: Vec<usize> = new.to_vec();
        let mut gpu: Vec<Option<usize>> = old
            .iter()
            .map(|o| {
                let e = (*o)?;
                let i = rest.iter().position(|&x| x == e)?;
                rest.remove(i);
                Some(e)
            })
            .collect();
        let mut rest = rest.into_iter();
        for s in gpu.iter_mut().filter(|s| s.is_none()) {
            *s = rest.next();
        }
        out.extend(gpu.into_iter().map(|s| s.expect("as many experts as slots")));
    }
    out
}

/// One local-search move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Move {
    /// Exchange the experts of two slots on different GPUs.
    Swap { i: usize, j: usize },
    /// Slot `j`'s expert (which has other replicas) gives the slot to a new replica of `expert`.
    Recount { j: usize, expert: usize },
}

/// Local search over one node's slots.
struct Search<'a> {
    /// `[num_local]`
    weight: &'a [u64],
    slots_per_rank: usize,
    num_gpus: usize,
    /// `[num_slots]`: local expert of every slot.
    slot_expert: Vec<usize>,
    /// `[num_local]`: replicas per expert.
    count: Vec<usize>,
    /// `[num_local]`: the slots of every expert.
    slots_of: Vec<Vec<usize>>,
    /// `[num_gpus]`
    load: Vec<Fixed>,
    /// `[num_gpus * num_local]`: replicas of expert e on GPU g, now and in the previous placement.
    on_gpu: Vec<u32>,
    prev_on_gpu: Option<Vec<u32>>,
    /// Copies that differ from the previous placement (per GPU, as a multiset).
    moved: usize,
    per_copy: Fixed,
}

impl<'a> Search<'a> {
    fn new(
        weight: &'a [u64],
        slots_per_rank: usize,
        slot_expert: Vec<usize>,
        prev: Option<&[Option<usize>]>,
        per_copy: Fixed,
    ) -> Self {
        let num_local = weight.len();
        let num_gpus = slot_expert.len() / slots_per_rank;
        let mut count = vec![0usize; num_local];
        let mut slots_of = vec![Vec::new(); num_local];
        let mut on_gpu = vec![0u32; num_gpus * num_local];
        for (s, &e) in slot_expert.iter().enumerate() {
            count[e] += 1;
            slots_of[e].push(s);
            on_gpu[(s / slots_per_rank) * num_local + e] += 1;
        }
        let prev_on_gpu = prev.map(|p| {
            let mut v = vec![0u32; num_gpus * num_local];
            for (s, e) in p.iter().enumerate() {
                if let Some(e) = e {
                    v[(s / slots_per_rank) * num_local + e] += 1;
                }
            }
            v
        });
        let moved = match &prev_on_gpu {
            Some(p) => on_gpu.iter().zip(p).map(|(&n, &o)| n.saturating_sub(o) as usize).sum(),
            None => 0,
        };
        let mut s = Search {
            weight,
            slots_per_rank,
            num_gpus,
            slot_expert,
            count,
            slots_of,
            load: vec![0; num_gpus],
            on_gpu,
            prev_on_gpu,
            moved,
            per_copy,
        };
        for g in 0..num_gpus {
            s.load[g] = (g * slots_per_rank..(g + 1) * slots_per_rank).map(|x| s.rep(s.slot_expert[x])).sum();
        }
        s
    }

    fn num_local(&self) -> usize {
        self.weight.len()
    }

    /// Per-replica load of expert e now.
    fn rep(&self, e: usize) -> Fixed {
        per_replica(self.weight[e], self.count[e])
    }

    /// The most loaded GPU (lowest index among equals) and its load.
    fn peak(&self) -> (usize, Fixed) {
        let mut best = (0, self.load[0]);
        for (g, &l) in self.load.iter().enumerate().skip(1) {
            if l > best.1 {
                best = (g, l);
            }
        }
        best
    }

    /// Change in copies moved when one replica of `e` leaves GPU `g` (-1 or 0).
    fn moved_if_removed(&self, g: usize, e: usize) -> isize {
        match &self.prev_on_gpu {
            Some(p) if self.on_gpu[g * self.num_local() + e] > p[g * self.num_local() + e] => -1,
            _ => 0,
        }
    }

    /// Change in copies moved when one replica of `e` arrives on GPU `g` (+1 or 0).
    fn moved_if_added(&self, g: usize, e: usize) -> isize {
        match &self.prev_on_gpu {
            Some(p) if self.on_gpu[g * self.num_local() + e] >= p[g * self.num_local() + e] => 1,
            _ => 0,
        }
    }

    /// Whether a move that lowers the touched GPUs' peak from `peak` to `new_max` while changing
    /// copies moved by `dm` is worth taking.
    fn pays(&self, peak: Fixed, new_max: Fixed, dm: isize) -> bool {
        new_max < peak && (dm <= 0 || peak - new_max > self.per_copy.saturating_mul(dm as u64))
    }

    /// The loads after slot `j`'s expert x gives that slot to a new replica of `b`, for every GPU
    /// it touches: `(gpu, new load)` pairs, appended to `out`.
    fn recount_loads(&self, j: usize, b: usize, out: &mut Vec<(usize, Fixed)>) {
        out.clear();
        let x = self.slot_expert[j];
        let (x_old, x_new) = (self.rep(x), per_replica(self.weight[x], self.count[x] - 1));
        let (b_old, b_new) = (self.rep(b), per_replica(self.weight[b], self.count[b] + 1));
        let gj = j / self.slots_per_rank;
        let n = self.num_local();
        let touch = |g: usize, out: &mut Vec<(usize, Fixed)>| {
            if out.iter().any(|&(h, _)| h == g) {
                return;
            }
            let (mut cx, mut cb) = (self.on_gpu[g * n + x] as u64, self.on_gpu[g * n + b] as u64);
            let mut l = self.load[g] - cx * x_old - cb * b_old;
            if g == gj {
                cx -= 1;
                cb += 1;
            }
            l += cx * x_new + cb * b_new;
            out.push((g, l));
        };
        touch(gj, out);
        for &s in self.slots_of[x].iter().chain(self.slots_of[b].iter()) {
            touch(s / self.slots_per_rank, out);
        }
    }

    /// The best move that lowers GPU `a` (the peak, at load `peak`), if any pays.
    fn best_move(&self, a: usize, peak: Fixed) -> Option<Move> {
        let spr = self.slots_per_rank;
        let on_a = a * spr..(a + 1) * spr;
        // (cost, dm, move): the lowest cost wins, then fewer copies moved, then the earlier move.
        let mut best: Option<(Fixed, isize, Move)> = None;
        let consider = |new_max: Fixed, dm: isize, mv: Move, best: &mut Option<(Fixed, isize, Move)>| {
            if !self.pays(peak, new_max, dm) {
                return;
            }
            let cost = new_max.saturating_add(self.per_copy.saturating_mul(dm.max(0) as u64));
            if best.is_none_or(|(c, d, _)| (cost, dm) < (c, d)) {
                *best = Some((cost, dm, mv));
            }
        };
        // Swaps of a replica on `a` with a lighter one elsewhere.
        for i in on_a.clone() {
            let ea = self.slot_expert[i];
            let ra = self.rep(ea);
            for g in (0..self.num_gpus).filter(|&g| g != a) {
                let lg = self.load[g];
                if lg >= peak {
                    continue;
                }
                for j in g * spr..(g + 1) * spr {
                    let eb = self.slot_expert[j];
                    let rb = self.rep(eb);
                    if eb == ea || rb >= ra {
                        continue;
                    }
                    let d = ra - rb;
                    let new_max = (peak - d).max(lg + d);
                    let dm = self.moved_if_removed(a, ea)
                        + self.moved_if_added(g, eb)
                        + self.moved_if_removed(g, eb)
                        + self.moved_if_added(a, ea);
                    consider(new_max, dm, Move::Swap { i, j }, &mut best);
                }
            }
        }
        // Recounts: a slot on `a` changes expert, or an expert on `a` gains a replica elsewhere.
        let mut loads = Vec::new();
        let mut eval = |j: usize, b: usize, best: &mut Option<(Fixed, isize, Move)>| {
            let x = self.slot_expert[j];
            if x == b || self.count[x] < 2 {
                return;
            }
            self.recount_loads(j, b, &mut loads);
            let new_max = loads.iter().map(|&(_, l)| l).max().unwrap_or(0);
            let g = j / spr;
            let dm = self.moved_if_removed(g, x) + self.moved_if_added(g, b);
            consider(new_max, dm, Move::Recount { j, expert: b }, best);
        };
        // A slot on `a` changes expert: only the new expert's per-replica load matters to `a`
        // (the old expert's other GPUs gain the same whatever replaces it), so the candidates
        // are the expert with the least load per replica once it gains one, the experts already
        // on `a`, and the expert that would come back home cheapest.
        let n = self.num_local();
        let lightest = |home_only: bool| {
            (0..n)
                .filter(|&b| {
                    !home_only || self.prev_on_gpu.as_ref().is_some_and(|p| p[a * n + b] > self.on_gpu[a * n + b])
                })
                .min_by_key(|&b| (per_replica(self.weight[b], self.count[b] + 1), b))
        };
        let mut candidates: Vec<usize> = on_a.clone().map(|s| self.slot_expert[s]).collect();
        candidates.extend(lightest(false));
        candidates.extend(lightest(true));
        candidates.sort_unstable();
        candidates.dedup();
        for j in on_a.clone() {
            for &b in &candidates {
                eval(j, b, &mut best);
            }
        }
        // An expert on `a` gains a replica in a slot elsewhere, taken from an expert with several.
        let mut experts_on_a: Vec<usize> = on_a.clone().map(|s| self.slot_expert[s]).collect();
        experts_on_a.sort_unstable();
        experts_on_a.dedup();
        for &b in &experts_on_a {
            // `a` itself ends at this load at best; skip `b` if that cannot beat the best so far.
            let a_after =
                peak - self.on_gpu[a * n + b] as u64 * (self.rep(b) - per_replica(self.weight[b], self.count[b] + 1));
            if best.is_some_and(|(c, _, _)| a_after >= c) || a_after >= peak {
                continue;
            }
            for x in (0..n).filter(|&x| self.count[x] >= 2 && x != b) {
                for &j in &self.slots_of[x] {
                    if !on_a.contains(&j) {
                        eval(j, b, &mut best);
                    }
                }
            }
        }
        best.map(|(_, _, mv)| mv)
    }

    /// Moves one replica of `e` from slot bookkeeping: slot `s` now holds `to` instead of `from`.
    fn set_slot(&mut self, s: usize, to: usize) {
        let n = self.num_local();
        let g = s / self.slots_per_rank;
        let from = self.slot_expert[s];
        self.moved = (self.moved as isize + self.moved_if_removed(g, from)) as usize;
        self.on_gpu[g * n + from] -= 1;
        self.moved = (self.moved as isize + self.moved_if_added(g, to)) as usize;
        self.on_gpu[g * n + to] += 1;
        self.slot_expert[s] = to;
        let pos = self.slots_of[from].iter().position(|&x| x == s).expect("slot is listed");
        self.slots_of[from].swap_remove(pos);
        self.slots_of[to].push(s);
    }

    fn apply(&mut self, mv: Move) {
        match mv {
            Move::Swap { i, j } => {
                let (ea, eb) = (self.slot_expert[i], self.slot_expert[j]);
                let d = self.rep(ea) - self.rep(eb);
                self.load[i / self.slots_per_rank] -= d;
                self.load[j / self.slots_per_rank] += d;
                self.set_slot(i, eb);
                self.set_slot(j, ea);
            }
            Move::Recount { j, expert } => {
                let mut loads = Vec::new();
                self.recount_loads(j, expert, &mut loads);
                for (g, l) in loads {
                    self.load[g] = l;
                }
                let x = self.slot_expert[j];
                self.count[x] -= 1;
                self.count[expert] += 1;
                self.set_slot(j, expert);
            }
        }
    }

    /// Applies the best paying move on the peak GPU until none is left.
    fn run(&mut self) {
        for _round in 0..ROUNDS {
            let before = self.peak().1;
            for _ in 0..MAX_MOVES_PER_GPU * self.num_gpus {
                let (a, peak) = self.peak();
                match self.best_move(a, peak) {
                    Some(mv) => self.apply(mv),
                    None => break,
                }
            }
            if self.per_copy != 0 || !self.balance_pairs() || self.peak().1 >= before && _round > 0 {
                // nothing
            }
        }
    }

    /// One pass of pairwise balancing: for every pair of GPUs, the swap that most lowers the
    /// heavier of the two. Returns whether anything changed.
    fn balance_pairs(&mut self) -> bool {
        let spr = self.slots_per_rank;
        let mut changed = false;
        for a in 0..self.num_gpus {
            for b in 0..self.num_gpus {
                if self.load[a] <= self.load[b] {
                    continue;
                }
                let (la, lb) = (self.load[a], self.load[b]);
                let mut best: Option<(Fixed, usize, usize)> = None;
                for i in a * spr..(a + 1) * spr {
                    let ra = self.rep(self.slot_expert[i]);
                    for j in b * spr..(b + 1) * spr {
                        let rb = self.rep(self.slot_expert[j]);
                        if rb >= ra || self.slot_expert[i] == self.slot_expert[j] {
                            continue;
                        }
                        let d = ra - rb;
                        let m = (la - d).max(lb + d);
                        if m < la && best.is_none_or(|(bm, _, _)| m < bm) {
                            best = Some((m, i, j));
                        }
                    }
                }
                if let Some((_, i, j)) = best {
                    self.apply(Move::Swap { i, j });
                    changed = true;
                }
            }
        }
        changed
    }
}

//! Cardinality-constrained packing by the balanced largest differencing method (Karmarkar-Karp
//! generalised to `k` packs of equal item counts; Michiels, Korst, Aarts and van Leeuwen, 2003).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::deepseek::sort_desc;
use super::fixed::Fixed;

/// No item (end of a pack's item list).
const NIL: usize = usize::MAX;

/// Packs `items [num_items]` into `num_packs` packs of exactly `num_items / num_packs` items each.
/// Returns `pack_of [num_items]`, and the peak that DeepSeek's greedy packing reaches on the same
/// items (see [`greedy_peak`]), so that callers can tell when the greedy packing is better.
///
/// The items, heaviest first, form `num_items / num_packs` rows of `num_packs` items; each row is
/// a partial solution of `num_packs` one-item packs. Then, while more than one partial solution
/// remains, the two with the largest spread (heaviest pack minus lightest; ties: the lower index)
/// are merged by joining the heaviest pack of one with the lightest of the other, the second
/// heaviest with the second lightest, and so on. Each merge cancels most of both spreads, which
/// greedy packing (heaviest item into the lightest pack) does not. Packs are numbered by
/// decreasing load (ties: the pack holding the lower item index first, as rows are built).
pub(super) fn differencing(items: &[Fixed], num_packs: usize) -> (Vec<usize>, Fixed) {
    let num_items = items.len();
    assert!(num_packs > 0 && num_items.is_multiple_of(num_packs), "differencing: items do not divide into packs");
    let order = sort_desc(items);
    let greedy = greedy_peak(items, &order, num_packs);
    // Every pack is a linked list of items: `first`/`last` per pack id (the id of its first
    // item), `next [num_items]`.
    let mut next = vec![NIL; num_items];
    let mut last: Vec<usize> = (0..num_items).collect();
    // A partial solution: (load, pack id) by decreasing load.
    let mut solutions: Vec<Vec<(Fixed, usize)>> =
        order.chunks(num_packs).map(|row| row.iter().map(|&i| (items[i], i)).collect()).collect();
    let spread = |s: &[(Fixed, usize)]| s[0].0 - s[s.len() - 1].0;
    while solutions.len() > 1 {
        // The two partial solutions with the largest spreads (ties: lower index).
        let (mut p, mut q) = (0, 1);
        if spread(&solutions[q]) > spread(&solutions[p]) {
            std::mem::swap(&mut p, &mut q);
        }
        for k in 2..solutions.len() {
            let s = spread(&solutions[k]);
            if s > spread(&solutions[p]) {
                q = p;
                p = k;
            } else if s > spread(&solutions[q]) {
                q = k;
            }
        }
        let b = solutions.swap_remove(p.max(q));
        let a = solutions.swap_remove(p.min(q));
        let mut merged: Vec<(Fixed, usize)> = a
            .iter()
            .zip(b.iter().rev())
            .map(|(&(la, ia), &(lb, ib))| {
                next[last[ia]] = ib;
                last[ia] = last[ib];
                (la + lb, ia)
            })
            .collect();
        merged.sort_unstable_by_key(|&(l, id)| (std::cmp::Reverse(l), id));
        solutions.push(merged);
    }
    let mut pack_of = vec![0usize; num_items];
    for (k, &(_, id)) in solutions[0].iter().enumerate() {
        let mut i = id;
        while i != NIL {
            pack_of[i] = k;
            i = next[i];
        }
    }
    (pack_of, greedy)
}

/// The largest pack load of DeepSeek's greedy packing (`deepseek::balanced_packing`) of `items`:
/// the items in `order` (load descending, index ascending), each into the lightest pack that is
/// not full (ties: the lower pack). Only the loads are kept, not the assignment.
fn greedy_peak(items: &[Fixed], order: &[usize], num_packs: usize) -> Fixed {
    let per_pack = items.len() / num_packs;
    let mut load = vec![0 as Fixed; num_packs];
    let mut filled = vec![0usize; num_packs];
    // Min-heap on (pack load, pack index) over the packs that are not full.
    let mut heap: BinaryHeap<Reverse<u128>> = (0..num_packs).map(|p| Reverse(p as u128)).collect();
    for &i in order {
        let Reverse(top) = heap.pop().expect("a pack with room exists while items remain");
        let p = top as u64 as usize;
        load[p] += items[i];
        filled[p] += 1;
        if filled[p] < per_pack {
            heap.push(Reverse(((load[p] as u128) << 64) | p as u128));
        }
    }
    load.into_iter().max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differencing_fills_every_pack_and_balances() {
        // 6 items, 2 packs of 3: rows (9, 8), (7, 6), (5, 1): spreads 1, 1, 4.
        // Merge (5,1) with (9,8): 9+1, 8+5 -> (13, 10); then (13,10) with (7,6): 13+6, 10+7.
        let items: Vec<Fixed> = vec![9, 8, 7, 6, 5, 1];
        let (pack, greedy) = differencing(&items, 2);
        // Greedy: 9 -> p0, 8 -> p1, 7 -> p1 (15), 6 -> p0 (15), 5 -> p0 (20, full), 1 -> p1 (16).
        assert_eq!(greedy, 20);
        let loads: Vec<Fixed> =
            (0..2).map(|p| items.iter().zip(&pack).filter(|(_, &k)| k == p).map(|(&w, _)| w).sum()).collect();
        assert_eq!(loads, vec![19, 17]);
        for p in 0..2 {
            assert_eq!(pack.iter().filter(|&&k| k == p).count(), 3);
        }
    }

    /// The peak of `deepseek::balanced_packing` itself.
    fn greedy_reference(items: &[Fixed], num_packs: usize) -> Fixed {
        let (pack, _) = crate::policy::deepseek::balanced_packing(items, num_packs);
        (0..num_packs).map(|p| items.iter().zip(&pack).filter(|(_, &k)| k == p).map(|(&w, _)| w).sum()).max().unwrap()
    }

    #[test]
    fn greedy_peak_is_deepseeks() {
        for seed in 0..200u64 {
            let r = |k: u64| crate::engine::splitmix64(seed * 977 + k);
            let packs = 1 + (r(0) % 9) as usize;
            let per = 1 + (r(1) % 6) as usize;
            let items: Vec<Fixed> = (0..packs * per).map(|i| r(10 + i as u64) % (1 + r(2) % 50)).collect();
            assert_eq!(differencing(&items, packs).1, greedy_reference(&items, packs), "seed {seed}");
        }
    }
}

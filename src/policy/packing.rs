//! Cardinality-constrained packing by the balanced largest differencing method (Karmarkar-Karp
//! generalised to `k` packs of equal item counts; Michiels, Korst, Aarts and van Leeuwen, 2003).

use super::deepseek::sort_desc;
use super::fixed::Fixed;

/// No item (end of a pack's item list).
const NIL: usize = usize::MAX;

/// Packs `items [num_items]` into `num_packs` packs of exactly `num_items / num_packs` items each
/// and returns `pack_of [num_items]`.
///
/// The items, heaviest first, form `num_items / num_packs` rows of `num_packs` items; each row is
/// a partial solution of `num_packs` one-item packs. Then, while more than one partial solution
/// remains, the two with the largest spread (heaviest pack minus lightest; ties: the lower index)
/// are merged by joining the heaviest pack of one with the lightest of the other, the second
/// heaviest with the second lightest, and so on. Each merge cancels most of both spreads, which
/// greedy packing (heaviest item into the lightest pack) does not. Packs are numbered by
/// decreasing load (ties: the pack holding the lower item index first, as rows are built).
pub(super) fn differencing(items: &[Fixed], num_packs: usize) -> Vec<usize> {
    let num_items = items.len();
    assert!(num_packs > 0 && num_items.is_multiple_of(num_packs), "differencing: items do not divide into packs");
    let order = sort_desc(items);
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
    pack_of
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differencing_fills_every_pack_and_balances() {
        // 6 items, 2 packs of 3: rows (9, 8), (7, 6), (5, 1): spreads 1, 1, 4.
        // Merge (5,1) with (9,8): 9+1, 8+5 -> (13, 10); then (13,10) with (7,6): 13+6, 10+7.
        let items: Vec<Fixed> = vec![9, 8, 7, 6, 5, 1];
        let pack = differencing(&items, 2);
        let loads: Vec<Fixed> =
            (0..2).map(|p| items.iter().zip(&pack).filter(|(_, &k)| k == p).map(|(&w, _)| w).sum()).collect();
        assert_eq!(loads, vec![19, 17]);
        for p in 0..2 {
            assert_eq!(pack.iter().filter(|&&k| k == p).count(), 3);
        }
    }
}

//! `run --force-moves N`: a benchmark mode that moves weights when balance cannot change them.
//!
//! With one engine rank (one GPU) no placement is better than another, so the manager never
//! moves anything, and the executor's staging, verification and the engine's apply could not be
//! measured. Every `N` steps this mode forces a new placement of one layer *inside each rank*
//! ([`forced_row`]): the layer's slots rotated within each rank, and every other time one
//! redundant replica replaced by another expert; every logical expert stays present globally.
//! The new row goes through the normal protocol (staged, verified, agreed, applied at one step
//! on every rank); the manager is not told (its plans start from the live placement anyway).

/// The new `phy2log` row of the `k`-th forced move of a layer whose row is `old`
/// (`[num_physical]`, `slots_per_rank` slots a rank, experts in `0..num_logical`): first, on odd
/// `k`, the first slot (in physical order) whose expert has another replica takes expert
/// `(e + 1 + k / 2) % num_logical` (the first one after it that is not `e`); then every rank's
/// slots are rotated by one (slot `s` takes what slot `s + 1` held). `None` when nothing can
/// change (one slot a rank and no redundant replica). A pure function of its arguments, so every
/// rank forces the same row.
pub(crate) fn forced_row(old: &[usize], slots_per_rank: usize, num_logical: usize, k: u64) -> Option<Vec<usize>> {
    if slots_per_rank == 0 || num_logical == 0 || !old.len().is_multiple_of(slots_per_rank) {
        return None;
    }
    let mut row = old.to_vec();
    if k % 2 == 1 && num_logical > 1 {
        let mut count = vec![0usize; num_logical];
        for &e in &row {
            if let Some(c) = count.get_mut(e) {
                *c += 1;
            }
        }
        if let Some(p) = row.iter().position(|&e| count.get(e).is_some_and(|&c| c >= 2)) {
            let e = row[p];
            let mut to = (e + 1 + (k / 2) as usize) % num_logical;
            if to == e {
                to = (to + 1) % num_logical;
            }
            row[p] = to;
        }
    }
    for r in row.chunks_mut(slots_per_rank) {
        r.rotate_left(1);
    }
    (row != old).then_some(row)
}

/// Whether step `step` (0-based) forces a move with `--force-moves every`, and which: the
/// `k`-th (from 1), on layer `(k - 1) % num_layers`.
pub fn due(step: usize, every: u64, num_layers: usize) -> Option<(usize, u64)> {
    let s = step as u64 + 1;
    (every > 0 && num_layers > 0 && s.is_multiple_of(every)).then(|| {
        let k = s / every;
        (((k - 1) % num_layers as u64) as usize, k)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every expert of `0..n` at least once, nothing else.
    fn covers(row: &[usize], n: usize) -> bool {
        (0..n).all(|e| row.contains(&e)) && row.iter().all(|&e| e < n)
    }

    #[test]
    fn forced_rows_stay_inside_each_rank_and_keep_every_expert() {
        // 2 ranks x 3 slots, 4 experts: experts 0 and 1 have two replicas.
        let old = vec![0, 1, 2, 3, 0, 1];
        let even = forced_row(&old, 3, 4, 2).unwrap();
        assert_eq!(even, vec![1, 2, 0, 0, 1, 3], "a rotation inside each rank");
        let odd = forced_row(&old, 3, 4, 1).unwrap();
        // Slot 0's expert 0 has another replica: it becomes expert 1, then the rotation.
        assert_eq!(odd, vec![1, 2, 1, 0, 1, 3]);
        let mut row = old.clone();
        for k in 1..50 {
            let next = forced_row(&row, 3, 4, k).unwrap();
            assert!(covers(&next, 4), "k {k}: {next:?}");
            assert_ne!(next, row);
            row = next;
        }
        // One rank (one GPU): permutations and replica changes inside it.
        let one = vec![0, 1, 2, 0];
        let f = forced_row(&one, 4, 3, 1).unwrap();
        assert!(covers(&f, 3) && f != one, "{f:?}");
        // Nothing can change: one slot a rank, no redundancy.
        assert_eq!(forced_row(&[0, 1], 1, 2, 1), None);
        assert_eq!(forced_row(&[0, 1], 1, 2, 2), None);
    }

    #[test]
    fn moves_are_due_every_n_steps_over_the_layers_in_turn() {
        let due_at: Vec<(usize, (usize, u64))> = (0..12).filter_map(|s| due(s, 3, 2).map(|d| (s, d))).collect();
        assert_eq!(due_at, vec![(2, (0, 1)), (5, (1, 2)), (8, (0, 3)), (11, (1, 4))]);
        assert_eq!(due(5, 0, 2), None);
    }
}

//! Where the synthetic engine's loads come from, and how an engine counts them per slot.
//!
//! A source gives the global load of a step, `weight [layers, num_logical]`: the next iteration
//! of a trace (wrapping around) or the built-in drifting zipf-like generator. Every rank computes
//! the same global load and counts only its own slots, as an engine would ([`slot_loads`]): a
//! logical expert's tokens are split evenly over its replicas. The all-reduce of
//! [`logical_from_slots`] over all ranks gives the global load back exactly.

use ndarray::{Array2, ArrayView2};

use super::synthetic::DriftingZipf;
use crate::load::LoadTrace;
use crate::policy::Placement;

/// The load the synthetic engine replays.
#[derive(Debug, Clone)]
pub(crate) enum LoadSource {
    /// Each step replays the next step of the trace, wrapping around.
    Trace(LoadTrace),
    /// The built-in zipf-like hot experts that drift over time.
    Zipf(DriftingZipf),
}

impl LoadSource {
    pub fn num_layers(&self) -> usize {
        match self {
            LoadSource::Trace(t) => t.num_layers(),
            LoadSource::Zipf(z) => z.num_layers,
        }
    }

    pub fn num_logical(&self) -> usize {
        match self {
            LoadSource::Trace(t) => t.num_logical(),
            LoadSource::Zipf(z) => z.num_logical,
        }
    }

    /// The global load of step `step`: `[layers, num_logical]`.
    pub(crate) fn global_step(&self, step: usize) -> Array2<u64> {
        match self {
            LoadSource::Trace(t) => t.steps[step % t.num_steps().max(1)].clone(),
            LoadSource::Zipf(z) => z.step(step),
        }
    }

    /// One line for the header.
    pub(crate) fn describe(&self) -> String {
        match self {
            LoadSource::Trace(t) => format!(
                "trace {} ({}{}, {} steps, replayed in a loop)",
                t.path.display(),
                t.format,
                t.dataset.as_ref().map(|d| format!(", dataset {d}")).unwrap_or_default(),
                t.num_steps()
            ),
            LoadSource::Zipf(z) => format!(
                "built-in drifting zipf (exponent {}, drift {} steps, seed {})",
                z.exponent, z.drift_steps, z.seed
            ),
        }
    }
}

/// Token counts of rank `rank`'s slots, `[layers, slots_per_rank]`, when `global [layers,
/// num_logical]` is routed on `placement`: expert `e` with `t` tokens on `c` replicas gives its
/// `i`-th replica (in slot order) `t / c`, plus one for the first `t % c` replicas.
pub fn slot_loads(global: ArrayView2<u64>, placement: &Placement, rank: usize, slots_per_rank: usize) -> Array2<u64> {
    let layers = global.nrows();
    let base = rank * slots_per_rank;
    let mut out = Array2::<u64>::zeros((layers, slots_per_rank));
    for layer in 0..layers {
        let row = placement.phy2log.row(layer);
        for k in 0..slots_per_rank {
            let e = row[base + k];
            let c = placement.logcnt[[layer, e]] as u64;
            // This slot's replica index: the replicas of e in earlier slots.
            let i = row.iter().take(base + k).filter(|&&x| x == e).count() as u64;
            let t = global[[layer, e]];
            out[[layer, k]] = t / c + u64::from(i < t % c);
        }
    }
    out
}

/// A rank's contribution to the global load: its counts summed per logical expert,
/// `[layers, num_logical]`; `placement` is the placement the counts were taken on. `slots` is
/// either `[layers, slots_per_rank]`, the counts of this rank's own slots (contract
/// `counts_kind` 0: column `k` is physical slot `rank * slots_per_rank + k`), or `[layers,
/// num_physical]`, this rank's view of every physical slot (`counts_kind` 1: column `p` is
/// physical slot `p`). Summed over the ranks, either gives the global per-physical load, and so
/// the same logical load (with one rank the two shapes coincide, and so do their meanings).
pub(crate) fn logical_from_slots(
    slots: ArrayView2<u64>,
    placement: &Placement,
    rank: usize,
    num_logical: usize,
) -> Array2<u64> {
    let (layers, cols) = slots.dim();
    let first = if cols == placement.num_replicas() { 0 } else { rank * cols };
    let mut out = Array2::<u64>::zeros((layers, num_logical));
    for layer in 0..layers {
        for k in 0..cols {
            let e = placement.phy2log[[layer, first + k]];
            out[[layer, e]] += slots[[layer, k]];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_physical_counts_give_the_same_logical_load() {
        // 2 ranks x 3 slots. Local counts: each rank its own slots. Physical counts: each rank its
        // view of all 6 slots (what it routed there); the ranks' views sum to the slots' loads.
        let p = Placement::from_phy2log(ndarray::arr2(&[[0, 1, 0, 2, 0, 1]]), 3).unwrap();
        let slots = [4u64, 7, 3, 3, 3, 2];
        let local: Vec<Array2<u64>> = (0..2)
            .map(|r| ndarray::Array2::from_shape_vec((1, 3), slots[r * 3..r * 3 + 3].to_vec()).unwrap())
            .collect();
        let view0 = ndarray::arr2(&[[1u64, 7, 0, 3, 1, 2]]);
        let view1 = ndarray::arr2(&[[3u64, 0, 3, 0, 2, 0]]);
        let sum = |a: Array2<u64>, b: Array2<u64>| a + b;
        let from_local =
            sum(logical_from_slots(local[0].view(), &p, 0, 3), logical_from_slots(local[1].view(), &p, 1, 3));
        let from_physical = sum(logical_from_slots(view0.view(), &p, 0, 3), logical_from_slots(view1.view(), &p, 1, 3));
        assert_eq!(from_local, ndarray::arr2(&[[10, 9, 3]]));
        assert_eq!(from_physical, from_local);
    }

    #[test]
    fn slot_counts_split_evenly_and_sum_back_to_the_global_load() {
        // 2 ranks x 3 slots; expert 0 has 3 replicas, expert 1 two, expert 2 one.
        let p = Placement::from_phy2log(ndarray::arr2(&[[0, 1, 0, 2, 0, 1]]), 3).unwrap();
        let global = ndarray::arr2(&[[10u64, 5, 7]]);
        let r0 = slot_loads(global.view(), &p, 0, 3);
        let r1 = slot_loads(global.view(), &p, 1, 3);
        // Expert 0: 10 = 4 + 3 + 3 over slots 0, 2, 4; expert 1: 5 = 3 + 2 over slots 1, 5.
        assert_eq!(r0, ndarray::arr2(&[[4, 3, 3]]));
        assert_eq!(r1, ndarray::arr2(&[[7, 3, 2]]));
        let sum = logical_from_slots(r0.view(), &p, 0, 3) + logical_from_slots(r1.view(), &p, 1, 3);
        assert_eq!(sum, global);
    }

    #[test]
    fn zipf_source_is_the_generator() {
        let z = DriftingZipf::new(2, 8, 3);
        let s = LoadSource::Zipf(z.clone());
        assert_eq!(s.global_step(5), z.step(5));
        assert_eq!((s.num_layers(), s.num_logical()), (2, 8));
        assert!(s.describe().contains("zipf"));
    }
}

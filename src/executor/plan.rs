//! What every rank does to migrate one layer, derived from the old and new `phy2log` rows.
//!
//! The derivation is a pure function of `(old, new, slots_per_rank, ranks_per_node)`, so every
//! rank derives the same [`LayerMigration`] and the sends and receives of each pair of ranks match
//! one to one, in the same order. For each rank and each of its slots whose expert changes:
//! * **local copy**: the expert is already on this rank (in the old placement): copy it from that
//!   live slot into the staging slot;
//! * **staged copy**: the expert already arrives on this rank for another slot: copy it from that
//!   staging slot once it has arrived (one network transfer per rank and expert);
//! * **receive**: otherwise, from a rank that holds the expert in the old placement, chosen by
//!   (same node first, then fewest sends assigned so far, then lowest rank), so that sends spread
//!   evenly and stay on NVLink where they can.
//!
//! Senders read their live slots; nothing is committed before every rank has verified its staged
//! data, so a slot that is both sent and overwritten in the same layer is safe.

/// One expert copy that crosses from one rank to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Position in the layer's global transfer list (the same on every rank).
    pub seq: usize,
    pub expert: usize,
    pub src_rank: usize,
    /// Local slot on `src_rank` (live) that is read.
    pub src_slot: usize,
    pub dst_rank: usize,
    /// Local slot on `dst_rank` whose staging slot is written.
    pub dst_slot: usize,
}

/// A copy inside one rank: from a live slot (local copy) or a staging slot (staged copy) into
/// the staging slot `dst_slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalCopy {
    pub expert: usize,
    pub src_slot: usize,
    pub dst_slot: usize,
}

/// One layer's migration, the same on every rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMigration {
    pub layer: usize,
    pub slots_per_rank: usize,
    /// Cross-rank transfers, ordered by (dst_rank, dst_slot).
    pub transfers: Vec<Transfer>,
    /// `[num_ranks]`: live-to-staging copies of each rank.
    pub local_copies: Vec<Vec<LocalCopy>>,
    /// `[num_ranks]`: staging-to-staging copies of each rank, after its receives.
    pub staged_copies: Vec<Vec<LocalCopy>>,
    /// `[num_ranks]`: the new expert of every local slot (`new` cut per rank).
    pub new_experts: Vec<Vec<usize>>,
}

/// One rank's part of a [`LayerMigration`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankMigration {
    pub layer: usize,
    pub rank: usize,
    /// Transfers this rank receives, in the global order.
    pub recvs: Vec<Transfer>,
    /// Transfers this rank sends, in the global order.
    pub sends: Vec<Transfer>,
    pub local_copies: Vec<LocalCopy>,
    pub staged_copies: Vec<LocalCopy>,
    /// `[slots_per_rank]`: the new expert of every local slot.
    pub new_experts: Vec<usize>,
    /// Local slots whose content changes (to verify and commit), ascending.
    pub changed_slots: Vec<usize>,
    /// The layer's whole new `phy2log` row `[num_physical]` (an engine applies it with the slots).
    pub new_row: Vec<usize>,
}

impl LayerMigration {
    /// Derives the migration of one layer from `old` to `new` (`phy2log` rows `[num_replicas]`).
    pub fn derive(layer: usize, old: &[usize], new: &[usize], slots_per_rank: usize, ranks_per_node: usize) -> Self {
        assert_eq!(old.len(), new.len(), "old and new rows differ in length");
        assert!(slots_per_rank > 0 && old.len().is_multiple_of(slots_per_rank), "slots do not divide over ranks");
        let num_ranks = old.len() / slots_per_rank;
        let ranks_per_node = ranks_per_node.max(1);
        let num_logical = old.iter().chain(new).copied().max().map_or(0, |m| m + 1);
        // holders[e]: (rank, first local slot) of every rank that holds e in the old placement.
        let mut holders: Vec<Vec<(usize, usize)>> = vec![Vec::new(); num_logical];
        for (s, &e) in old.iter().enumerate() {
            let (r, k) = (s / slots_per_rank, s % slots_per_rank);
            if holders[e].last().is_none_or(|&(hr, _)| hr != r) {
                holders[e].push((r, k));
            }
        }
        let mut sends_of = vec![0usize; num_ranks];
        let mut transfers = Vec::new();
        let mut local_copies = vec![Vec::new(); num_ranks];
        let mut staged_copies = vec![Vec::new(); num_ranks];
        let mut new_experts = Vec::with_capacity(num_ranks);
        for r in 0..num_ranks {
            let base = r * slots_per_rank;
            let old_r = &old[base..base + slots_per_rank];
            let new_r = &new[base..base + slots_per_rank];
            new_experts.push(new_r.to_vec());
            // Experts this rank receives in this layer: expert -> staging slot.
            let mut arriving: Vec<(usize, usize)> = Vec::new();
            for (k, &e) in new_r.iter().enumerate() {
                if old_r[k] == e {
                    continue;
                }
                if let Some(src) = old_r.iter().position(|&o| o == e) {
                    local_copies[r].push(LocalCopy { expert: e, src_slot: src, dst_slot: k });
                } else if let Some(&(_, k0)) = arriving.iter().find(|&&(x, _)| x == e) {
                    staged_copies[r].push(LocalCopy { expert: e, src_slot: k0, dst_slot: k });
                } else {
                    let node = r / ranks_per_node;
                    let &(src_rank, src_slot) = holders[e]
                        .iter()
                        .min_by_key(|&&(h, _)| (h / ranks_per_node != node, sends_of[h], h))
                        .expect("every expert of the new placement is held somewhere in the old one");
                    sends_of[src_rank] += 1;
                    transfers.push(Transfer {
                        seq: transfers.len(),
                        expert: e,
                        src_rank,
                        src_slot,
                        dst_rank: r,
                        dst_slot: k,
                    });
                    arriving.push((e, k));
                }
            }
        }
        LayerMigration { layer, slots_per_rank, transfers, local_copies, staged_copies, new_experts }
    }

    /// Whether nothing changes in this layer.
    pub fn is_empty(&self) -> bool {
        self.transfers.is_empty() && self.local_copies.iter().chain(&self.staged_copies).all(Vec::is_empty)
    }

    /// Rank `rank`'s part.
    pub(crate) fn for_rank(&self, rank: usize) -> RankMigration {
        let recvs: Vec<Transfer> = self.transfers.iter().filter(|t| t.dst_rank == rank).copied().collect();
        let sends: Vec<Transfer> = self.transfers.iter().filter(|t| t.src_rank == rank).copied().collect();
        let local_copies = self.local_copies[rank].clone();
        let staged_copies = self.staged_copies[rank].clone();
        let mut changed_slots: Vec<usize> = recvs
            .iter()
            .map(|t| t.dst_slot)
            .chain(local_copies.iter().chain(&staged_copies).map(|c| c.dst_slot))
            .collect();
        changed_slots.sort_unstable();
        RankMigration {
            layer: self.layer,
            rank,
            recvs,
            sends,
            local_copies,
            staged_copies,
            new_experts: self.new_experts[rank].clone(),
            changed_slots,
            new_row: self.new_experts.concat(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies a migration to per-rank slot contents the way an executor does (stage, then
    /// commit) and returns the new contents.
    fn simulate(old: &[usize], m: &LayerMigration) -> Vec<usize> {
        let s = m.slots_per_rank;
        let ranks = old.len() / s;
        let mut staging = vec![vec![None; s]; ranks];
        for t in &m.transfers {
            assert_eq!(old[t.src_rank * s + t.src_slot], t.expert, "sender reads the wrong slot");
            staging[t.dst_rank][t.dst_slot] = Some(t.expert);
        }
        for r in 0..ranks {
            for c in &m.local_copies[r] {
                assert_eq!(old[r * s + c.src_slot], c.expert);
                staging[r][c.dst_slot] = Some(c.expert);
            }
            for c in &m.staged_copies[r] {
                assert_eq!(staging[r][c.src_slot], Some(c.expert), "staged copy before its receive");
                staging[r][c.dst_slot] = Some(c.expert);
            }
        }
        let mut live = old.to_vec();
        for r in 0..ranks {
            for k in m.for_rank(r).changed_slots {
                live[r * s + k] = staging[r][k].expect("a changed slot was staged");
            }
        }
        live
    }

    #[test]
    fn derived_migration_reaches_the_new_placement() {
        // 3 ranks x 3 slots; swaps within a rank, a duplicate arriving twice, a moved expert.
        let old = [0, 1, 2, 3, 4, 5, 6, 7, 0];
        let new = [1, 0, 5, 3, 4, 5, 6, 5, 8 % 8];
        let m = LayerMigration::derive(4, &old, &new, 3, 3);
        assert_eq!(simulate(&old, &m), new.to_vec());
        // Rank 0 swaps 0 and 1 locally and receives 5 once.
        assert_eq!(m.local_copies[0].len(), 2);
        assert_eq!(m.transfers.iter().filter(|t| t.dst_rank == 0).count(), 1);
        // Rank 2 gets 5 from rank 1 (the only holder).
        let t = m.transfers.iter().find(|t| t.dst_rank == 2).unwrap();
        assert_eq!((t.src_rank, t.src_slot, t.expert), (1, 2, 5));
    }

    #[test]
    fn an_expert_needed_twice_on_one_rank_travels_once() {
        let old = [0, 1, 2, 3];
        let new = [0, 1, 3, 3].map(|x| x); // rank 1 slots: 3 stays at slot 1, slot 0 -> 3 (local)
        let m = LayerMigration::derive(0, &old, &new, 2, 2);
        assert!(m.transfers.is_empty());
        let old = [0, 1, 2, 3];
        let new = [3, 3, 2, 1];
        let m = LayerMigration::derive(0, &old, &new, 2, 2);
        assert_eq!(m.transfers.iter().filter(|t| t.dst_rank == 0 && t.expert == 3).count(), 1);
        assert_eq!(m.staged_copies[0].len(), 1);
        assert_eq!(simulate(&old, &m), new.to_vec());
    }

    #[test]
    fn sources_prefer_the_same_node_then_spread() {
        // Expert 0 on ranks 0 and 2 (2 nodes of 2 ranks); ranks 1 and 3 need it.
        let old = [0, 1, 2, 3, 0, 4, 5, 6];
        let new = [0, 1, 0, 3, 0, 4, 0, 6];
        let m = LayerMigration::derive(0, &old, &new, 2, 2);
        let src = |dst: usize| m.transfers.iter().find(|t| t.dst_rank == dst).unwrap().src_rank;
        assert_eq!((src(1), src(3)), (0, 2));
        // With one node, the second receiver takes the other holder (fewest sends).
        let m = LayerMigration::derive(0, &old, &new, 2, 4);
        let srcs: Vec<usize> = m.transfers.iter().map(|t| t.src_rank).collect();
        assert_eq!(srcs, vec![0, 2]);
    }

    #[test]
    fn random_migrations_always_reach_the_target() {
        let mut x = 1u64;
        for _ in 0..300 {
            let mut rnd = |n: usize| {
                x = crate::engine::splitmix64(x);
                (x % n as u64) as usize
            };
            let (s, ranks, experts) = (1 + rnd(5), 1 + rnd(6), 1 + rnd(10));
            let n = s * ranks;
            let old: Vec<usize> = (0..n).map(|i| if i < experts { i } else { rnd(experts) }).collect();
            let new: Vec<usize> =
                (0..n).map(|i| if i < experts { (i * 7 + 3) % experts } else { rnd(experts) }).collect();
            // Every expert of `new` must exist in `old` (true here: old holds 0..experts when n >= experts).
            if n < experts {
                continue;
            }
            let m = LayerMigration::derive(0, &old, &new, s, 1 + rnd(3));
            assert_eq!(simulate(&old, &m), new, "old {old:?} new {new:?}");
            // One network transfer per rank and expert it lacks, and no more: a rank receives
            // exactly the distinct experts of its new slots that none of its old slots holds.
            for r in 0..ranks {
                let (old_r, new_r) = (&old[r * s..(r + 1) * s], &new[r * s..(r + 1) * s]);
                let mut lacking: Vec<usize> =
                    new_r.iter().zip(old_r).filter(|(n, o)| n != o && !old_r.contains(n)).map(|(&n, _)| n).collect();
                lacking.sort_unstable();
                lacking.dedup();
                let mut received: Vec<usize> = m.for_rank(r).recvs.iter().map(|t| t.expert).collect();
                received.sort_unstable();
                assert_eq!(received, lacking, "rank {r}: old {old_r:?} new {new_r:?}");
                // The changed slots are exactly those whose expert changes.
                let changed: Vec<usize> = (0..s).filter(|&k| old_r[k] != new_r[k]).collect();
                assert_eq!(m.for_rank(r).changed_slots, changed, "rank {r}");
            }
            assert!(m.transfers.iter().all(|t| t.src_rank != t.dst_rank), "a transfer stays on its rank");
        }
    }
}

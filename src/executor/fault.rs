//! Fault injection (tests, `--fault`) as decorators around a store, never inside one: the
//! production [`ExpertStore`] trait and the stores' staging have no fault branch. The executor
//! factory ([`super::factory`]) wraps a store in [`Faulty`] only when [`StoreFaults`] asks for a
//! fault; a store that can be corrupted implements [`FlipStaged`], a trait of its own that the
//! production path never calls.

use super::{Commit, ExecError, ExpertStore, RankMigration, StageTiming};

/// The faults of one rank's store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreFaults {
    /// The next stage that changes a slot flips bytes of its first changed slot, after the
    /// transfer: verification must fail, and nothing may be committed anywhere.
    pub corrupt_next_stage: bool,
    /// The first stage never returns (a stuck or descheduled process): the peers' waits must
    /// time out (`--timeout`) and end the job.
    pub hang_in_stage: bool,
}

impl StoreFaults {
    /// Whether any fault is asked for (else the factory returns the store itself).
    pub fn any(&self) -> bool {
        self.corrupt_next_stage || self.hang_in_stage
    }
}

/// A store whose staged bytes a fault decorator may damage.
pub(crate) trait FlipStaged: ExpertStore {
    /// Flips bytes of staged slot `slot` of the layer just staged (the first row's first bytes),
    /// once the staging has completed.
    fn flip_staged(&mut self, slot: usize) -> Result<(), ExecError>;
}

/// `S` with the faults of [`StoreFaults`]; everything else is `S`'s own.
pub(crate) struct Faulty<S> {
    inner: S,
    faults: StoreFaults,
}

impl<S: FlipStaged> Faulty<S> {
    pub fn new(inner: S, faults: StoreFaults) -> Faulty<S> {
        Faulty { inner, faults }
    }

    /// The store itself, without the faults.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// `store` as a boxed [`ExpertStore`], wrapped in [`Faulty`] when `faults` asks for any.
pub(crate) fn decorate<S: FlipStaged + 'static>(store: S, faults: StoreFaults) -> Box<dyn ExpertStore> {
    if faults.any() {
        Box::new(Faulty::new(store, faults))
    } else {
        Box::new(store)
    }
}

impl<S: FlipStaged> ExpertStore for Faulty<S> {
    fn device(&self) -> String {
        self.inner.device()
    }

    fn transport(&self) -> &'static str {
        self.inner.transport()
    }

    fn expert_bytes(&self) -> usize {
        self.inner.expert_bytes()
    }

    fn slots_per_rank(&self) -> usize {
        self.inner.slots_per_rank()
    }

    fn stage(&mut self, m: &RankMigration) -> Result<StageTiming, ExecError> {
        if self.faults.hang_in_stage {
            let rank = crate::failure::rank().unwrap_or(0);
            log::warn!("rank {rank}: fault injection: --fault hang-transfer-on-rank={rank}: hanging");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        let timing = self.inner.stage(m)?;
        if self.faults.corrupt_next_stage {
            if let Some(&slot) = m.changed_slots.first() {
                self.faults.corrupt_next_stage = false;
                self.inner.flip_staged(slot)?;
            }
        }
        Ok(timing)
    }

    fn verify_staged(&mut self, m: &RankMigration) -> Result<u64, ExecError> {
        self.inner.verify_staged(m)
    }

    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError> {
        self.inner.commit(m)
    }

    fn verify_live(&mut self, layer: usize, experts: &[usize]) -> Result<u64, ExecError> {
        self.inner.verify_live(layer, experts)
    }

    fn globals_hash(&mut self) -> Result<Option<u64>, ExecError> {
        self.inner.globals_hash()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::LayerMigration;

    /// One layer of two 1-byte slots: a stage writes byte `k` into staged slot `k`, and a staged
    /// slot is wrong when it holds another byte.
    #[derive(Default)]
    struct Bytes {
        staged: Vec<u8>,
        flips: usize,
    }

    impl ExpertStore for Bytes {
        fn expert_bytes(&self) -> usize {
            1
        }
        fn slots_per_rank(&self) -> usize {
            2
        }
        fn stage(&mut self, _: &RankMigration) -> Result<StageTiming, ExecError> {
            self.staged = vec![0, 1];
            Ok(StageTiming::default())
        }
        fn verify_staged(&mut self, m: &RankMigration) -> Result<u64, ExecError> {
            Ok(m.changed_slots.iter().filter(|&&k| self.staged[k] != k as u8).count() as u64)
        }
        fn commit(&mut self, _: &RankMigration) -> Result<Commit, ExecError> {
            Ok(Commit::Next)
        }
        fn verify_live(&mut self, _: usize, _: &[usize]) -> Result<u64, ExecError> {
            Ok(0)
        }
    }

    impl FlipStaged for Bytes {
        fn flip_staged(&mut self, slot: usize) -> Result<(), ExecError> {
            self.staged[slot] ^= 0x5a;
            self.flips += 1;
            Ok(())
        }
    }

    fn staged_wrong(store: &mut dyn ExpertStore, m: &RankMigration) -> u64 {
        store.stage(m).unwrap();
        store.verify_staged(m).unwrap()
    }

    #[test]
    fn a_corrupted_stage_fails_verification_once_and_only_where_a_slot_changes() {
        let moving = LayerMigration::derive(0, &[0, 1], &[1, 0], 2, 1).for_rank(0);
        let still = LayerMigration::derive(0, &[0, 1], &[0, 1], 2, 1).for_rank(0);
        assert!(still.changed_slots.is_empty() && moving.changed_slots == vec![0, 1]);
        let mut s = Faulty::new(Bytes::default(), StoreFaults { corrupt_next_stage: true, ..Default::default() });
        // Armed until a stage changes a slot: a stage that moves nothing stays clean.
        assert_eq!((staged_wrong(&mut s, &still), s.inner.flips), (0, 0));
        assert_eq!((staged_wrong(&mut s, &moving), s.inner.flips), (1, 1));
        // Once: the next stage is the store's own again.
        assert_eq!((staged_wrong(&mut s, &moving), s.inner.flips), (0, 1));
        // Without faults the factory does not decorate, and a decorator without faults does nothing.
        assert!(!StoreFaults::default().any());
        let mut plain = Faulty::new(Bytes::default(), StoreFaults::default());
        assert_eq!((staged_wrong(&mut plain, &moving), plain.into_inner().flips), (0, 0));
        assert_eq!(staged_wrong(decorate(Bytes::default(), StoreFaults::default()).as_mut(), &moving), 0);
    }
}

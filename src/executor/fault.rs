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

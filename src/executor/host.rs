//! The host [`ExpertStore`]: three separate pieces, composed.
//! * storage: a [`SlotMemory`] (this process's heap, [`HeapSlots`], or an engine's shared memory);
//! * transport: the [`HostTransport`] (non-blocking MPI point-to-point, chunked);
//! * verification: a [`Verification`] of the staged bytes.

use std::time::Instant;

use super::memory::{HeapSlots, SlotMemory};
use super::verify::Verification;
use super::{Commit, ExecError, ExpertStore, RankMigration, StageTiming};
use crate::collective::host::{HostTransport, Message};
use crate::engine::fill_expert;

/// Expert weights in host memory `M`, moved with the host transport, checked with a
/// [`Verification`].
pub struct HostStore<M: SlotMemory> {
    memory: M,
    transport: HostTransport,
    verification: Verification,
    /// Fault injection (tests): flip a byte of the next staged slot.
    corrupt_next_stage: bool,
}

/// The synthetic engine's store: heap memory filled with every expert's pattern.
pub type HostExpertStore = HostStore<HeapSlots>;

impl HostStore<HeapSlots> {
    /// A store whose live slots hold `experts[layer][slot]` (this rank's part of `phy2log`), filled
    /// with each expert's weights ([`fill_expert`]), verified by their pattern. `expert_bytes` must
    /// be a positive multiple of 8.
    pub fn new(transport: HostTransport, expert_bytes: usize, experts: &[Vec<usize>]) -> Result<Self, ExecError> {
        let slots_per_rank = experts.first().map_or(0, Vec::len);
        if experts.iter().any(|e| e.len() != slots_per_rank) {
            return Err(ExecError::Other("the host store needs the same number of slots in every layer".into()));
        }
        let mut memory = HeapSlots::new(experts.len(), slots_per_rank, expert_bytes);
        for (layer, row) in experts.iter().enumerate() {
            let live = memory.live_mut(layer)?;
            for (slot, &e) in row.iter().enumerate() {
                fill_expert(&mut live[slot * expert_bytes..(slot + 1) * expert_bytes], layer, e);
            }
        }
        HostStore::with_memory(memory, transport, Verification::Pattern)
    }

    /// Fault injection: flips one byte of a live slot.
    pub fn corrupt_live(&mut self, layer: usize, slot: usize) {
        let eb = self.memory.expert_bytes();
        if let Some(b) = self.memory.live_mut(layer).ok().and_then(|l| l.get_mut(slot * eb)) {
            *b ^= 0xff;
        }
    }
}

impl<M: SlotMemory> HostStore<M> {
    /// A store over `memory`. Its expert size must be a positive multiple of 8 and its slots fit
    /// the transport's tags.
    pub fn with_memory(memory: M, transport: HostTransport, verification: Verification) -> Result<Self, ExecError> {
        let eb = memory.expert_bytes();
        if eb == 0 || !eb.is_multiple_of(8) {
            return Err(ExecError::Other(format!(
                "expert size {eb} B (--expert-bytes) is not a positive multiple of 8"
            )));
        }
        if memory.slots_per_rank() > HostTransport::MAX_TAG as usize + 1 {
            return Err(ExecError::Other(format!(
                "the host store holds at most {} slots a rank",
                HostTransport::MAX_TAG + 1
            )));
        }
        Ok(HostStore { memory, transport, verification, corrupt_next_stage: false })
    }

    pub fn memory(&self) -> &M {
        &self.memory
    }
}

impl<M: SlotMemory> ExpertStore for HostStore<M> {
    fn expert_bytes(&self) -> usize {
        self.memory.expert_bytes()
    }

    fn slots_per_rank(&self) -> usize {
        self.memory.slots_per_rank()
    }

    fn stage(&mut self, m: &RankMigration) -> Result<StageTiming, ExecError> {
        let start = Instant::now();
        let eb = self.memory.expert_bytes();
        // Tags are the destination slot: unique per (source, destination) pair within a layer.
        let sends: Vec<Message> = m
            .sends
            .iter()
            .map(|t| Message { peer: t.dst_rank, tag: t.dst_slot as i32, offset: t.src_slot * eb, len: eb })
            .collect();
        let recvs: Vec<Message> = m
            .recvs
            .iter()
            .map(|t| Message { peer: t.src_rank, tag: t.dst_slot as i32, offset: t.dst_slot * eb, len: eb })
            .collect();
        let range = |slot: usize| slot * eb..(slot + 1) * eb;
        let (live, staging) = self.memory.live_and_staging(m.layer)?;
        self.transport.exchange(live, &sends, staging, &recvs)?;
        for c in &m.local_copies {
            staging[range(c.dst_slot)].copy_from_slice(&live[range(c.src_slot)]);
        }
        for c in &m.staged_copies {
            staging.copy_within(range(c.src_slot), c.dst_slot * eb);
        }
        if self.corrupt_next_stage {
            if let Some(&slot) = m.changed_slots.first() {
                staging[slot * eb] ^= 0x5a;
                self.corrupt_next_stage = false;
            }
        }
        Ok(StageTiming { transfer_seconds: start.elapsed().as_secs_f64(), verify_seconds: 0.0 })
    }

    fn verify_staged(&mut self, m: &RankMigration) -> Result<u64, ExecError> {
        let staging = self.memory.staging();
        Ok(m.changed_slots
            .iter()
            .map(|&k| self.verification.wrong_bytes(&staging[self.memory.range(k)], m.layer, m.new_experts[k]))
            .sum())
    }

    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError> {
        self.memory.commit(m.layer, &m.changed_slots)
    }

    /// The next stage that changes a slot flips one of its bytes.
    fn corrupt_next_stage(&mut self) {
        self.corrupt_next_stage = true;
    }

    fn verify_live(&mut self, layer: usize, experts: &[usize]) -> Result<u64, ExecError> {
        let live = self.memory.live(layer)?;
        Ok(experts
            .iter()
            .enumerate()
            .take(self.memory.slots_per_rank())
            .map(|(k, &e)| self.verification.wrong_bytes(&live[self.memory.range(k)], layer, e))
            .sum())
    }
}

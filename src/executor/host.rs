//! The host [`ExpertStore`]: three separate pieces, composed.
//! * storage: a [`SlotMemory`] (this process's heap, [`HeapSlots`], or an engine's shared memory);
//! * transport: the [`HostTransport`] (non-blocking MPI point-to-point, chunked);
//! * verification: a [`Verification`] of the staged bytes: every sender computes a checksum
//!   over the bytes it sends and sends it after them; the receiver checks what landed.

use std::time::Instant;

use super::memory::{HeapSlots, SlotMemory};
use super::verify::{checksum, Verification};
use super::{Commit, ExecError, ExpertStore, RankMigration, StageTiming};
use crate::collective::host::{HostTransport, Message};
use crate::engine::{fill_expert, wrong_bytes};

/// Expert weights in host memory `M`, moved with the host transport, checked with a
/// [`Verification`].
pub struct HostStore<M: SlotMemory> {
    memory: M,
    transport: HostTransport,
    verification: Verification,
    /// `[slots_per_rank]`: the checksum its sender computed for each staged slot.
    sent: Vec<u64>,
    /// `live_sums[layer][slot]`: checksums of the live slots, taken at the first
    /// [`ExpertStore::verify_live`] and kept up to date by every commit (checksum-only stores).
    live_sums: Vec<Option<Vec<u64>>>,
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
        HostStore::with_memory(memory, transport, Verification::ChecksumAndPattern)
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
        let (layers, spr) = (memory.num_layers(), memory.slots_per_rank());
        Ok(HostStore {
            memory,
            transport,
            verification,
            sent: vec![0; spr],
            live_sums: vec![None; layers],
            corrupt_next_stage: false,
        })
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
        // The checksums of the bytes sent, 8 bytes per transfer, after the bytes themselves: the
        // same (peer, tag) pairs, and MPI delivers the messages of one pair in the order sent.
        let sums: Vec<u8> = m.sends.iter().flat_map(|t| checksum(&live[range(t.src_slot)]).to_le_bytes()).collect();
        let sum_msg = |i: usize, m: &Message| Message { offset: 8 * i, len: 8, ..*m };
        let sum_sends: Vec<Message> = sends.iter().enumerate().map(|(i, m)| sum_msg(i, m)).collect();
        let sum_recvs: Vec<Message> = recvs.iter().enumerate().map(|(i, m)| sum_msg(i, m)).collect();
        let mut got = vec![0u8; 8 * recvs.len()];
        self.transport.exchange(&sums, &sum_sends, &mut got, &sum_recvs)?;
        for (t, sum) in m.recvs.iter().zip(crate::collective::le_words(&got)) {
            self.sent[t.dst_slot] = sum;
        }
        for c in &m.local_copies {
            let src = &live[range(c.src_slot)];
            self.sent[c.dst_slot] = checksum(src);
            staging[range(c.dst_slot)].copy_from_slice(src);
        }
        for c in &m.staged_copies {
            self.sent[c.dst_slot] = self.sent[c.src_slot];
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
        let v = self.verification;
        Ok(m.changed_slots
            .iter()
            .map(|&k| v.staged_wrong(&staging[self.memory.range(k)], m.layer, m.new_experts[k], self.sent[k]))
            .sum())
    }

    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError> {
        let commit = self.memory.commit(m)?;
        if let (Commit::Next | Commit::AtStep(_), Some(Some(sums))) = (&commit, self.live_sums.get_mut(m.layer)) {
            for &k in &m.changed_slots {
                sums[k] = self.sent[k];
            }
        }
        Ok(commit)
    }

    /// The next stage that changes a slot flips one of its bytes.
    fn corrupt_next_stage(&mut self) {
        self.corrupt_next_stage = true;
    }

    /// The pattern where the weights have one; otherwise the live slots must still have the
    /// checksums they had at the first call, or that their last commit gave them.
    fn verify_live(&mut self, layer: usize, experts: &[usize]) -> Result<u64, ExecError> {
        let live = self.memory.live(layer)?;
        let spr = self.memory.slots_per_rank();
        let slot = |k: usize| &live[self.memory.range(k)];
        match self.verification {
            Verification::ChecksumAndPattern => {
                Ok(experts.iter().enumerate().take(spr).map(|(k, &e)| wrong_bytes(slot(k), layer, e)).sum())
            }
            Verification::Checksum => {
                let now: Vec<u64> = (0..spr).map(|k| checksum(slot(k))).collect();
                let eb = self.memory.expert_bytes() as u64;
                let known = self.live_sums[layer].get_or_insert_with(|| now.clone());
                Ok(known.iter().zip(&now).filter(|(a, b)| a != b).count() as u64 * eb)
            }
        }
    }
}

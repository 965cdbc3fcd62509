//! The host [`ExpertStore`]: three separate pieces, composed.
//! * storage: a [`SlotMemory`] (this process's heap, [`HeapSlots`], or an engine's shared memory),
//!   whose experts are rows of per-expert tensors;
//! * transport: the [`HostTransport`] (non-blocking MPI point-to-point, chunked): one message per
//!   moved expert, its rows gathered in table order by the sender and scattered into the staging
//!   rows by the receiver;
//! * verification: a [`Verification`] of the staged bytes through the shared [`Verifier`]: every
//!   sender computes a checksum over the bytes it sends and sends it after them; the receiver
//!   checks what landed.

use std::time::Instant;

use super::fault::FlipStaged;
use super::memory::{HeapSlots, SlotMemory};
use super::plan::Transfer;
use super::verify::{checksum, Verification, Verifier};
use super::{Commit, ExecError, ExpertStore, RankMigration, StageTiming};
use crate::collective::host::{HostTransport, Message};
use crate::engine::{fill_expert, wrong_bytes};

/// This rank's messages of `m`'s transfers, `len` bytes each: (the sends, to each transfer's
/// `dst_rank`; the receives, from each one's `src_rank`), the `i`-th of each at `i * len` in its
/// buffer (transfers in the global order), tagged with the destination slot: unique per (source,
/// destination) pair within a layer.
fn messages(m: &RankMigration, len: usize) -> (Vec<Message>, Vec<Message>) {
    let each = |transfers: &[Transfer], peer: fn(&Transfer) -> usize| -> Vec<Message> {
        transfers
            .iter()
            .enumerate()
            .map(|(i, t)| Message { peer: peer(t), tag: t.dst_slot as i32, offset: i * len, len })
            .collect()
    };
    (each(&m.sends, |t| t.dst_rank), each(&m.recvs, |t| t.src_rank))
}

/// Expert weights in host memory `M`, moved with the host transport, checked with a
/// [`Verification`].
pub struct HostStore<M: SlotMemory> {
    memory: M,
    transport: HostTransport,
    verification: Verification,
    verifier: Verifier,
}

/// The synthetic engine's store: heap memory filled with every expert's pattern.
pub type HostExpertStore = HostStore<HeapSlots>;

impl HostStore<HeapSlots> {
    /// A store whose live slots hold `experts[layer][slot]` (this rank's part of `phy2log`), filled
    /// with each expert's weights ([`fill_expert`]), verified by their pattern. `expert_bytes` must
    /// be a positive multiple of 8 (the GPU store's pattern kernels work in 8-byte words, and the
    /// synthetic engine's flag is the same on both).
    pub fn new(transport: HostTransport, expert_bytes: usize, experts: &[Vec<usize>]) -> Result<Self, ExecError> {
        let slots_per_rank = experts.first().map_or(0, Vec::len);
        if experts.iter().any(|e| e.len() != slots_per_rank) {
            return Err(ExecError::Other("the host store needs the same number of slots in every layer".into()));
        }
        if !expert_bytes.is_multiple_of(8) {
            return Err(ExecError::Other(format!(
                "expert size {expert_bytes} B (--expert-bytes) is not a positive multiple of 8"
            )));
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
}

impl<M: SlotMemory> HostStore<M> {
    /// A store over `memory`. Its expert size must be positive and its slots fit the transport's
    /// tags.
    pub(crate) fn with_memory(
        memory: M,
        transport: HostTransport,
        verification: Verification,
    ) -> Result<Self, ExecError> {
        let eb = memory.expert_bytes();
        if eb == 0 {
            return Err(ExecError::Other("the expert size is 0 bytes".into()));
        }
        if memory.slots_per_rank() > HostTransport::MAX_TAG as usize + 1 {
            return Err(ExecError::Other(format!(
                "the host store holds at most {} slots a rank",
                HostTransport::MAX_TAG + 1
            )));
        }
        let verifier = Verifier::new(memory.num_layers(), memory.slots_per_rank(), eb);
        Ok(HostStore { memory, transport, verification, verifier })
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
        // One message per moved expert: the sender gathers its rows (in table order) into one
        // buffer, the receiver scatters them into the staging rows.
        let (sends, recvs) = messages(m, eb);
        let mut out = vec![0u8; m.sends.len() * eb];
        for (i, t) in m.sends.iter().enumerate() {
            self.memory.gather_live(m.layer, t.src_slot, &mut out[i * eb..(i + 1) * eb])?;
        }
        let mut inbox = vec![0u8; m.recvs.len() * eb];
        self.transport.exchange(&out, &sends, &mut inbox, &recvs)?;
        // The checksums of the bytes sent, 8 bytes per transfer, after the bytes themselves: the
        // same (peer, tag) pairs, and MPI delivers the messages of one pair in the order sent.
        let sums: Vec<u8> = out.chunks_exact(eb.max(1)).flat_map(|e| checksum(e).to_le_bytes()).collect();
        let (sum_sends, sum_recvs) = messages(m, 8);
        let mut got = vec![0u8; 8 * recvs.len()];
        self.transport.exchange(&sums, &sum_sends, &mut got, &sum_recvs)?;
        for ((i, t), sum) in m.recvs.iter().enumerate().zip(crate::collective::le_words(&got)) {
            self.verifier.expect(t.dst_slot, vec![sum]);
            self.memory.scatter_staging(t.dst_slot, &inbox[i * eb..(i + 1) * eb]);
        }
        let mut expert = vec![0u8; eb];
        for c in &m.local_copies {
            self.memory.gather_live(m.layer, c.src_slot, &mut expert)?;
            self.verifier.expect(c.dst_slot, vec![checksum(&expert)]);
            self.memory.scatter_staging(c.dst_slot, &expert);
        }
        for c in &m.staged_copies {
            self.verifier.expect_copy(c.src_slot, c.dst_slot);
            self.memory.gather_staging(c.src_slot, &mut expert);
            self.memory.scatter_staging(c.dst_slot, &expert);
        }
        Ok(StageTiming { transfer_seconds: start.elapsed().as_secs_f64(), verify_seconds: 0.0 })
    }

    fn verify_staged(&mut self, m: &RankMigration) -> Result<u64, ExecError> {
        let mut expert = vec![0u8; self.memory.expert_bytes()];
        let mut wrong = 0;
        for &k in &m.changed_slots {
            self.memory.gather_staging(k, &mut expert);
            let sent = self.verifier.expected(k).first().copied().unwrap_or(0);
            wrong += self.verification.staged_wrong(&expert, m.layer, m.new_experts[k], sent);
        }
        Ok(wrong)
    }

    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError> {
        let commit = self.memory.commit(m)?;
        if matches!(commit, Commit::Next | Commit::AtStep(_)) {
            self.verifier.committed(m.layer, &m.changed_slots);
        }
        Ok(commit)
    }

    fn globals_hash(&mut self) -> Result<Option<u64>, ExecError> {
        Ok(self.memory.globals_hash())
    }

    /// The pattern where the weights have one; otherwise the live slots must still have the
    /// checksums they had at the first call, or that their last commit gave them.
    fn verify_live(&mut self, layer: usize, experts: &[usize]) -> Result<u64, ExecError> {
        let spr = self.memory.slots_per_rank();
        let mut expert = vec![0u8; self.memory.expert_bytes()];
        match self.verification {
            Verification::ChecksumAndPattern => {
                let mut wrong = 0;
                for (k, &e) in experts.iter().enumerate().take(spr) {
                    self.memory.gather_live(layer, k, &mut expert)?;
                    wrong += wrong_bytes(&expert, layer, e);
                }
                Ok(wrong)
            }
            Verification::Checksum => {
                let mut now = Vec::with_capacity(spr);
                for k in 0..spr {
                    self.memory.gather_live(layer, k, &mut expert)?;
                    now.push(vec![checksum(&expert)]);
                }
                Ok(self.verifier.live_wrong(layer, now))
            }
        }
    }
}

/// Fault injection ([`super::fault`]): one byte of the staged slot's first row.
impl<M: SlotMemory> FlipStaged for HostStore<M> {
    fn flip_staged(&mut self, slot: usize) -> Result<(), ExecError> {
        self.memory.staging_row_mut(0, slot)[0] ^= 0x5a;
        Ok(())
    }
}

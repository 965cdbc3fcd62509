//! The host [`ExpertStore`]: expert weights in host memory, moved with the host transport
//! (non-blocking MPI point-to-point, chunked).

use std::time::Instant;

use super::{ExecError, ExpertStore, RankMigration, StageTiming};
use crate::collective::host::{HostTransport, Message};
use crate::engine::{fill_expert, wrong_bytes};

/// `num_layers` layers of `slots_per_rank` live slots of `expert_bytes` bytes in host memory, and
/// one staging buffer of `slots_per_rank` slots.
pub struct HostExpertStore {
    transport: HostTransport,
    expert_bytes: usize,
    slots_per_rank: usize,
    /// `live[layer]`: `slots_per_rank * expert_bytes` bytes.
    live: Vec<Vec<u8>>,
    staging: Vec<u8>,
    /// Fault injection (tests): flip a byte of the next staged slot.
    corrupt_next_stage: bool,
}

impl HostExpertStore {
    /// A store whose live slots hold `experts[layer][slot]` (this rank's part of `phy2log`), filled
    /// with each expert's weights ([`fill_expert`]). `expert_bytes` must be a positive multiple of 8.
    pub fn new(transport: HostTransport, expert_bytes: usize, experts: &[Vec<usize>]) -> Result<Self, ExecError> {
        let slots_per_rank = experts.first().map_or(0, Vec::len);
        if expert_bytes == 0 || !expert_bytes.is_multiple_of(8) {
            return Err(ExecError::Other(format!(
                "expert size {expert_bytes} B (--expert-bytes) is not a positive multiple of 8"
            )));
        }
        if slots_per_rank > HostTransport::MAX_TAG as usize + 1 || experts.iter().any(|e| e.len() != slots_per_rank) {
            return Err(ExecError::Other(format!(
                "the host store needs the same number of slots in every layer, at most {}",
                HostTransport::MAX_TAG + 1
            )));
        }
        let live = experts
            .iter()
            .enumerate()
            .map(|(layer, row)| {
                let mut buf = vec![0u8; slots_per_rank * expert_bytes];
                for (slot, &e) in row.iter().enumerate() {
                    fill_expert(&mut buf[slot * expert_bytes..(slot + 1) * expert_bytes], layer, e);
                }
                buf
            })
            .collect();
        Ok(HostExpertStore {
            transport,
            expert_bytes,
            slots_per_rank,
            live,
            staging: vec![0u8; slots_per_rank * expert_bytes],
            corrupt_next_stage: false,
        })
    }

    /// Fault injection: flips one byte of a live slot.
    pub fn corrupt_live(&mut self, layer: usize, slot: usize) {
        if let Some(b) = self.live.get_mut(layer).and_then(|l| l.get_mut(slot * self.expert_bytes)) {
            *b ^= 0xff;
        }
    }

    fn range(&self, slot: usize) -> std::ops::Range<usize> {
        slot * self.expert_bytes..(slot + 1) * self.expert_bytes
    }

    fn live_layer(&self, layer: usize) -> Result<&[u8], ExecError> {
        self.live.get(layer).map(Vec::as_slice).ok_or_else(|| {
            ExecError::Other(format!("layer {layer} is out of range: the store holds {} layers", self.live.len()))
        })
    }
}

impl ExpertStore for HostExpertStore {
    fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    fn slots_per_rank(&self) -> usize {
        self.slots_per_rank
    }

    fn stage(&mut self, m: &RankMigration) -> Result<StageTiming, ExecError> {
        let start = Instant::now();
        let eb = self.expert_bytes;
        self.live_layer(m.layer)?;
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
        self.transport.exchange(&self.live[m.layer], &sends, &mut self.staging, &recvs)?;
        for c in &m.local_copies {
            let (src, dst) = (self.range(c.src_slot), self.range(c.dst_slot));
            self.staging[dst].copy_from_slice(&self.live[m.layer][src]);
        }
        for c in &m.staged_copies {
            let (src, dst) = (self.range(c.src_slot), self.range(c.dst_slot));
            self.staging.copy_within(src, dst.start);
        }
        if self.corrupt_next_stage {
            if let Some(&slot) = m.changed_slots.first() {
                self.staging[slot * eb] ^= 0x5a;
                self.corrupt_next_stage = false;
            }
        }
        Ok(StageTiming { transfer_seconds: start.elapsed().as_secs_f64(), verify_seconds: 0.0 })
    }

    fn verify_staged(&mut self, m: &RankMigration) -> Result<u64, ExecError> {
        Ok(m.changed_slots.iter().map(|&k| wrong_bytes(&self.staging[self.range(k)], m.layer, m.new_experts[k])).sum())
    }

    fn commit(&mut self, m: &RankMigration) -> Result<(), ExecError> {
        self.live_layer(m.layer)?;
        for &k in &m.changed_slots {
            let r = self.range(k);
            self.live[m.layer][r.clone()].copy_from_slice(&self.staging[r]);
        }
        Ok(())
    }

    /// The next stage that changes a slot flips one of its bytes.
    fn corrupt_next_stage(&mut self) {
        self.corrupt_next_stage = true;
    }

    fn verify_live(&mut self, layer: usize, experts: &[usize]) -> Result<u64, ExecError> {
        let live = self.live_layer(layer)?;
        Ok(experts
            .iter()
            .enumerate()
            .take(self.slots_per_rank)
            .map(|(k, &e)| wrong_bytes(&live[k * self.expert_bytes..(k + 1) * self.expert_bytes], layer, e))
            .sum())
    }
}

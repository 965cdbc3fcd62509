//! [`DeviceExpertStore`]: a rank's expert weights in GPU memory, moved with NCCL.
//!
//! Memory: one buffer per layer of `slots_per_rank x expert_bytes` (the live weights), one
//! staging buffer of one layer's local slots, and an 8-byte counter. Transfers go in rounds: the
//! layer's global transfer list is cut into groups of `transfers_per_round` transfers (the same
//! cut on every rank), and each rank posts its sends and receives of a round as one NCCL group,
//! so no single group is huge and no rank waits on a peer's later group. Each transfer may also
//! be split into pieces of at most `chunk_bytes`, posted in order inside its group.
//!
//! Verification: this store checks staged slots against the synthetic engine's pattern with the
//! `count_wrong` kernel. Real weights (a GPU engine, next issue) need the sender's checksum, as
//! the host store does ([`crate::executor::verify`]). The design, not yet built nor run on a GPU:
//! a `checksum` kernel computes, for every expert a rank sends and for the source of every local
//! copy, an order-independent 64-bit sum `sum_i splitmix64(word_i ^ i)` (word-parallel, reduced
//! with one atomic add per block, so the result does not depend on the launch shape); the
//! sender's sums go to their receivers as one NCCL message of 8 bytes per transfer after the
//! layer's groups, the receiver runs the same kernel over its staging slots and compares, and the
//! all-ranks agreement and the commit stay as they are. XXH3 (the host checksum) is sequential
//! within a stripe and would not run well on a GPU; the two paths never check each other's sums.

use std::time::Instant;

use super::device::{DeviceBuffer, Gpu};
use super::nccl::{NcclComm, P2p, MAX_OPS_PER_GROUP};
use super::GpuError;
use crate::executor::{Commit, ExecError, ExpertStore, RankMigration, StageTiming};

/// How transfers are grouped and split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NcclTuning {
    /// Bytes one rank moves per NCCL group, on average: a round holds
    /// `max(1, group_bytes / expert_bytes) * num_ranks` transfers of the global list.
    pub group_bytes: usize,
    /// Largest piece of one transfer inside a group (0: whole transfers).
    pub chunk_bytes: usize,
    /// Register the live and staging buffers with NCCL (zero-copy point-to-point on NVLink).
    pub register: bool,
}

impl NcclTuning {
    /// From the command-line units: group and piece sizes in MiB (a piece of 0: whole experts).
    pub fn from_mib(group_mib: f64, chunk_mib: f64, register: bool) -> Self {
        let bytes = |mib: f64| (mib * (1u64 << 20) as f64) as usize;
        NcclTuning { group_bytes: bytes(group_mib), chunk_bytes: bytes(chunk_mib), register }
    }
}

impl Default for NcclTuning {
    fn default() -> Self {
        NcclTuning { group_bytes: 1 << 30, chunk_bytes: 0, register: true }
    }
}

/// A rank's expert weights on its GPU.
pub struct DeviceExpertStore {
    // Field order matters for drop: the communicator (which deregisters the buffers) goes first,
    // then the buffers, then the GPU context.
    nccl: NcclComm,
    live: Vec<DeviceBuffer>,
    staging: DeviceBuffer,
    counter: DeviceBuffer,
    pub gpu: Gpu,
    slots_per_rank: usize,
    expert_bytes: usize,
    tuning: NcclTuning,
    /// Test hook: flip one staged byte after the next stage.
    corrupt_next_stage: bool,
}

impl DeviceExpertStore {
    /// Device bytes the store needs: the layers, the staging buffer and the counter (`usize::MAX`
    /// when that overflows).
    pub fn bytes_needed(num_layers: usize, slots_per_rank: usize, expert_bytes: usize) -> usize {
        num_layers
            .checked_add(1)
            .and_then(|l| l.checked_mul(slots_per_rank))
            .and_then(|b| b.checked_mul(expert_bytes))
            .and_then(|b| b.checked_add(8))
            .unwrap_or(usize::MAX)
    }

    /// Checks, before anything is allocated or any peer is waited for, that the store fits in
    /// the free memory of `gpu` ([`GpuError::TooBig`], exit 2, otherwise).
    pub fn check_fits(
        gpu: &Gpu,
        num_layers: usize,
        slots_per_rank: usize,
        expert_bytes: usize,
    ) -> Result<(), GpuError> {
        let need = Self::bytes_needed(num_layers, slots_per_rank, expert_bytes);
        let (free, total) = gpu.mem_info()?;
        if need > free {
            return Err(GpuError::TooBig(format!(
                "the expert weights need {:.2} GiB of GPU memory ({num_layers} layers + staging, {slots_per_rank} slots \
                 of {expert_bytes} B), {:.2} GiB free of {:.2} GiB on GPU {}; lower --expert-bytes or the layers",
                gib(need),
                gib(free),
                gib(total),
                gpu.ordinal
            )));
        }
        Ok(())
    }

    /// Allocates the store and fills every live slot with its expert's pattern.
    ///
    /// * `initial [num_layers][slots_per_rank]`: the logical expert of every local slot.
    pub fn new(
        gpu: Gpu,
        nccl: NcclComm,
        initial: &[Vec<usize>],
        expert_bytes: usize,
        tuning: NcclTuning,
    ) -> Result<Self, GpuError> {
        let slots_per_rank = initial.first().map_or(0, Vec::len);
        if !expert_bytes.is_multiple_of(8) || expert_bytes == 0 {
            return Err(GpuError::Cuda {
                op: "DeviceExpertStore::new",
                message: format!("expert bytes must be a positive multiple of 8, got {expert_bytes}"),
            });
        }
        Self::check_fits(&gpu, initial.len(), slots_per_rank, expert_bytes)?;
        let layer_bytes = slots_per_rank * expert_bytes;
        let mut live = Vec::with_capacity(initial.len());
        for (layer, experts) in initial.iter().enumerate() {
            let buf = gpu.alloc(layer_bytes)?;
            for (k, &e) in experts.iter().enumerate() {
                gpu.fill_pattern(buf.at(k * expert_bytes), expert_bytes, layer, e)?;
            }
            live.push(buf);
        }
        let staging = gpu.alloc(layer_bytes)?;
        let counter = gpu.alloc(8)?;
        gpu.synchronize()?;
        let mut nccl = nccl;
        if tuning.register {
            for buf in live.iter().chain(std::iter::once(&staging)) {
                nccl.register(buf.ptr, buf.bytes)?;
            }
        }
        let store = DeviceExpertStore {
            live,
            staging,
            counter,
            nccl,
            gpu,
            slots_per_rank,
            expert_bytes,
            tuning,
            corrupt_next_stage: false,
        };
        store.warm_up()?;
        Ok(store)
    }

    /// Connects NCCL to every peer before the first migration: NCCL sets up its point-to-point
    /// channels lazily, on the first send to a peer, which made the first migrated layer stall
    /// for hundreds of milliseconds. Each rank sends one expert-sized message to every peer, in
    /// `size - 1` rounds (round k: to `rank + k`, from `rank - k`), into the staging buffer.
    fn warm_up(&self) -> Result<(), GpuError> {
        let (rank, size) = (self.nccl.rank, self.nccl.size);
        let (Some(src), true) = (self.live.first(), self.slots_per_rank > 0) else { return Ok(()) };
        for k in 1..size {
            let ops = [
                P2p::Send { peer: (rank + k) % size, ptr: src.ptr, bytes: self.expert_bytes },
                P2p::Recv { peer: (rank + size - k) % size, ptr: self.staging.ptr, bytes: self.expert_bytes },
            ];
            self.nccl.group(&ops, self.gpu.stream())?;
        }
        self.nccl.synchronize(&self.gpu)
    }

    /// Frees the weights and gives back the GPU and the communicator.
    pub fn into_parts(self) -> (Gpu, NcclComm) {
        let DeviceExpertStore { mut nccl, live, staging, counter, gpu, .. } = self;
        nccl.deregister_all();
        drop((live, staging, counter));
        (gpu, nccl)
    }

    /// Transfers of the global list per NCCL group: `--nccl-group-mib` worth a rank, but never so
    /// many that one rank could post more than [`MAX_OPS_PER_GROUP`] operations in a group (a
    /// transfer is one send or one receive of each piece, for a rank that takes part in it).
    fn transfers_per_round(&self) -> usize {
        let wanted = (self.tuning.group_bytes / self.expert_bytes).max(1) * self.nccl.size;
        wanted.min((MAX_OPS_PER_GROUP / self.pieces().len().max(1)).max(1))
    }

    /// The pieces of one transfer: `(offset, bytes)`.
    fn pieces(&self) -> Vec<(usize, usize)> {
        let chunk = if self.tuning.chunk_bytes == 0 { self.expert_bytes } else { self.tuning.chunk_bytes };
        (0..self.expert_bytes).step_by(chunk).map(|o| (o, chunk.min(self.expert_bytes - o))).collect()
    }

    fn slot(&self, k: usize) -> usize {
        k * self.expert_bytes
    }

    /// Queues `count_wrong` for `(buffer slot, expert)` pairs and reads the total.
    fn count_wrong(
        &self,
        buf: &DeviceBuffer,
        layer: usize,
        slots: impl Iterator<Item = (usize, usize)>,
    ) -> Result<u64, GpuError> {
        self.gpu.zero_u64(self.counter.ptr)?;
        for (k, expert) in slots {
            self.gpu.count_wrong(buf.at(self.slot(k)), self.expert_bytes, layer, expert, self.counter.ptr)?;
        }
        self.gpu.read_u64(self.counter.ptr)
    }

    fn stage_inner(&mut self, m: &RankMigration) -> Result<StageTiming, GpuError> {
        let start = Instant::now();
        self.gpu.bind()?;
        let live = &self.live[m.layer];
        for c in &m.local_copies {
            self.gpu.copy(self.staging.at(self.slot(c.dst_slot)), live.at(self.slot(c.src_slot)), self.expert_bytes)?;
        }
        // Sends and receives merged in the global order, cut into rounds.
        let per_round = self.transfers_per_round();
        let pieces = self.pieces();
        // (seq, local slot, receive?, peer)
        let mut ops: Vec<(usize, usize, bool, usize)> = m
            .recvs
            .iter()
            .map(|t| (t.seq, t.dst_slot, true, t.src_rank))
            .chain(m.sends.iter().map(|t| (t.seq, t.src_slot, false, t.dst_rank)))
            .collect();
        ops.sort_unstable();
        let mut group: Vec<P2p> = Vec::new();
        let mut i = 0;
        while i < ops.len() {
            let round = ops[i].0 / per_round;
            group.clear();
            while i < ops.len() && ops[i].0 / per_round == round {
                let (_, slot, recv, peer) = ops[i];
                for &(off, bytes) in &pieces {
                    group.push(if recv {
                        P2p::Recv { peer, ptr: self.staging.at(self.slot(slot) + off), bytes }
                    } else {
                        P2p::Send { peer, ptr: live.at(self.slot(slot) + off), bytes }
                    });
                }
                i += 1;
            }
            self.nccl.group(&group, self.gpu.stream())?;
        }
        for c in &m.staged_copies {
            self.gpu.copy(
                self.staging.at(self.slot(c.dst_slot)),
                self.staging.at(self.slot(c.src_slot)),
                self.expert_bytes,
            )?;
        }
        self.nccl.synchronize(&self.gpu)?;
        if std::mem::take(&mut self.corrupt_next_stage) {
            if let Some(&k) = m.changed_slots.first() {
                // Overwrite the first 8 bytes with their complement: 8 wrong bytes.
                let ptr = self.staging.at(self.slot(k));
                let mut word = [0u64; 1];
                // SAFETY: `ptr` is inside the staging buffer; the stream is drained.
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_sync(&mut word[..], ptr)
                        .and_then(|_| cudarc::driver::result::memcpy_htod_sync(ptr, &[!word[0]]))
                }
                .map_err(super::cuda_err("cuMemcpy (fault injection)"))?;
            }
        }
        Ok(StageTiming { transfer_seconds: start.elapsed().as_secs_f64(), verify_seconds: 0.0 })
    }
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

impl ExpertStore for DeviceExpertStore {
    fn device(&self) -> String {
        format!("cuda:{} {}", self.gpu.ordinal, self.gpu.name)
    }

    fn transport(&self) -> &'static str {
        "nccl"
    }

    fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    fn slots_per_rank(&self) -> usize {
        self.slots_per_rank
    }

    fn stage(&mut self, m: &RankMigration) -> Result<StageTiming, ExecError> {
        Ok(self.stage_inner(m)?)
    }

    fn verify_staged(&mut self, m: &RankMigration) -> Result<u64, ExecError> {
        let slots = m.changed_slots.iter().map(|&k| (k, m.new_experts[k]));
        Ok(self.count_wrong(&self.staging, m.layer, slots)?)
    }

    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError> {
        let live = &self.live[m.layer];
        for &k in &m.changed_slots {
            self.gpu.copy(live.at(self.slot(k)), self.staging.at(self.slot(k)), self.expert_bytes)?;
        }
        self.gpu.synchronize()?;
        Ok(Commit::Next)
    }

    /// The next stage flips 8 bytes of its first staged slot.
    fn corrupt_next_stage(&mut self) {
        self.corrupt_next_stage = true;
    }

    fn verify_live(&mut self, layer: usize, experts: &[usize]) -> Result<u64, ExecError> {
        Ok(self.count_wrong(&self.live[layer], layer, experts.iter().copied().enumerate())?)
    }
}

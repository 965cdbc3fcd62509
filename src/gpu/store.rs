//! [`DeviceExpertStore`]: a rank's expert weights in GPU memory, moved with NCCL.
//!
//! Memory: one buffer per layer of `slots_per_rank x expert_bytes` (the live weights), one
//! staging buffer of one layer's local slots, and an 8-byte counter. Transfers go in rounds: the
//! layer's global transfer list is cut into groups of `transfers_per_round` transfers (the same
//! cut on every rank), and each rank posts its sends and receives of a round as one NCCL group,
//! so no single group is huge and no rank waits on a peer's later group. Each transfer may also
//! be split into pieces of at most `chunk_bytes`, posted in order inside its group.
//!
//! Memory ([`Memory`]): the store's own allocations (the synthetic engine: every live slot filled
//! with its expert's pattern), or an engine's GPU memory opened from its CUDA IPC handles
//! ([`super::ipc`], contract weights_kind 1), whose live slots only the engine writes: a commit
//! is then the contract's switch protocol ([`EngineSwitch`]), and the engine copies staging into
//! live at a step boundary.
//!
//! Verification ([`GpuCheck`]): the synthetic engine's pattern with the `count_wrong` kernel,
//! or, for real weights, the sender's checksum: the `checksum` kernel computes, for every expert
//! a rank sends and for the source of every local copy, an order-independent 64-bit sum
//! `sum_i splitmix64(word_i ^ splitmix64(i))` (word-parallel, one atomic add per warp, so the
//! result does not depend on the launch shape); the sender's sums go to their receivers as 8-byte
//! NCCL messages after the layer's data, in the same rounds; the receiver runs the same kernel
//! over its staging slots and compares. XXH3 (the host checksum) is sequential within a stripe
//! and would not run well on a GPU; the two paths never check each other's sums.

use std::time::Instant;

use cudarc::driver::sys::CUdeviceptr;

use super::device::{DeviceBuffer, Gpu};
use super::ipc::IpcMemory;
use super::nccl::{NcclComm, P2p, MAX_OPS_PER_GROUP};
use super::GpuError;
use crate::executor::{Commit, EngineSwitch, ExecError, ExpertStore, RankMigration, StageTiming};

/// Where the weights live.
pub enum Memory {
    /// Allocated by this store: one buffer per layer, and the staging buffer.
    Owned { live: Vec<DeviceBuffer>, staging: DeviceBuffer },
    /// The engine's, opened from its IPC handles; made live by the engine (`switch`).
    Engine { memory: IpcMemory, switch: Box<dyn EngineSwitch> },
}

/// How staged (and live) slots are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuCheck {
    /// The synthetic engine's pattern (`count_wrong`: the bytes that differ).
    Pattern,
    /// Real weights: the checksum the sender computed (a mismatch counts the whole slot).
    Checksum,
}

/// The three arrays of `sums`, `[slots_per_rank]` u64 each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sums {
    /// The sum each staged slot should have: its sender's, or its local copy's source's.
    Expected = 0,
    /// The sum of what is in a slot now (staged slots, or live ones for `verify_live`).
    Landed = 1,
    /// The sums of the live slots this rank sends.
    Sent = 2,
}

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
    drain: DrainOnDrop,
    memory: Memory,
    /// `live[layer]`: the device address of the layer's slots.
    live: Vec<CUdeviceptr>,
    staging: CUdeviceptr,
    counter: DeviceBuffer,
    /// `[3 * slots_per_rank]` u64: the expected sum of each staged slot (the sender's), the sum
    /// of what landed, and the sums of live slots this rank sends.
    sums: DeviceBuffer,
    check: GpuCheck,
    /// `live_sums[layer][slot]` (checksum stores): taken at the first `verify_live`, updated by
    /// every commit.
    live_sums: Vec<Option<Vec<u64>>>,
    /// The expected sums of the last stage, read back by `verify_staged`.
    expected: Vec<u64>,
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
        gpu.synchronize()?;
        let mut nccl = nccl;
        if tuning.register {
            for buf in live.iter().chain(std::iter::once(&staging)) {
                nccl.register(buf.ptr, buf.bytes)?;
            }
        }
        Self::assemble(
            gpu,
            nccl,
            Memory::Owned { live, staging },
            slots_per_rank,
            expert_bytes,
            tuning,
            GpuCheck::Pattern,
        )
    }

    /// A store over an engine's GPU memory (opened from its IPC handles, on `gpu`, the engine's
    /// GPU): staged slots are checked against their senders' checksums, and `switch` makes them
    /// live (the engine copies them at a step boundary). The engine's buffers are not registered
    /// with NCCL (imported IPC memory cannot be re-exported).
    pub fn over_engine(
        gpu: Gpu,
        nccl: NcclComm,
        memory: IpcMemory,
        switch: Box<dyn EngineSwitch>,
        slots_per_rank: usize,
        expert_bytes: usize,
        tuning: NcclTuning,
    ) -> Result<Self, GpuError> {
        if !expert_bytes.is_multiple_of(8) || expert_bytes == 0 {
            return Err(GpuError::Cuda {
                op: "DeviceExpertStore::over_engine",
                message: format!("expert bytes must be a positive multiple of 8, got {expert_bytes}"),
            });
        }
        let tuning = NcclTuning { register: false, ..tuning };
        let memory = Memory::Engine { memory, switch };
        Self::assemble(gpu, nccl, memory, slots_per_rank, expert_bytes, tuning, GpuCheck::Checksum)
    }

    fn assemble(
        gpu: Gpu,
        nccl: NcclComm,
        memory: Memory,
        slots_per_rank: usize,
        expert_bytes: usize,
        tuning: NcclTuning,
        check: GpuCheck,
    ) -> Result<Self, GpuError> {
        let (live, staging) = match &memory {
            Memory::Owned { live, staging } => (live.iter().map(|b| b.ptr).collect::<Vec<_>>(), staging.ptr),
            Memory::Engine { memory, .. } => (memory.live.clone(), memory.staging),
        };
        let counter = gpu.alloc(8)?;
        let sums = gpu.alloc(3 * 8 * slots_per_rank.max(1))?;
        let layers = live.len();
        let store = DeviceExpertStore {
            drain: DrainOnDrop(gpu.stream()),
            memory,
            live,
            staging,
            counter,
            sums,
            check,
            live_sums: vec![None; layers],
            expected: vec![0; slots_per_rank],
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

    /// Device address of byte `offset` of the live slots of `layer`.
    fn live_at(&self, layer: usize, offset: usize) -> CUdeviceptr {
        self.live[layer] + offset as u64
    }

    fn staging_at(&self, offset: usize) -> CUdeviceptr {
        self.staging + offset as u64
    }

    /// Slot `slot` of one of the three sum arrays.
    fn sum_at(&self, array: Sums, slot: usize) -> CUdeviceptr {
        self.sums.ptr + (8 * (array as usize * self.slots_per_rank + slot)) as u64
    }

    /// Connects NCCL to every peer before the first migration: NCCL sets up its point-to-point
    /// channels lazily, on the first send to a peer, which made the first migrated layer stall
    /// for hundreds of milliseconds. Each rank sends one expert-sized message to every peer, in
    /// `size - 1` rounds (round k: to `rank + k`, from `rank - k`), into the staging buffer.
    fn warm_up(&self) -> Result<(), GpuError> {
        let (rank, size) = (self.nccl.rank, self.nccl.size);
        let (Some(&src), true) = (self.live.first(), self.slots_per_rank > 0) else { return Ok(()) };
        for k in 1..size {
            let ops = [
                P2p::Send { peer: (rank + k) % size, ptr: src, bytes: self.expert_bytes },
                P2p::Recv { peer: (rank + size - k) % size, ptr: self.staging, bytes: self.expert_bytes },
            ];
            self.nccl.group(&ops, self.gpu.stream())?;
        }
        self.nccl.synchronize(&self.gpu)
    }

    /// Frees the weights (or closes the engine's handles) and gives back the GPU and the
    /// communicator.
    pub fn into_parts(self) -> (Gpu, NcclComm) {
        let DeviceExpertStore { mut nccl, drain, memory, counter, sums, gpu, .. } = self;
        drop(drain);
        nccl.deregister_all();
        drop((memory, counter, sums));
        (gpu, nccl)
    }

    /// Transfers of the global list per NCCL group: `--nccl-group-mib` worth a rank, but never so
    /// many that one rank could post more than [`MAX_OPS_PER_GROUP`] operations in a group (a
    /// transfer is one send or one receive of each piece, and of its checksum, for a rank that
    /// takes part in it).
    fn transfers_per_round(&self) -> usize {
        let wanted = (self.tuning.group_bytes / self.expert_bytes).max(1) * self.nccl.size;
        // A checksum store adds one 8-byte message after each transfer.
        let ops_per_transfer = self.pieces().len().max(1) + usize::from(self.check == GpuCheck::Checksum);
        wanted.min((MAX_OPS_PER_GROUP / ops_per_transfer).max(1))
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
        buf: CUdeviceptr,
        layer: usize,
        slots: impl Iterator<Item = (usize, usize)>,
    ) -> Result<u64, GpuError> {
        self.gpu.zero_u64(self.counter.ptr)?;
        for (k, expert) in slots {
            self.gpu.count_wrong(buf + self.slot(k) as u64, self.expert_bytes, layer, expert, self.counter.ptr)?;
        }
        self.gpu.read_u64(self.counter.ptr)
    }

    /// The checksums of `slots` of the slots at `buf`, into sum array `array` (queued).
    fn checksums(&self, buf: CUdeviceptr, array: Sums, slots: &[usize]) -> Result<(), GpuError> {
        for &k in slots {
            self.gpu.checksum(buf + self.slot(k) as u64, self.expert_bytes, self.sum_at(array, k))?;
        }
        Ok(())
    }

    /// Reads sum array `array`.
    fn read_sums(&self, array: Sums) -> Result<Vec<u64>, GpuError> {
        let mut out = vec![0u64; self.slots_per_rank];
        self.gpu.read_u64s(self.sum_at(array, 0), &mut out)?;
        Ok(out)
    }

    /// The checksums of `slots` of the slots at `buf` as they are now (the other slots' are 0),
    /// computed into [`Sums::Landed`] and read back.
    fn landed_sums(&self, buf: CUdeviceptr, slots: &[usize]) -> Result<Vec<u64>, GpuError> {
        self.gpu.zero(self.sum_at(Sums::Landed, 0), 8 * self.slots_per_rank)?;
        self.checksums(buf, Sums::Landed, slots)?;
        self.read_sums(Sums::Landed)
    }

    fn stage_inner(&mut self, m: &RankMigration) -> Result<StageTiming, GpuError> {
        let start = Instant::now();
        self.gpu.bind()?;
        let layer = m.layer;
        let checksum = self.check == GpuCheck::Checksum;
        if checksum {
            // The sums of what this rank sends and of the sources of its local copies.
            self.gpu.zero(self.sums.ptr, self.sums.bytes)?;
            let mut sent: Vec<usize> = m.sends.iter().map(|t| t.src_slot).collect();
            sent.sort_unstable();
            sent.dedup();
            self.checksums(self.live[layer], Sums::Sent, &sent)?;
            for c in &m.local_copies {
                self.gpu.checksum(
                    self.live_at(layer, self.slot(c.src_slot)),
                    self.expert_bytes,
                    self.sum_at(Sums::Expected, c.dst_slot),
                )?;
            }
        }
        for c in &m.local_copies {
            self.gpu.copy(
                self.staging_at(self.slot(c.dst_slot)),
                self.live_at(layer, self.slot(c.src_slot)),
                self.expert_bytes,
            )?;
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
                        P2p::Recv { peer, ptr: self.staging_at(self.slot(slot) + off), bytes }
                    } else {
                        P2p::Send { peer, ptr: self.live_at(layer, self.slot(slot) + off), bytes }
                    });
                }
                if checksum {
                    // The sender's sum, 8 bytes after the expert, in the same group: NCCL keeps
                    // the order of one pair's operations.
                    group.push(if recv {
                        P2p::Recv { peer, ptr: self.sum_at(Sums::Expected, slot), bytes: 8 }
                    } else {
                        P2p::Send { peer, ptr: self.sum_at(Sums::Sent, slot), bytes: 8 }
                    });
                }
                i += 1;
            }
            self.nccl.group(&group, self.gpu.stream())?;
        }
        for c in &m.staged_copies {
            self.gpu.copy(
                self.staging_at(self.slot(c.dst_slot)),
                self.staging_at(self.slot(c.src_slot)),
                self.expert_bytes,
            )?;
            if checksum {
                self.gpu.copy(self.sum_at(Sums::Expected, c.dst_slot), self.sum_at(Sums::Expected, c.src_slot), 8)?;
            }
        }
        self.nccl.synchronize(&self.gpu)?;
        if std::mem::take(&mut self.corrupt_next_stage) {
            if let Some(&k) = m.changed_slots.first() {
                // Overwrite the first 8 bytes with their complement: 8 wrong bytes.
                let ptr = self.staging_at(self.slot(k));
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
        match self.check {
            GpuCheck::Pattern => {
                let slots = m.changed_slots.iter().map(|&k| (k, m.new_experts[k]));
                Ok(self.count_wrong(self.staging, m.layer, slots)?)
            }
            GpuCheck::Checksum => {
                let landed = self.landed_sums(self.staging, &m.changed_slots)?;
                let expected = self.read_sums(Sums::Expected)?;
                let wrong = m.changed_slots.iter().filter(|&&k| expected[k] != landed[k]).count();
                self.expected = expected;
                Ok((wrong * self.expert_bytes) as u64)
            }
        }
    }

    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError> {
        let commit = match &mut self.memory {
            Memory::Owned { .. } => {
                for &k in &m.changed_slots {
                    self.gpu.copy(
                        self.live_at(m.layer, self.slot(k)),
                        self.staging_at(self.slot(k)),
                        self.expert_bytes,
                    )?;
                }
                self.gpu.synchronize()?;
                Commit::Next
            }
            // The engine copies staging into live at the agreed boundary.
            Memory::Engine { switch, .. } => switch.commit(m)?,
        };
        if let (Commit::Next | Commit::AtStep(_), Some(Some(sums))) = (&commit, self.live_sums.get_mut(m.layer)) {
            for &k in &m.changed_slots {
                sums[k] = self.expected[k];
            }
        }
        Ok(commit)
    }

    /// The next stage flips 8 bytes of its first staged slot.
    fn corrupt_next_stage(&mut self) {
        self.corrupt_next_stage = true;
    }

    /// The pattern (synthetic weights); otherwise the live slots must still have the checksums
    /// they had at the first call, or that their last commit gave them.
    fn verify_live(&mut self, layer: usize, experts: &[usize]) -> Result<u64, ExecError> {
        match self.check {
            GpuCheck::Pattern => Ok(self.count_wrong(self.live[layer], layer, experts.iter().copied().enumerate())?),
            GpuCheck::Checksum => {
                let all: Vec<usize> = (0..self.slots_per_rank).collect();
                let now = self.landed_sums(self.live[layer], &all)?;
                let known = self.live_sums[layer].get_or_insert_with(|| now.clone());
                Ok(known.iter().zip(&now).filter(|(a, b)| a != b).count() as u64 * self.expert_bytes as u64)
            }
        }
    }
}

/// Drains a stream when dropped: a field before the memory, so that the engine's handles close
/// (and buffers are freed) only after every queued copy and transfer finished.
struct DrainOnDrop(cudarc::driver::sys::CUstream);

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        // SAFETY: the stream belongs to the store's `Gpu`, which drops after this field.
        let _ = unsafe { cudarc::driver::result::stream::synchronize(self.0) };
    }
}

//! [`DeviceExpertStore`]: a rank's expert weights in GPU memory, moved with NCCL.
//!
//! Memory: an expert is row `s` of every per-expert tensor of its layer ([`ExpertRows`]: device
//! addresses, row sizes and strides; contract 2). The store's own memory is one tensor a layer
//! (`[slots_per_rank, expert_bytes]` per layer, and a staging buffer of one layer's slots); an
//! engine's is its table, opened from its IPC handles. A transfer moves every per-expert row of
//! a changed slot in one NCCL group, straight from the live rows into the staging rows (no
//! packing copy). Transfers go in rounds: the
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
//! or, for real weights, the sender's checksums: the `checksum` kernel computes, for every row of
//! every expert a rank sends and of the source of every local copy, an order-independent 64-bit
//! sum `sum_i splitmix64(word_i ^ splitmix64(i))` over the row zero-padded to whole 8-byte words
//! (word-parallel, one atomic add per warp, so the result does not depend on the launch shape); a
//! row that is not 8-byte aligned or not a whole number of words is first copied into a zeroed
//! scratch buffer (stream-ordered), so the sum is a function of the row's bytes alone, whatever
//! its address. An expert's checksum is the vector of its rows' sums (one per per-expert tensor);
//! the sender's vectors go to their receivers as one `8 x tensors`-byte NCCL message after the
//! expert's rows, in the same group; the receiver sums its staging rows and compares, through the
//! shared [`Verifier`]. XXH3 (the host checksum) is sequential within a stripe
//! and would not run well on a GPU; the two paths never check each other's sums.

use std::time::Instant;

use cudarc::driver::sys::CUdeviceptr;

use super::device::{DeviceBuffer, Gpu};
use super::ipc::{GlobalRows, IpcMemory};
use super::nccl::{NcclComm, P2p, MAX_OPS_PER_GROUP};
use super::GpuError;
use crate::executor::fault::FlipStaged;
use crate::executor::memory::ExpertRows;
use crate::executor::verify::Verifier;
use crate::executor::{Commit, EngineSwitch, ExecError, ExpertStore, RankMigration, StageTiming};

/// Where the weights live.
pub(crate) enum Memory {
    /// Allocated by this store: one buffer per layer, and the staging buffer. Held, never read:
    /// the rows address them, and dropping them frees the memory.
    #[allow(dead_code)]
    Owned { live: Vec<DeviceBuffer>, staging: DeviceBuffer },
    /// The engine's, opened from its IPC handles (held: dropping them closes the mappings); made
    /// live by the engine (`switch`).
    #[allow(dead_code)]
    Engine { memory: IpcMemory, switch: Box<dyn EngineSwitch> },
}

/// How staged (and live) slots are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GpuCheck {
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
    pub(crate) fn from_mib(group_mib: f64, chunk_mib: f64, register: bool) -> Self {
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
pub(crate) struct DeviceExpertStore {
    // Field order matters for drop: the communicator (which deregisters the buffers) goes first,
    // then the buffers, then the GPU context.
    nccl: NcclComm,
    drain: DrainOnDrop,
    memory: Memory,
    /// Device addresses of every per-expert row, live layers and staging.
    rows: ExpertRows,
    /// The engine's global tensors (never written; hashed).
    globals: Vec<GlobalRows>,
    counter: DeviceBuffer,
    /// `[3][slots_per_rank][tensors]` u64: the expected sums of each staged slot (the sender's),
    /// the sums of what landed, and the sums of live slots this rank sends.
    sums: DeviceBuffer,
    /// One u64 per global tensor.
    global_sums: DeviceBuffer,
    /// Zeroed, then a row copied in, for the sums of rows that are not whole aligned words.
    scratch: DeviceBuffer,
    check: GpuCheck,
    verifier: Verifier,
    pub gpu: Gpu,
    slots_per_rank: usize,
    expert_bytes: usize,
    tuning: NcclTuning,
}

impl DeviceExpertStore {
    /// Device bytes the store needs: the layers, the staging buffer and the counter (`usize::MAX`
    /// when that overflows).
    pub(crate) fn bytes_needed(num_layers: usize, slots_per_rank: usize, expert_bytes: usize) -> usize {
        num_layers
            .checked_add(1)
            .and_then(|l| l.checked_mul(slots_per_rank))
            .and_then(|b| b.checked_mul(expert_bytes))
            .and_then(|b| b.checked_add(8))
            .unwrap_or(usize::MAX)
    }

    /// Checks, before anything is allocated or any peer is waited for, that the store fits in
    /// the free memory of `gpu` ([`GpuError::TooBig`], exit 2, otherwise).
    pub(crate) fn check_fits(
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
        let rows = ExpertRows::contiguous(initial.len(), slots_per_rank, expert_bytes, |l| live[l].ptr, staging.ptr);
        Self::assemble(gpu, nccl, Memory::Owned { live, staging }, rows, Vec::new(), tuning, GpuCheck::Pattern)
    }

    /// A store over an engine's GPU memory (opened from its IPC handles, on `gpu`, the engine's
    /// GPU): staged slots are checked against their senders' checksums, and `switch` makes them
    /// live (the engine copies them at a step boundary). The engine's buffers are not registered
    /// with NCCL (imported IPC memory cannot be re-exported).
    pub(crate) fn over_engine(
        gpu: Gpu,
        nccl: NcclComm,
        memory: IpcMemory,
        switch: Box<dyn EngineSwitch>,
        tuning: NcclTuning,
    ) -> Result<Self, GpuError> {
        let tuning = NcclTuning { register: false, ..tuning };
        let (rows, globals) = (memory.rows.clone(), memory.globals.clone());
        let memory = Memory::Engine { memory, switch };
        Self::assemble(gpu, nccl, memory, rows, globals, tuning, GpuCheck::Checksum)
    }

    fn assemble(
        gpu: Gpu,
        nccl: NcclComm,
        memory: Memory,
        rows: ExpertRows,
        globals: Vec<GlobalRows>,
        tuning: NcclTuning,
        check: GpuCheck,
    ) -> Result<Self, GpuError> {
        let (spr, tensors, expert_bytes) = (rows.slots_per_rank, rows.num_tensors(), rows.expert_bytes());
        if expert_bytes == 0 || (check == GpuCheck::Pattern && (tensors != 1 || !expert_bytes.is_multiple_of(8))) {
            return Err(GpuError::Cuda {
                op: "DeviceExpertStore",
                message: format!(
                    "{expert_bytes} bytes an expert in {tensors} tensor(s): the pattern store needs one tensor of a positive multiple of 8 bytes"
                ),
            });
        }
        // The scratch buffer holds the largest row whose sum cannot be taken in place.
        let unaligned = |at: u64, stride: u64, bytes: usize| {
            !at.is_multiple_of(8) || !stride.is_multiple_of(8) || !bytes.is_multiple_of(8)
        };
        let mut scratch_bytes = 0usize;
        for spans in &rows.spans {
            for (t, s) in spans.iter().enumerate() {
                if unaligned(s.at, s.row_stride, rows.row_bytes[t]) {
                    scratch_bytes = scratch_bytes.max(rows.row_bytes[t].next_multiple_of(8));
                }
            }
        }
        for g in &globals {
            if unaligned(g.ptr, g.row_stride, g.row_bytes) {
                scratch_bytes = scratch_bytes.max(g.row_bytes.next_multiple_of(8));
            }
        }
        let counter = gpu.alloc(8)?;
        let sums = gpu.alloc(3 * 8 * (spr * tensors).max(1))?;
        let global_sums = gpu.alloc(8 * globals.len().max(1))?;
        let scratch = gpu.alloc(scratch_bytes)?;
        let store = DeviceExpertStore {
            drain: DrainOnDrop(gpu.stream()),
            memory,
            verifier: Verifier::new(rows.num_layers(), spr, expert_bytes),
            rows,
            globals,
            counter,
            sums,
            global_sums,
            scratch,
            check,
            nccl,
            gpu,
            slots_per_rank: spr,
            expert_bytes,
            tuning,
        };
        store.warm_up()?;
        Ok(store)
    }

    fn tensors(&self) -> usize {
        self.rows.num_tensors()
    }

    /// Queues `*sum += checksum of the row at ptr` (zero-padded to whole words): in place when
    /// the row is whole aligned words, else through the scratch buffer.
    fn checksum_row(&self, ptr: CUdeviceptr, bytes: usize, sum: CUdeviceptr) -> Result<(), GpuError> {
        if ptr.is_multiple_of(8) && bytes.is_multiple_of(8) {
            return self.gpu.checksum(ptr, bytes, sum);
        }
        let padded = bytes.next_multiple_of(8);
        self.gpu.zero(self.scratch.ptr, padded)?;
        self.gpu.copy(self.scratch.ptr, ptr, bytes)?;
        self.gpu.checksum(self.scratch.ptr, padded, sum)
    }

    /// Queues the sums of every row of expert `slot` of `layer` (`num_layers`: staging) into
    /// sum array `array`'s entries of `dst_slot`.
    fn expert_sums(&self, layer: usize, slot: usize, array: Sums, dst_slot: usize) -> Result<(), GpuError> {
        for t in 0..self.tensors() {
            let (ptr, bytes) = self.rows.row(layer, t, slot);
            self.checksum_row(ptr, bytes, self.sum_at(array, dst_slot, t))?;
        }
        Ok(())
    }

    /// Copies expert `src` of `from_layer` into expert `dst` of `to_layer`, row by row (queued).
    fn copy_expert(&self, to_layer: usize, dst: usize, from_layer: usize, src: usize) -> Result<(), GpuError> {
        for t in 0..self.tensors() {
            let (to, bytes) = self.rows.row(to_layer, t, dst);
            let (from, _) = self.rows.row(from_layer, t, src);
            self.gpu.copy(to, from, bytes)?;
        }
        Ok(())
    }

    fn staging_layer(&self) -> usize {
        self.rows.num_layers()
    }

    /// Tensor `t` of slot `slot` of one of the three sum arrays.
    fn sum_at(&self, array: Sums, slot: usize, t: usize) -> CUdeviceptr {
        self.sums.ptr + (8 * ((array as usize * self.slots_per_rank + slot) * self.tensors() + t)) as u64
    }

    /// Connects NCCL to every peer before the first migration: NCCL sets up its point-to-point
    /// channels lazily, on the first send to a peer, which made the first migrated layer stall
    /// for hundreds of milliseconds. Each rank sends one expert-sized message to every peer, in
    /// `size - 1` rounds (round k: to `rank + k`, from `rank - k`), into the staging buffer.
    fn warm_up(&self) -> Result<(), GpuError> {
        let (rank, size) = (self.nccl.rank, self.nccl.size);
        if self.rows.num_layers() == 0 || self.slots_per_rank == 0 {
            return Ok(());
        }
        let (src, bytes) = self.rows.row(0, 0, 0);
        let (dst, _) = self.rows.staging_row(0, 0);
        for k in 1..size {
            let ops = [
                P2p::Send { peer: (rank + k) % size, ptr: src, bytes },
                P2p::Recv { peer: (rank + size - k) % size, ptr: dst, bytes },
            ];
            self.nccl.group(&ops, self.gpu.stream())?;
        }
        self.nccl.synchronize(&self.gpu)
    }

    /// Frees the weights (or closes the engine's handles) and gives back the GPU and the
    /// communicator.
    pub(crate) fn into_parts(self) -> (Gpu, NcclComm) {
        let DeviceExpertStore { mut nccl, drain, memory, counter, sums, global_sums, scratch, gpu, .. } = self;
        drop(drain);
        nccl.deregister_all();
        drop((memory, counter, sums, global_sums, scratch));
        (gpu, nccl)
    }

    /// Transfers of the global list per NCCL group: `--nccl-group-mib` worth a rank, but never so
    /// many that one rank could post more than [`MAX_OPS_PER_GROUP`] operations in a group (a
    /// transfer is one send or one receive of each piece of each row, and of its checksums, for a
    /// rank that takes part in it).
    fn transfers_per_round(&self) -> usize {
        let wanted = (self.tuning.group_bytes / self.expert_bytes).max(1) * self.nccl.size;
        let pieces: usize = (0..self.tensors()).map(|t| self.pieces(t).len()).sum();
        // A checksum store adds one message of the expert's sums after each transfer.
        let ops_per_transfer = pieces.max(1) + usize::from(self.check == GpuCheck::Checksum);
        wanted.min((MAX_OPS_PER_GROUP / ops_per_transfer).max(1))
    }

    /// The pieces of one row of tensor `t`: `(offset, bytes)`.
    fn pieces(&self, t: usize) -> Vec<(usize, usize)> {
        let rb = self.rows.row_bytes[t];
        let chunk = if self.tuning.chunk_bytes == 0 { rb } else { self.tuning.chunk_bytes };
        (0..rb).step_by(chunk.max(1)).map(|o| (o, chunk.min(rb - o))).collect()
    }

    /// Queues `count_wrong` for `(slot, expert)` pairs of `layer` (`num_layers`: staging; the
    /// pattern store's one contiguous tensor) and reads the total.
    fn count_wrong(
        &self,
        layer: usize,
        pattern_layer: usize,
        slots: impl Iterator<Item = (usize, usize)>,
    ) -> Result<u64, GpuError> {
        self.gpu.zero_u64(self.counter.ptr)?;
        for (k, expert) in slots {
            let (ptr, bytes) = self.rows.row(layer, 0, k);
            self.gpu.count_wrong(ptr, bytes, pattern_layer, expert, self.counter.ptr)?;
        }
        self.gpu.read_u64(self.counter.ptr)
    }

    /// Reads sum array `array`: `[slots_per_rank][tensors]`.
    fn read_sums(&self, array: Sums) -> Result<Vec<u64>, GpuError> {
        let mut out = vec![0u64; self.slots_per_rank * self.tensors()];
        self.gpu.read_u64s(self.sum_at(array, 0, 0), &mut out)?;
        Ok(out)
    }

    /// The sums of `slots` of `layer` (`num_layers`: staging) as they are now (the other slots'
    /// are 0), computed into [`Sums::Landed`] and read back, `[slot][tensor]`.
    fn landed_sums(&self, layer: usize, slots: &[usize]) -> Result<Vec<Vec<u64>>, GpuError> {
        self.gpu.zero(self.sum_at(Sums::Landed, 0, 0), 8 * self.slots_per_rank * self.tensors())?;
        for &k in slots {
            self.expert_sums(layer, k, Sums::Landed, k)?;
        }
        let flat = self.read_sums(Sums::Landed)?;
        Ok(flat.chunks(self.tensors()).map(<[u64]>::to_vec).collect())
    }

    fn stage_inner(&mut self, m: &RankMigration) -> Result<StageTiming, GpuError> {
        let start = Instant::now();
        self.gpu.bind()?;
        let layer = m.layer;
        let staging = self.staging_layer();
        let checksum = self.check == GpuCheck::Checksum;
        let tensors = self.tensors();
        if checksum {
            // The sums of what this rank sends and of the sources of its local copies.
            self.gpu.zero(self.sums.ptr, self.sums.bytes)?;
            let mut sent: Vec<usize> = m.sends.iter().map(|t| t.src_slot).collect();
            sent.sort_unstable();
            sent.dedup();
            for &k in &sent {
                self.expert_sums(layer, k, Sums::Sent, k)?;
            }
            for c in &m.local_copies {
                self.expert_sums(layer, c.src_slot, Sums::Expected, c.dst_slot)?;
            }
        }
        for c in &m.local_copies {
            self.copy_expert(staging, c.dst_slot, layer, c.src_slot)?;
        }
        // Sends and receives merged in the global order, cut into rounds.
        let per_round = self.transfers_per_round();
        let pieces: Vec<Vec<(usize, usize)>> = (0..tensors).map(|t| self.pieces(t)).collect();
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
                // Every per-expert row of the slot, straight from the live rows into the staging
                // rows, in table order.
                for (t, row_pieces) in pieces.iter().enumerate() {
                    let (ptr, _) = self.rows.row(if recv { staging } else { layer }, t, slot);
                    for &(off, bytes) in row_pieces {
                        let ptr = ptr + off as u64;
                        group.push(if recv { P2p::Recv { peer, ptr, bytes } } else { P2p::Send { peer, ptr, bytes } });
                    }
                }
                if checksum {
                    // The sender's sums, after the rows, in the same group: NCCL keeps the order
                    // of one pair's operations.
                    let bytes = 8 * tensors;
                    group.push(if recv {
                        P2p::Recv { peer, ptr: self.sum_at(Sums::Expected, slot, 0), bytes }
                    } else {
                        P2p::Send { peer, ptr: self.sum_at(Sums::Sent, slot, 0), bytes }
                    });
                }
                i += 1;
            }
            self.nccl.group(&group, self.gpu.stream())?;
        }
        for c in &m.staged_copies {
            self.copy_expert(staging, c.dst_slot, staging, c.src_slot)?;
            if checksum {
                self.gpu.copy(
                    self.sum_at(Sums::Expected, c.dst_slot, 0),
                    self.sum_at(Sums::Expected, c.src_slot, 0),
                    8 * tensors,
                )?;
            }
        }
        self.nccl.synchronize(&self.gpu)?;
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
                Ok(self.count_wrong(self.staging_layer(), m.layer, slots)?)
            }
            GpuCheck::Checksum => {
                let landed = self.landed_sums(self.staging_layer(), &m.changed_slots)?;
                let expected = self.read_sums(Sums::Expected)?;
                let t = self.tensors();
                let mut wrong = 0;
                for &k in &m.changed_slots {
                    self.verifier.expect(k, expected[k * t..(k + 1) * t].to_vec());
                    wrong += self.verifier.staged_wrong(k, &landed[k]);
                }
                Ok(wrong)
            }
        }
    }

    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError> {
        let commit = match &mut self.memory {
            Memory::Owned { .. } => {
                for &k in &m.changed_slots {
                    self.copy_expert(m.layer, k, self.staging_layer(), k)?;
                }
                self.gpu.synchronize()?;
                Commit::Next
            }
            // The engine copies staging into live at the agreed boundary.
            Memory::Engine { switch, .. } => switch.commit(m)?,
        };
        if matches!(commit, Commit::Next | Commit::AtStep(_)) {
            self.verifier.committed(m.layer, &m.changed_slots);
        }
        Ok(commit)
    }

    /// The pattern (synthetic weights); otherwise the live slots must still have the checksums
    /// they had at the first call, or that their last commit gave them.
    fn verify_live(&mut self, layer: usize, experts: &[usize]) -> Result<u64, ExecError> {
        match self.check {
            GpuCheck::Pattern => Ok(self.count_wrong(layer, layer, experts.iter().copied().enumerate())?),
            GpuCheck::Checksum => {
                let all: Vec<usize> = (0..self.slots_per_rank).collect();
                let now = self.landed_sums(layer, &all)?;
                Ok(self.verifier.live_wrong(layer, now))
            }
        }
    }

    /// The sums of the engine's global tensors (each row's sum added into its tensor's), mixed
    /// into one value; `None` without global tensors.
    fn globals_hash(&mut self) -> Result<Option<u64>, ExecError> {
        if self.globals.is_empty() {
            return Ok(None);
        }
        self.gpu.zero(self.global_sums.ptr, 8 * self.globals.len())?;
        for (j, g) in self.globals.iter().enumerate() {
            for r in 0..g.rows {
                self.checksum_row(g.ptr + r as u64 * g.row_stride, g.row_bytes, self.global_sums.ptr + 8 * j as u64)?;
            }
        }
        let mut sums = vec![0u64; self.globals.len()];
        self.gpu.read_u64s(self.global_sums.ptr, &mut sums)?;
        Ok(Some(sums.iter().fold(0u64, |h, &s| crate::engine::splitmix64(h ^ s))))
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

/// Fault injection ([`crate::executor::fault`]): the first bytes (up to 8) of the staged slot's
/// first row, overwritten with their complement once the stage has drained its stream.
impl FlipStaged for DeviceExpertStore {
    fn flip_staged(&mut self, slot: usize) -> Result<(), ExecError> {
        self.gpu.bind()?;
        let (ptr, bytes) = self.rows.staging_row(0, slot);
        let mut head = vec![0u8; bytes.min(8)];
        // SAFETY: `ptr` is a staging row of at least `head.len()` bytes; the stage that wrote it
        // synchronized its stream before returning.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_sync(&mut head[..], ptr).and_then(|_| {
                let flipped: Vec<u8> = head.iter().map(|b| !b).collect();
                cudarc::driver::result::memcpy_htod_sync(ptr, &flipped[..])
            })
        }
        .map_err(super::cuda_err("cuMemcpy (fault injection)"))?;
        Ok(())
    }
}

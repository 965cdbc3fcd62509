//! Storage: where a rank's expert weights live in host memory, and who may write its live slots.
//!
//! An expert is not one block of bytes: it is row `s` of every per-expert tensor of its layer
//! (docs/engine-contract.md, version 2), each tensor with its own row size and row stride.
//! [`ExpertRows`] says where those rows are; an expert's bytes are the concatenation of its rows
//! in table order (`expert_bytes` in all), which is what checksums and the synthetic pattern
//! cover. A [`SlotMemory`] holds `num_layers` layers of `slots_per_rank` live slots and one
//! staging area of one layer's slots, in the same tensor layout. The executor only ever writes
//! staging rows; making staged slots live ([`SlotMemory::commit`]) belongs to the memory's owner:
//! [`HeapSlots`] (memory this process owns) copies them itself, an engine's shared memory asks
//! the engine to apply them at a step boundary (`crate::engine::shm`).

use super::{Commit, ExecError, RankMigration};

/// Where the rows of one per-expert tensor of one layer (or of the staging area) start, and how
/// far apart they are, in the memory's own address space (a byte offset into a host buffer, or
/// a device address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSpan {
    pub at: u64,
    pub row_stride: u64,
}

/// The per-expert tensors of a store: their row sizes (the same in every layer) and where each
/// layer's rows and the staging rows are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertRows {
    pub slots_per_rank: usize,
    /// `[tensors]`: bytes of one row of each per-expert tensor, in table order.
    pub row_bytes: Vec<usize>,
    /// `[num_layers + 1][tensors]`: the last row is the staging area.
    pub spans: Vec<Vec<RowSpan>>,
}

impl ExpertRows {
    /// One contiguous tensor a layer: `[slots_per_rank, expert_bytes]` at `layer_at(layer)`, and
    /// the staging area at `staging_at` (the synthetic engine's store, and contract-1-shaped
    /// memory).
    pub fn contiguous(
        num_layers: usize,
        slots_per_rank: usize,
        expert_bytes: usize,
        layer_at: impl Fn(usize) -> u64,
        staging_at: u64,
    ) -> ExpertRows {
        let span = |at| vec![RowSpan { at, row_stride: expert_bytes as u64 }];
        let mut spans: Vec<Vec<RowSpan>> = (0..num_layers).map(|l| span(layer_at(l))).collect();
        spans.push(span(staging_at));
        ExpertRows { slots_per_rank, row_bytes: vec![expert_bytes], spans }
    }

    pub fn num_layers(&self) -> usize {
        self.spans.len().saturating_sub(1)
    }

    pub(crate) fn num_tensors(&self) -> usize {
        self.row_bytes.len()
    }

    /// Σ `row_bytes`: the bytes of one expert.
    pub fn expert_bytes(&self) -> usize {
        self.row_bytes.iter().sum()
    }

    /// Row `slot` of tensor `t` of `layer` (`layer == num_layers`: staging): `(address, bytes)`.
    pub fn row(&self, layer: usize, t: usize, slot: usize) -> (u64, usize) {
        let s = self.spans[layer][t];
        (s.at + slot as u64 * s.row_stride, self.row_bytes[t])
    }

    /// The staging row `slot` of tensor `t`.
    pub(crate) fn staging_row(&self, t: usize, slot: usize) -> (u64, usize) {
        self.row(self.num_layers(), t, slot)
    }
}

/// Host-addressable expert weights: live slots per layer and one staging area, as per-expert
/// tensor rows.
pub trait SlotMemory {
    /// Where the rows are.
    fn rows(&self) -> &ExpertRows;
    /// Row `slot` of per-expert tensor `t` of `layer` (live).
    fn live_row(&self, layer: usize, t: usize, slot: usize) -> Result<&[u8], ExecError>;
    /// Staging row `slot` of per-expert tensor `t`.
    fn staging_row(&self, t: usize, slot: usize) -> &[u8];
    /// The same, to write. Only staging rows are ever written by the executor.
    fn staging_row_mut(&mut self, t: usize, slot: usize) -> &mut [u8];
    /// Makes the staged slots of `m` (`m.changed_slots` of `m.layer`) live, collective over the
    /// ranks for memories whose commit needs an agreement; every rank calls it for the same layer.
    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError>;

    /// A hash of the global tensors beside the experts (never written here), `None` without any.
    fn globals_hash(&self) -> Option<u64> {
        None
    }

    fn num_layers(&self) -> usize {
        self.rows().num_layers()
    }
    fn slots_per_rank(&self) -> usize {
        self.rows().slots_per_rank
    }
    fn expert_bytes(&self) -> usize {
        self.rows().expert_bytes()
    }

    /// Gathers live expert `slot` of `layer` (all its rows, in table order) into `out`
    /// (`expert_bytes` long).
    fn gather_live(&self, layer: usize, slot: usize, out: &mut [u8]) -> Result<(), ExecError> {
        let mut at = 0;
        for t in 0..self.rows().num_tensors() {
            let row = self.live_row(layer, t, slot)?;
            out[at..at + row.len()].copy_from_slice(row);
            at += row.len();
        }
        Ok(())
    }

    /// Gathers staged expert `slot` into `out`.
    fn gather_staging(&self, slot: usize, out: &mut [u8]) {
        let mut at = 0;
        for t in 0..self.rows().num_tensors() {
            let row = self.staging_row(t, slot);
            out[at..at + row.len()].copy_from_slice(row);
            at += row.len();
        }
    }

    /// Scatters an expert's bytes (`expert_bytes`, rows in table order) into staging slot `slot`:
    /// only its rows are written, never the padding between them.
    fn scatter_staging(&mut self, slot: usize, src: &[u8]) {
        let mut at = 0;
        for t in 0..self.rows().num_tensors() {
            let row = self.staging_row_mut(t, slot);
            let n = row.len();
            row.copy_from_slice(&src[at..at + n]);
            at += n;
        }
    }
}

/// How staged slots become live in memory that an engine owns: the engine switches them at a
/// step boundary after an agreement (`crate::engine::shm::apply::ShmSwitch`, the contract's
/// switch protocol). Collective: every rank calls it for the same layer, and every rank returns
/// the same [`Commit`].
pub(crate) trait EngineSwitch {
    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError>;
}

/// Expert weights in this process's heap: the synthetic engine's, on the host transport. One
/// contiguous per-expert tensor a layer (`[slots_per_rank, expert_bytes]`), the layers and the
/// staging area one after the other in one buffer.
pub struct HeapSlots {
    rows: ExpertRows,
    buf: Vec<u8>,
}

impl HeapSlots {
    /// Zeroed memory for `num_layers` layers of `slots_per_rank` slots of `expert_bytes` bytes.
    pub fn new(num_layers: usize, slots_per_rank: usize, expert_bytes: usize) -> HeapSlots {
        let layer = (slots_per_rank * expert_bytes) as u64;
        HeapSlots {
            rows: ExpertRows::contiguous(
                num_layers,
                slots_per_rank,
                expert_bytes,
                |l| l as u64 * layer,
                num_layers as u64 * layer,
            ),
            buf: vec![0u8; (num_layers + 1) * slots_per_rank * expert_bytes],
        }
    }

    fn layer_range(&self, layer: usize) -> std::ops::Range<usize> {
        let n = self.rows.slots_per_rank * self.rows.expert_bytes();
        layer * n..(layer + 1) * n
    }

    /// The live slots of `layer`, writable: for filling the initial weights (and fault injection).
    pub(crate) fn live_mut(&mut self, layer: usize) -> Result<&mut [u8], ExecError> {
        let layers = self.rows.num_layers();
        if layer >= layers {
            return Err(out_of_range(layer, layers));
        }
        let r = self.layer_range(layer);
        Ok(&mut self.buf[r])
    }
}

pub(crate) fn out_of_range(layer: usize, layers: usize) -> ExecError {
    ExecError::Other(format!("layer {layer} is out of range: the store holds {layers} layers"))
}

impl SlotMemory for HeapSlots {
    fn rows(&self) -> &ExpertRows {
        &self.rows
    }

    fn live_row(&self, layer: usize, t: usize, slot: usize) -> Result<&[u8], ExecError> {
        if layer >= self.rows.num_layers() {
            return Err(out_of_range(layer, self.rows.num_layers()));
        }
        let (at, n) = self.rows.row(layer, t, slot);
        Ok(&self.buf[at as usize..at as usize + n])
    }

    fn staging_row(&self, t: usize, slot: usize) -> &[u8] {
        let (at, n) = self.rows.staging_row(t, slot);
        &self.buf[at as usize..at as usize + n]
    }

    fn staging_row_mut(&mut self, t: usize, slot: usize) -> &mut [u8] {
        let (at, n) = self.rows.staging_row(t, slot);
        &mut self.buf[at as usize..at as usize + n]
    }

    /// Copies the staged rows into the live ones: live from the next step.
    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError> {
        if m.layer >= self.rows.num_layers() {
            return Err(out_of_range(m.layer, self.rows.num_layers()));
        }
        for &k in &m.changed_slots {
            for t in 0..self.rows.num_tensors() {
                let (from, n) = self.rows.staging_row(t, k);
                let (to, _) = self.rows.row(m.layer, t, k);
                self.buf.copy_within(from as usize..from as usize + n, to as usize);
            }
        }
        Ok(Commit::Next)
    }
}

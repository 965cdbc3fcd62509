//! Storage: where a rank's expert weights live in host memory, and who may write its live slots.
//!
//! A [`SlotMemory`] holds `num_layers` layers of `slots_per_rank` live slots of `expert_bytes`
//! bytes, and one staging area of one layer's local slots. The executor only ever writes the
//! staging area; making staged slots live ([`SlotMemory::commit`]) belongs to the memory's owner:
//! [`HeapSlots`] (memory this process owns) copies them itself, an engine's shared memory asks the
//! engine to apply them at a step boundary (`crate::engine::shm`).

use super::{Commit, ExecError, RankMigration};

/// Host-addressable expert weights: live slots per layer and one staging area.
pub trait SlotMemory {
    fn num_layers(&self) -> usize;
    fn slots_per_rank(&self) -> usize;
    fn expert_bytes(&self) -> usize;
    /// The live slots of `layer`: `slots_per_rank * expert_bytes` bytes.
    fn live(&self, layer: usize) -> Result<&[u8], ExecError>;
    /// The live slots of `layer` (read) and the staging area (write), at once.
    fn live_and_staging(&mut self, layer: usize) -> Result<(&[u8], &mut [u8]), ExecError>;
    /// The staging area: `slots_per_rank * expert_bytes` bytes.
    fn staging(&self) -> &[u8];
    /// Makes the staged slots of `m` (`m.changed_slots` of `m.layer`) live, collective over the
    /// ranks for memories whose commit needs an agreement; every rank calls it for the same layer.
    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError>;

    /// The byte range of local slot `slot` inside a layer or the staging area.
    fn range(&self, slot: usize) -> std::ops::Range<usize> {
        slot * self.expert_bytes()..(slot + 1) * self.expert_bytes()
    }
}

/// How staged slots become live in memory that an engine owns: the engine switches them at a
/// step boundary after an agreement (`crate::engine::shm::apply::ShmSwitch`, the contract's
/// switch protocol). Collective: every rank calls it for the same layer, and every rank returns
/// the same [`Commit`].
pub trait EngineSwitch {
    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError>;
}

/// Expert weights in this process's heap: the synthetic engine's, on the host transport.
pub struct HeapSlots {
    expert_bytes: usize,
    slots_per_rank: usize,
    /// `live[layer]`: `slots_per_rank * expert_bytes` bytes.
    live: Vec<Vec<u8>>,
    staging: Vec<u8>,
}

impl HeapSlots {
    /// Zeroed memory for `num_layers` layers of `slots_per_rank` slots of `expert_bytes` bytes.
    pub fn new(num_layers: usize, slots_per_rank: usize, expert_bytes: usize) -> HeapSlots {
        HeapSlots {
            expert_bytes,
            slots_per_rank,
            live: vec![vec![0u8; slots_per_rank * expert_bytes]; num_layers],
            staging: vec![0u8; slots_per_rank * expert_bytes],
        }
    }

    /// The live slots of `layer`, writable: for filling the initial weights (and fault injection).
    pub fn live_mut(&mut self, layer: usize) -> Result<&mut [u8], ExecError> {
        let layers = self.live.len();
        self.live.get_mut(layer).map(Vec::as_mut_slice).ok_or_else(|| out_of_range(layer, layers))
    }
}

pub(crate) fn out_of_range(layer: usize, layers: usize) -> ExecError {
    ExecError::Other(format!("layer {layer} is out of range: the store holds {layers} layers"))
}

impl SlotMemory for HeapSlots {
    fn num_layers(&self) -> usize {
        self.live.len()
    }

    fn slots_per_rank(&self) -> usize {
        self.slots_per_rank
    }

    fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    fn live(&self, layer: usize) -> Result<&[u8], ExecError> {
        self.live.get(layer).map(Vec::as_slice).ok_or_else(|| out_of_range(layer, self.live.len()))
    }

    fn live_and_staging(&mut self, layer: usize) -> Result<(&[u8], &mut [u8]), ExecError> {
        let layers = self.live.len();
        let live = self.live.get(layer).ok_or_else(|| out_of_range(layer, layers))?;
        Ok((live.as_slice(), self.staging.as_mut_slice()))
    }

    fn staging(&self) -> &[u8] {
        &self.staging
    }

    /// Copies the staged slots into the live ones: live from the next step.
    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError> {
        let eb = self.expert_bytes;
        let layers = self.live.len();
        let live = self.live.get_mut(m.layer).ok_or_else(|| out_of_range(m.layer, layers))?;
        for &k in &m.changed_slots {
            let r = k * eb..(k + 1) * eb;
            live[r.clone()].copy_from_slice(&self.staging[r]);
        }
        Ok(Commit::Next)
    }
}

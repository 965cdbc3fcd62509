//! The engine side of the contract, in Rust: what an engine rank does with its region. The
//! sidecar never uses it; the unit tests and the fake engine (`eplb-fake-engine`, an end-to-end
//! test helper) do. The reference engine side is the Python client in `python/`.

use std::sync::atomic::Ordering;

use super::region::{ack, engine_state, monotonic_ns, off, region_path, Command, Layout, Region, RegionError};

/// One engine rank's region, from the engine's side.
pub struct EngineRank {
    pub region: Region,
    /// Its own copy of `phy2log [num_layers * num_physical]`, what its router uses.
    phy2log: Vec<i32>,
}

/// What the boundary decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing was pending for this step (or it was answered missed).
    Nothing,
    /// Applied command `id` to `layer` (epoch `epoch`).
    Applied { id: u64, layer: usize, epoch: u64 },
    /// Answered cancelled: the ranks did not all have it.
    Cancelled { id: u64 },
    /// Answered rejected: the command broke the validity rule.
    Rejected { id: u64 },
}

impl EngineRank {
    /// Creates engine rank `layout.rank`'s region named `name`: header, table, placement
    /// `phy2log` (`[num_layers * num_physical]`), the live weights of its slots filled by
    /// `fill(layer, expert, bytes)` (host weights only: `bytes` is the expert's concatenated rows,
    /// scattered into them), the global tensors filled with [`global_fill`], then renames it into
    /// place.
    pub fn create(
        name: &str,
        layout: &Layout,
        phy2log: &[i32],
        fill: impl Fn(usize, usize, &mut [u8]),
    ) -> Result<EngineRank, RegionError> {
        let path = region_path(name, layout.rank);
        let mut region = Region::create(&path, layout, std::process::id() as u64)?;
        let p = layout.num_physical();
        for layer in 0..layout.num_layers {
            region.write_phy2log_row(layer, &phy2log[layer * p..(layer + 1) * p]);
        }
        let (spr, eb) = (layout.slots_per_rank, layout.expert_bytes);
        // GPU weights (weights_kind 1) are the engine's device memory, not the region's.
        let host_layers = if layout.ipc.is_none() { layout.num_layers } else { 0 };
        let mut expert = vec![0u8; eb];
        for layer in 0..host_layers {
            for k in 0..spr {
                let e = phy2log[layer * p + layout.rank * spr + k] as usize;
                fill(layer, e, &mut expert);
                // SAFETY: nobody else has the region before it is published.
                unsafe { write_expert(&region, layer, k, &expert) };
            }
            for t in layout.global_tensors() {
                let entry = layout.entry(layer, t);
                for r in 0..entry.rows as usize {
                    // SAFETY: as above.
                    let row = unsafe { region.bytes_mut(entry.row_at(r) as usize, entry.row_bytes as usize) };
                    global_fill(layer, t, r, row);
                }
            }
        }
        region.set(off::ENGINE_HEARTBEAT_NS, monotonic_ns());
        region.set(off::ENGINE_STATE, engine_state::RUNNING);
        region.publish(&path)?;
        Ok(EngineRank { region, phy2log: phy2log.to_vec() })
    }

    pub fn phy2log(&self) -> &[i32] {
        &self.phy2log
    }

    pub fn beat(&self) {
        self.region.set(off::ENGINE_HEARTBEAT_NS, monotonic_ns());
    }

    /// Step 1 of the boundary before step `t`: the id of the command to apply at `t` (`have`,
    /// 0 for none), answering a command whose step has passed as missed. An invalid command for
    /// `t` gives `have = 0` and is returned so that [`EngineRank::decide`] answers it rejected.
    pub fn have(&self, t: u64) -> (u64, Option<Command>) {
        self.beat();
        let Some(cmd) = self.region.read_command() else { return (0, None) };
        if cmd.id == self.region.ack().0 {
            return (0, None);
        }
        if cmd.apply_step < t {
            self.region.answer(cmd.id, ack::MISSED, t);
            return (0, None);
        }
        if cmd.apply_step != t {
            return (0, None);
        }
        (if self.valid(&cmd) { cmd.id } else { 0 }, Some(cmd))
    }

    /// The contract's validity rule: a layer, the next epoch, a row that holds every expert and
    /// nothing else, and a copy for every local slot whose expert changes; and no `table_fault`
    /// (the engine rejects every command while one of its tensors is re-allocated).
    fn valid(&self, cmd: &Command) -> bool {
        let l = &self.region.layout;
        if self.region.table_fault() != 0 {
            return false;
        }
        let (p, spr) = (l.num_physical(), l.slots_per_rank);
        if cmd.layer >= l.num_layers || cmd.epoch != self.region.epoch(cmd.layer).load(Ordering::Acquire) + 1 {
            return false;
        }
        let mut seen = vec![false; l.num_logical];
        for &e in &cmd.new_row {
            match usize::try_from(e).ok().and_then(|e| seen.get_mut(e)) {
                Some(s) => *s = true,
                None => return false,
            }
        }
        let old = &self.phy2log[cmd.layer * p + l.rank * spr..cmd.layer * p + (l.rank + 1) * spr];
        let new = &cmd.new_row[l.rank * spr..(l.rank + 1) * spr];
        seen.iter().all(|&s| s) && (0..spr).all(|k| old[k] == new[k] || cmd.copy_mask[k])
    }

    /// Step 3: with `min` and `max` of `have` over every engine rank, applies `cmd` in place
    /// (staging into the live slots of its layer, the row, the epoch) or answers cancelled.
    pub fn decide(&mut self, t: u64, cmd: Option<Command>, min: u64, max: u64) -> Decision {
        let Some(cmd) = cmd else { return Decision::Nothing };
        if !self.valid(&cmd) {
            self.region.answer(cmd.id, ack::REJECTED, t);
            return Decision::Rejected { id: cmd.id };
        }
        if !(min == max && max == cmd.id) {
            self.region.answer(cmd.id, ack::CANCELLED, t);
            return Decision::Cancelled { id: cmd.id };
        }
        let l = &self.region.layout;
        let (spr, p) = (l.slots_per_rank, l.num_physical());
        // Row s of every per-expert staging entry into row s of the same entry of the layer.
        for (k, _) in cmd.copy_mask.iter().enumerate().filter(|(_, &m)| m) {
            for t in l.expert_tensors() {
                let (from, n) = self.region.row(l.num_layers, t, k);
                let (to, _) = self.region.row(cmd.layer, t, k);
                let staged = self.region.bytes(from, n).to_vec();
                // SAFETY: the engine writes its live weights only here, between two forward passes.
                unsafe { self.region.bytes_mut(to, n) }.copy_from_slice(&staged);
            }
        }
        debug_assert!(cmd.copy_mask.len() == spr);
        self.region.publish_placement(cmd.layer, &cmd.new_row, cmd.epoch);
        self.phy2log[cmd.layer * p..(cmd.layer + 1) * p].copy_from_slice(&cmd.new_row);
        self.region.answer(cmd.id, ack::APPLIED, t);
        Decision::Applied { id: cmd.id, layer: cmd.layer, epoch: cmd.epoch }
    }

    /// Records step `t`'s counts (`[num_layers * count_cols]`) and its MoE time on
    /// this rank (`moe_ns`, 0: not measured), and publishes it.
    pub fn record(&self, t: u64, phase: u64, counts: &[u64], moe_ns: u64) {
        let tokens = counts.iter().take(self.region.layout.count_cols()).sum();
        self.region.write_step(t, phase, tokens, moe_ns, counts);
    }

    /// Every step done: a command still pending is answered cancelled, `engine_state = 2`, and
    /// the region's name is removed (a sidecar that has it mapped keeps reading it).
    pub fn finish(&self) {
        self.beat();
        if let Some(cmd) = self.region.read_command().filter(|c| c.id != self.region.ack().0) {
            self.region.answer(cmd.id, ack::CANCELLED, self.region.get(off::ENGINE_STEP));
        }
        self.region.set(off::ENGINE_STATE, engine_state::FINISHED);
        let _ = std::fs::remove_file(&self.region.path);
    }

    /// The live expert of `layer`, local slot `slot`: its rows, concatenated in table order.
    pub fn live(&self, layer: usize, slot: usize) -> Vec<u8> {
        expert_bytes(&self.region, layer, slot)
    }

    /// The bytes of every global tensor of every layer (rows only), concatenated.
    pub fn global_bytes(&self) -> Vec<u8> {
        global_bytes(&self.region)
    }

    /// Sets `table_fault` (tests: an engine that found table entry `entry` re-allocated).
    pub fn set_table_fault(&self, entry: usize) {
        self.region.set(off::TABLE_FAULT, entry as u64 + 1);
    }
}

/// What the writer puts into row `row` of global tensor `t` of `layer`: bytes nobody moves.
pub fn global_fill(layer: usize, t: usize, row: usize, buf: &mut [u8]) {
    crate::engine::fill_expert(buf, 5000 + layer * 64 + t, row);
}

/// Expert `slot` of `layer` (`num_layers`: staging) of a host region: its per-expert rows,
/// concatenated in table order.
pub fn expert_bytes(region: &Region, layer: usize, slot: usize) -> Vec<u8> {
    let l = &region.layout;
    let mut out = Vec::with_capacity(l.expert_bytes);
    for t in l.expert_tensors() {
        let (at, n) = region.row(layer, t, slot);
        out.extend_from_slice(region.bytes(at, n));
    }
    out
}

/// The rows of every global tensor of every layer of a host region, concatenated.
pub fn global_bytes(region: &Region) -> Vec<u8> {
    let l = &region.layout;
    let mut out = Vec::new();
    for layer in 0..l.num_layers {
        for t in l.global_tensors() {
            let e = l.entry(layer, t);
            for r in 0..e.rows as usize {
                out.extend_from_slice(region.bytes(e.row_at(r) as usize, e.row_bytes as usize));
            }
        }
    }
    out
}

/// Scatters `bytes` (an expert: rows in table order) into the rows of slot `slot` of `layer`.
///
/// # Safety
/// Nobody else may read or write those rows meanwhile (the engine side, before publishing or at
/// a step boundary; a test standing in for the sidecar on staging rows it owns).
pub unsafe fn write_expert(region: &Region, layer: usize, slot: usize, bytes: &[u8]) {
    let l = &region.layout;
    let mut at = 0;
    for t in l.expert_tensors() {
        let (to, n) = region.row(layer, t, slot);
        region.bytes_mut(to, n).copy_from_slice(&bytes[at..at + n]);
        at += n;
    }
}

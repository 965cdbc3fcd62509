//! The shm engine's expert storage: the live slots are the engine's weights in its region
//! (read-only for the sidecar), the staging area is the region's, and a commit is the contract's
//! switch protocol: agree on an apply step through MPI, post the command, wait (bounded) for the
//! engine's answer, agree on the outcome.

use std::sync::Arc;
use std::time::Duration;

use super::region::{ack, engine_state, off, pid_alive, Command, Layout, Region};
use crate::collective::{Comm, ReduceOp};
use crate::executor::memory::{ExpertRows, RowSpan};
use crate::executor::{Commit, EngineSwitch, ExecError, RankMigration, SlotMemory};

/// Tries of one layer's apply before it is dropped (the contract: at most 5).
pub(crate) const MAX_TRIES: usize = 5;
/// The first apply step's lead over the furthest engine rank, in steps (doubled per retry).
pub(crate) const FIRST_LEAD: u64 = 2;
/// The outcome a rank reports when its engine finished without answering (never in the region).
const FINISHED_UNANSWERED: u64 = 5;

/// Steps an engine may record past the boundary where it must have answered a command before
/// the sidecar calls it unanswered (the answer is written at the boundary; the slack covers an
/// engine whose answer and step counter become visible in either order).
pub(crate) const ANSWER_SLACK_STEPS: u64 = 2;

/// Whether a command for `apply_step`, posted when the engine's step counter was at most
/// `posted_by` (read after the post), is overdue at counter `engine_step`. The engine answers at
/// the boundary before `apply_step`, or, when it first sees the command later, at that boundary
/// (missed): the boundary after the post is at most `posted_by + 1`. Once the engine recorded
/// the later of the two (plus [`ANSWER_SLACK_STEPS`]), an answer must be there.
pub(crate) fn overdue(apply_step: u64, posted_by: u64, engine_step: u64) -> bool {
    engine_step > apply_step.max(posted_by.saturating_add(1)).saturating_add(ANSWER_SLACK_STEPS)
}

/// Whether the engine beside this rank is alive: its state, its pid, its heartbeat.
#[derive(Debug, Clone)]
pub struct Watch {
    /// This engine rank.
    pub rank: usize,
    pub pid: u64,
    /// False when the engine's pid was not visible at attach (another pid namespace).
    pub pid_check: bool,
    pub timeout: Duration,
    /// The engine's heartbeat as last read, and when it last changed: liveness is a heartbeat
    /// that moves, whatever its value (a corrupt or foreign clock value, even one in the future,
    /// cannot pass for a live engine).
    last_beat: std::cell::Cell<Beat>,
}

/// A heartbeat value and when (`CLOCK_MONOTONIC` of this process) it was first seen.
#[derive(Debug, Clone, Copy)]
struct Beat {
    value: u64,
    changed_at_ns: u64,
}

/// What [`Watch::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Finished,
}

impl Watch {
    pub fn new(region: &Region, rank: usize, timeout: Duration) -> Watch {
        let pid = region.read_u64(off::ENGINE_PID);
        let pid_check = pid_alive(pid);
        if !pid_check {
            log::warn!(
                "engine rank {rank}: its pid {pid} is not visible here (another pid namespace?): only its heartbeat is watched"
            );
        }
        let beat = Beat { value: region.get(off::ENGINE_HEARTBEAT_NS), changed_at_ns: super::region::monotonic_ns() };
        Watch { rank, pid, pid_check, timeout, last_beat: std::cell::Cell::new(beat) }
    }

    /// Alive or finished, or why the engine rank is dead, stopped or failed. Also beats the
    /// sidecar's own heartbeat.
    pub fn check(&self, region: &Region) -> Result<Liveness, String> {
        region.check_size()?;
        if let Some(sig) = crate::signals::received() {
            return Err(format!("engine rank {}: {}", self.rank, crate::signals::interrupted(sig)));
        }
        let now = super::region::monotonic_ns();
        region.set(off::SIDECAR_HEARTBEAT_NS, now);
        let (rank, pid) = (self.rank, self.pid);
        match region.get(off::ENGINE_STATE) {
            engine_state::FINISHED => return Ok(Liveness::Finished),
            engine_state::FAILED => {
                return Err(format!("engine rank {rank} (pid {pid}) reported a failure (engine_state 3)"))
            }
            _ => {}
        }
        if self.pid_check && !pid_alive(pid) {
            return Err(format!("engine rank {rank} (pid {pid}) is gone: the engine process died"));
        }
        let value = region.get(off::ENGINE_HEARTBEAT_NS);
        let last = self.last_beat.get();
        let changed_at_ns = if value == last.value { last.changed_at_ns } else { now };
        self.last_beat.set(Beat { value, changed_at_ns });
        let silent = Duration::from_nanos(now.saturating_sub(changed_at_ns));
        if silent > self.timeout {
            return Err(format!(
                "engine rank {rank} (pid {pid}) has not beaten its heartbeat for {:.1} s (--engine-timeout {:.1} s): it is stopped or hung",
                silent.as_secs_f64(),
                self.timeout.as_secs_f64()
            ));
        }
        Ok(Liveness::Alive)
    }
}

/// Sleeps a little longer each time, up to 1 ms: polling an engine that steps in milliseconds.
pub(crate) struct Backoff(u64);

impl Backoff {
    pub fn new() -> Backoff {
        Backoff(10)
    }

    pub fn wait(&mut self) {
        std::thread::sleep(Duration::from_micros(self.0));
        self.0 = (self.0 * 2).min(1000);
    }
}

/// The switch protocol (docs/engine-contract.md): how staged slots become live in an engine's
/// memory, host or GPU alike.
pub struct ShmSwitch {
    region: Arc<Region>,
    /// A communicator of its own, for the apply step and the outcome.
    comm: Comm,
    watch: Watch,
    /// The next command id, the same on every rank (agreed at attach, one per try).
    next_id: u64,
}

/// The engine's weights and staging area in the region (host weights): rows of the per-expert
/// tensors of its table, and the switch protocol.
pub(crate) struct ShmSlots {
    region: Arc<Region>,
    rows: ExpertRows,
    switch: ShmSwitch,
}

/// Where the per-expert tensors' rows are in `layout` (offsets from the start of the region for
/// host weights, offsets inside their allocation for IPC weights), live layers and staging.
pub(crate) fn expert_rows(layout: &Layout) -> ExpertRows {
    let tensors = layout.expert_tensors();
    let spans = (0..=layout.num_layers)
        .map(|l| {
            tensors
                .iter()
                .map(|&t| {
                    let e = layout.entry(l, t);
                    RowSpan { at: e.offset, row_stride: e.row_stride }
                })
                .collect()
        })
        .collect();
    ExpertRows {
        slots_per_rank: layout.slots_per_rank,
        row_bytes: tensors.iter().map(|&t| layout.entry(0, t).row_bytes as usize).collect(),
        spans,
    }
}

impl ShmSlots {
    pub fn new(region: Arc<Region>, switch: ShmSwitch) -> ShmSlots {
        ShmSlots { rows: expert_rows(&region.layout), switch, region }
    }
}

impl ShmSwitch {
    pub fn new(region: Arc<Region>, comm: Comm, watch: Watch, next_id: u64) -> ShmSwitch {
        ShmSwitch { region, comm, watch, next_id }
    }

    /// Waits for command `id`'s answer: `(ack_result, ack_step)`, or [`FINISHED_UNANSWERED`]
    /// when the engine finished without answering. An engine that dies or stops is an error, and
    /// so is one that steps on past the command's boundary without answering ([`overdue`]):
    /// meanwhile no load is read, so waiting on would lose its steps and report nothing.
    fn wait_answer(&self, id: u64, apply_step: u64, posted_by: u64) -> Result<(u64, u64), ExecError> {
        let mut backoff = Backoff::new();
        loop {
            let (got, result, step) = self.region.ack();
            if got == id {
                return Ok((result, step));
            }
            let now = self.region.get(off::ENGINE_STEP);
            if overdue(apply_step, posted_by, now) {
                return Err(ExecError::Engine(format!(
                    "engine rank {} (pid {}) reached step {now} without answering command {id} (apply at step {apply_step}): it does not follow the contract's mailbox (answer every command by the boundary of its step); restart the engine",
                    self.watch.rank, self.watch.pid
                )));
            }
            match self.watch.check(&self.region).map_err(ExecError::Engine)? {
                Liveness::Finished => {
                    // It may have answered just before it finished.
                    let (got, result, step) = self.region.ack();
                    return Ok(if got == id { (result, step) } else { (FINISHED_UNANSWERED, 0) });
                }
                Liveness::Alive => backoff.wait(),
            }
        }
    }

    /// The contract's `table_fault`, agreed over the ranks (collective): when any engine rank
    /// found one of its tensors re-allocated, every rank fails (exit 1) and nothing is posted;
    /// the rank that saw it names the layer and the tensor.
    pub(crate) fn check_table_fault(&self) -> Result<(), ExecError> {
        let fault = self.region.table_fault();
        let any = self.comm.allreduce_u64(&[u64::from(fault != 0)], ReduceOp::Max)?[0];
        if any == 0 {
            return Ok(());
        }
        Err(ExecError::Other(if fault != 0 {
            table_fault_message(&self.region, self.watch.rank, fault)
        } else {
            "another engine rank re-allocated one of its tensors (table_fault; that rank names it): nothing was posted"
                .into()
        }))
    }

    /// The ranks whose outcome was `result`, for a message.
    fn ranks_with(&self, result: u64) -> Result<Vec<usize>, ExecError> {
        Ok(self
            .comm
            .allgather_u64(&[result])?
            .iter()
            .enumerate()
            .filter(|(_, r)| r[0] == result)
            .map(|(i, _)| i)
            .collect())
    }
}

impl SlotMemory for ShmSlots {
    fn rows(&self) -> &ExpertRows {
        &self.rows
    }

    fn live_row(&self, layer: usize, t: usize, slot: usize) -> Result<&[u8], ExecError> {
        if layer >= self.rows.num_layers() {
            return Err(crate::executor::memory::out_of_range(layer, self.rows.num_layers()));
        }
        let (at, n) = self.rows.row(layer, t, slot);
        Ok(self.region.bytes(at as usize, n))
    }

    fn staging_row(&self, t: usize, slot: usize) -> &[u8] {
        let (at, n) = self.rows.staging_row(t, slot);
        self.region.bytes(at as usize, n)
    }

    fn staging_row_mut(&mut self, t: usize, slot: usize) -> &mut [u8] {
        let (at, n) = self.rows.staging_row(t, slot);
        // SAFETY: the staging rows are the sidecar's between the engine's answer to the previous
        // command (every commit waits for it; attach waits for a pending one) and the next post;
        // the table check proved that no staging row overlaps any other entry, and `&mut self`
        // makes this the only slice of it in this process.
        unsafe { self.region.bytes_mut(at as usize, n) }
    }

    /// The switch protocol, through [`ShmSwitch`].
    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError> {
        self.switch.commit(m)
    }

    /// XXH3 of every row of every global tensor of every layer, in table order.
    fn globals_hash(&self) -> Option<u64> {
        let l = &self.region.layout;
        let globals = l.global_tensors();
        if globals.is_empty() {
            return None;
        }
        let rows = (0..l.num_layers).flat_map(|layer| globals.iter().map(move |&t| l.entry(layer, t))).flat_map(|e| {
            (0..e.rows as usize).map(move |r| self.region.bytes(e.row_at(r) as usize, e.row_bytes as usize))
        });
        Some(crate::executor::verify::checksum_parts(rows))
    }
}

impl EngineSwitch for ShmSwitch {
    /// The switch protocol (docs/engine-contract.md), on every rank for the same layer.
    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError> {
        let spr = self.region.layout.slots_per_rank;
        let new_row: Vec<i32> = m.new_row.iter().map(|&e| e as i32).collect();
        let copy_mask: Vec<bool> = (0..spr).map(|k| m.changed_slots.binary_search(&k).is_ok()).collect();
        let epoch = self.region.epoch(m.layer).load(std::sync::atomic::Ordering::Acquire) + 1;
        let mut lead = FIRST_LEAD;
        for _ in 0..MAX_TRIES {
            // After staging, before posting: a re-allocated tensor anywhere stops every rank.
            self.check_table_fault()?;
            // Agree on the step: ahead of every engine rank's next step.
            let here = self.region.get(off::ENGINE_STEP);
            let apply_step = self.comm.allreduce_u64(&[here], ReduceOp::Max)?[0] + lead;
            let id = self.next_id;
            self.next_id += 1;
            let cmd = Command {
                id,
                layer: m.layer,
                apply_step,
                epoch,
                new_row: new_row.clone(),
                copy_mask: copy_mask.clone(),
            };
            self.region.post(&cmd);
            let posted_by = self.region.get(off::ENGINE_STEP);
            let (result, step) = self.wait_answer(id, apply_step, posted_by)?;
            let finished = u64::from(self.region.get(off::ENGINE_STATE) == engine_state::FINISHED);
            // Agree on the outcome: min and max of the result and of the step, and whether any
            // engine rank has finished, in one all-reduce.
            let r = self.comm.allreduce_u64(&[result, !result, step, !step, finished], ReduceOp::Max)?;
            let (max, min, step_max, step_min) = (r[0], !r[1], r[2], !r[3]);
            if min == ack::APPLIED && max == ack::APPLIED {
                if step_min != step_max {
                    return Err(ExecError::Other(format!(
                        "layer {}: the engine ranks applied at different steps ({step_min} to {step_max}): the engine breaks the contract",
                        m.layer
                    )));
                }
                return Ok(Commit::AtStep(step_max));
            }
            if max == ack::APPLIED || min == ack::APPLIED {
                let applied = self.ranks_with(ack::APPLIED)?;
                return Err(ExecError::Other(format!(
                    "layer {}: engine ranks {applied:?} applied command {id} and the others did not: the engine breaks the contract's agreement rule",
                    m.layer
                )));
            }
            if max == FINISHED_UNANSWERED || r[4] == 1 {
                return Ok(Commit::Cancelled(format!("the engine finished before step {apply_step}")));
            }
            if max == ack::REJECTED {
                let rejected = self.ranks_with(ack::REJECTED)?;
                return Ok(Commit::Cancelled(format!("engine rank(s) {rejected:?} rejected command {id}")));
            }
            // Cancelled or missed everywhere: nothing changed; try again further ahead.
            log::info!(
                "layer {}: apply at step {apply_step} cancelled or missed; retrying with a lead of {}",
                m.layer,
                lead * 2
            );
            lead *= 2;
        }
        Ok(Commit::Cancelled(format!("{MAX_TRIES} tries were cancelled or missed")))
    }
}

/// What a non-zero `table_fault` says: the layer and tensor of the re-allocated entry.
pub(crate) fn table_fault_message(region: &Region, rank: usize, fault: u64) -> String {
    let l = &region.layout;
    let entries = (l.num_layers + 1) * l.num_tensors;
    let what = match usize::try_from(fault - 1).ok().filter(|&i| i < entries) {
        Some(i) => l.entry_name(i),
        None => format!("entry {} (not in the table)", fault - 1),
    };
    format!(
        "engine rank {rank}: table_fault {fault}: the engine re-allocated {what} after it published the region (its address changed); the sidecar's view of the weights is stale: nothing was posted. Keep expert tensors in place (no re-allocation) while eplb is attached"
    )
}

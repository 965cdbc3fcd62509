//! The shared-memory engine (`run --engine shm:NAME`): a real inference engine beside the
//! balancer, through the regions of docs/engine-contract.md. Sidecar rank r attaches to engine
//! rank r's region.
//!
//! * [`region`]: the byte layout, the header check, the ring's sequence lock, the mailbox;
//! * [`apply`]: the expert storage (the engine's weights, read-only here, and the region's
//!   staging area) and the switch protocol as the storage's commit;
//! * [`writer`]: the engine side in Rust, for tests and the fake engine (`eplb-fake-engine`).
//!
//! [`ShmEngine`] gives the loop one engine step at a time, in order: the counts of its slots,
//! whether the step is of the phase being balanced (`--balance-phase`), or that its entry was
//! lost; it ends the run when the engine has finished and every recorded step was read, and
//! fails (naming the rank) when the engine dies, stops or fails.

pub mod apply;
pub mod region;
pub mod writer;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use ndarray::Array2;

use self::apply::{Backoff, Liveness, ShmSwitch, Watch};
use self::region::{off, phase, region_path, sidecar_state, Layout, Region, RingRead};
use super::{Engine, EngineError, StepCounts};
use crate::collective::{Comm, MpiError, ReduceOp};
use crate::executor::factory::{self, StoreError, StoreFaults, StoreSpec, Transport, Weights};
use crate::executor::ExpertStore;
use crate::policy::Placement;

/// Which engine steps the balancer plans on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BalancePhase {
    /// Every step.
    All,
    /// Prefill steps (and mixed ones).
    Prefill,
    /// Decode steps (and mixed ones).
    Decode,
}

impl BalancePhase {
    /// Whether a step of ring phase `p` counts.
    pub fn counts(self, p: u64) -> bool {
        match self {
            BalancePhase::All => true,
            BalancePhase::Prefill => p == phase::PREFILL || p == phase::MIXED,
            BalancePhase::Decode => p == phase::DECODE || p == phase::MIXED,
        }
    }
}

/// How to attach.
#[derive(Debug, Clone)]
pub struct ShmOptions {
    pub name: String,
    /// How long to wait for the region to appear.
    pub wait: Duration,
    /// An engine silent for longer is stopped or hung.
    pub timeout: Duration,
    pub phase: BalancePhase,
}

/// A region attached by this rank, before the collective part of the set-up.
pub struct Attached {
    region: Arc<Region>,
    watch: Watch,
    opts: ShmOptions,
    /// `phy2log` as the region holds it, checked.
    initial: Placement,
}

impl Attached {
    pub fn layout(&self) -> &Layout {
        &self.region.layout
    }
}

fn bad(path: &std::path::Path, what: impl std::fmt::Display) -> EngineError {
    EngineError::BadInput(format!("{}: {what}", path.display()))
}

/// The local part of the set-up on sidecar rank `rank` of `world_size`: waits (bounded) for
/// engine rank `rank`'s region, maps it, checks it against the MPI job, waits until no command
/// of an earlier sidecar is pending, and reads the live placement.
pub fn attach(opts: &ShmOptions, rank: usize, world_size: usize) -> Result<Attached, EngineError> {
    let path = region_path(&opts.name, rank);
    let region = wait_for_region(&path, opts)?;
    let l = &region.layout;
    if l.rank != rank {
        return Err(bad(&path, format!("holds engine rank {}, but this is sidecar rank {rank}", l.rank)));
    }
    if l.world_size != world_size {
        return Err(bad(
            &path,
            format!(
                "the engine has {} ranks, but this sidecar job has {world_size}: start one sidecar rank per engine rank",
                l.world_size
            ),
        ));
    }
    // The same limits as every other source of a shape, before anything is sized by it.
    crate::limits::check_shape(
        l.num_physical(),
        l.world_size,
        ("the region's slots (world_size x slots_per_rank)", "the region's world_size"),
    )
    .map_err(|e| bad(&path, e))?;
    let watch = Watch::new(&region, rank, opts.timeout);
    claim(&region)?;
    region.set(off::SIDECAR_STATE, sidecar_state::ATTACHED);
    // A command of an earlier sidecar may be pending: the staging area is not ours before it
    // is answered, and the placement may still change.
    if let Err(e) = wait_pending(&region, &watch, opts) {
        region.set(off::SIDECAR_STATE, sidecar_state::FAILED);
        return Err(e);
    }
    let initial = read_placement(&region)?;
    Ok(Attached { region: Arc::new(region), watch, opts: opts.clone(), initial })
}

/// Waits (within `--engine-wait`) for the region at `path` and maps it. A region left by an
/// engine that is gone (its pid dead, and it finished, failed or stopped beating) is not
/// attached: the sidecar waits for the new engine's region (published by rename, so a new file)
/// and, if none comes, says how to clean up (exit 2).
fn wait_for_region(path: &std::path::Path, opts: &ShmOptions) -> Result<Region, EngineError> {
    use std::os::unix::fs::MetadataExt;
    let start = Instant::now();
    let mut backoff = Backoff::new();
    // The stale file seen last (its inode) and why it is stale.
    let mut stale: Option<(u64, String)> = None;
    loop {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if stale.as_ref().is_none_or(|(ino, _)| *ino != meta.ino()) {
                let region = Region::open(path).map_err(|e| EngineError::BadInput(e.to_string()))?;
                match left_behind(&region, opts.timeout) {
                    None => return Ok(region),
                    Some(why) => {
                        log::warn!("{}: {why}; waiting for the new engine's region (--engine-wait)", path.display());
                        stale = Some((meta.ino(), why));
                    }
                }
            }
        }
        if start.elapsed() > opts.wait {
            let what = match &stale {
                Some((_, why)) => format!(
                    "{why}, and no new region came within {:.0} s (--engine-wait): remove it (`rm {}`, or `python -m eplb_client cleanup {}`) and start the engine",
                    opts.wait.as_secs_f64(),
                    path.display(),
                    opts.name
                ),
                None => format!(
                    "no engine region after {:.0} s (--engine-wait): start the engine with the same NAME first, on this host, one engine rank per sidecar rank",
                    opts.wait.as_secs_f64()
                ),
            };
            return Err(bad(path, what));
        }
        backoff.wait();
    }
}

/// Why a region is left behind by an engine that is gone, if it is: its pid is not alive and it
/// finished or failed, or its heartbeat is older than `timeout`. (A live engine in another pid
/// namespace beats its heartbeat on the same host clock, so it is never taken for gone.)
fn left_behind(region: &Region, timeout: Duration) -> Option<String> {
    let pid = region.read_u64(off::ENGINE_PID);
    if region::pid_alive(pid) {
        return None;
    }
    let state = region.get(off::ENGINE_STATE);
    let age = region::monotonic_ns().checked_sub(region.get(off::ENGINE_HEARTBEAT_NS)).map(Duration::from_nanos);
    let ended = state == region::engine_state::FINISHED || state == region::engine_state::FAILED;
    (ended || age.is_some_and(|a| a > timeout)).then(|| {
        format!(
            "left by engine pid {pid}, which is gone (engine_state {state}{})",
            age.map(|a| format!(", last heartbeat {:.0} s ago", a.as_secs_f64())).unwrap_or_default()
        )
    })
}

/// Takes the region for this sidecar: refused (exit 2, naming the pid) while another live
/// sidecar is attached to it. The pid is swapped in atomically, so that of two sidecars
/// attaching at once one wins and the other is told.
fn claim(region: &Region) -> Result<(), EngineError> {
    let me = std::process::id() as u64;
    let other = region.get(off::SIDECAR_PID);
    if other != me
        && other != 0
        && region::pid_alive(other)
        && region.get(off::SIDECAR_STATE) == sidecar_state::ATTACHED
    {
        return Err(bad(
            &region.path,
            format!("a live sidecar (pid {other}) is attached to it already: one sidecar job per engine; stop that one first"),
        ));
    }
    region.atomic(off::SIDECAR_PID).compare_exchange(other, me, Ordering::AcqRel, Ordering::Acquire).map_err(
        |now| {
            bad(
                &region.path,
                format!("another sidecar (pid {now}) attached to it at the same time: one sidecar job per engine"),
            )
        },
    )?;
    Ok(())
}

/// The steps a pending command of an earlier sidecar may lie ahead of the engine: this sidecar
/// posts at most `FIRST_LEAD << MAX_TRIES` steps ahead of the furthest engine rank; anything
/// far beyond is a corrupt or foreign mailbox that would keep attach waiting for the engine's
/// whole life.
pub(crate) const MAX_PENDING_AHEAD: u64 = 4096;

/// Waits until no command of an earlier sidecar is pending, bounded: the engine must answer it
/// by the boundary of its step ([`apply::overdue`]), it may not lie absurdly far ahead
/// ([`MAX_PENDING_AHEAD`]), and an engine that does not step answers within `--engine-wait`.
fn wait_pending(region: &Region, watch: &Watch, opts: &ShmOptions) -> Result<(), EngineError> {
    let start = Instant::now();
    let posted_by = region.get(off::ENGINE_STEP);
    let mut backoff = Backoff::new();
    loop {
        let id = region.read_u64(off::CMD_ID);
        if region.ack().0 == id {
            return Ok(());
        }
        let (apply_step, now) = (region.read_u64(off::CMD_APPLY_STEP), region.get(off::ENGINE_STEP));
        let rank = watch.rank;
        let odd = if region.get(off::CMD_SEQ) % 2 == 1 {
            " (cmd_seq is odd: that sidecar died while posting it)"
        } else {
            ""
        };
        if apply_step > now.saturating_add(MAX_PENDING_AHEAD) {
            return Err(EngineError::Failed(format!(
                "{}: engine rank {rank}: a command (id {id}) of an earlier sidecar is pending for step {apply_step}, far beyond the engine's step {now}: it would keep attach waiting; the mailbox is corrupt, restart the engine",
                region.path.display()
            )));
        }
        if apply::overdue(apply_step, posted_by, now) {
            return Err(EngineError::Failed(format!(
                "{}: engine rank {rank}: the engine reached step {now} without answering the pending command (id {id}, apply at step {apply_step}) of an earlier sidecar{odd}: it does not follow the contract's mailbox; restart the engine",
                region.path.display()
            )));
        }
        if start.elapsed() > opts.wait {
            return Err(EngineError::Failed(format!(
                "{}: engine rank {rank}: the command (id {id}, apply at step {apply_step}) of an earlier sidecar is still unanswered after {:.0} s (--engine-wait), the engine at step {now}{odd}",
                region.path.display(),
                opts.wait.as_secs_f64()
            )));
        }
        match watch.check(region).map_err(EngineError::Failed)? {
            Liveness::Finished => return Ok(()),
            Liveness::Alive => backoff.wait(),
        }
    }
}

/// The region's `phy2log`, checked: every value an expert, every expert somewhere.
fn read_placement(region: &Region) -> Result<Placement, EngineError> {
    let l = &region.layout;
    let raw = region.phy2log();
    if let Some((i, &v)) = raw.iter().enumerate().find(|(_, &v)| v < 0 || v as usize >= l.num_logical) {
        return Err(bad(
            &region.path,
            format!(
                "phy2log[{}][{}] = {v} is not an expert of 0..{}",
                i / l.num_physical(),
                i % l.num_physical(),
                l.num_logical
            ),
        ));
    }
    let phy2log =
        Array2::from_shape_vec((l.num_layers, l.num_physical()), raw.into_iter().map(|v| v as usize).collect())
            .map_err(|e| bad(&region.path, e))?;
    Placement::from_phy2log(phy2log, l.num_logical).map_err(|e| bad(&region.path, format!("phy2log: {e}")))
}

/// Errors of the collective part of the set-up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error(transparent)]
    Mpi(#[from] MpiError),
    #[error("the engine ranks hold different placements (hash min {min:016x}, max {max:016x}): the engine's ranks disagree; nothing was moved")]
    Placements { min: u64, max: u64 },
    /// Bad input the ranks agreed on (exit 2).
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often something went wrong, and when to say so: at its 1st, 2nd, 4th, 8th, ...
/// occurrence, so that a recurring problem shows in the log without flooding it.
#[derive(Debug, Default)]
struct Occurrences(u64);

impl Occurrences {
    /// Counts one more; the count so far when this one should be logged.
    fn count(&mut self) -> Option<u64> {
        self.0 += 1;
        self.0.is_power_of_two().then_some(self.0)
    }
}

/// The longest MoE time of one step an engine may report (an hour): a larger `moe_ns` is a
/// broken engine or a unit mistake, and counts as not measured rather than pricing every move
/// at nothing.
pub(crate) const MAX_MOE_NS: u64 = 3_600_000_000_000;

/// The engine attached on every rank.
pub(crate) struct ShmEngine {
    name: String,
    region: Arc<Region>,
    watch: Watch,
    initial: Placement,
    store: Box<dyn ExpertStore>,
    /// The hash of the engine's global tensors at attach (`None`: it has none).
    globals: Option<u64>,
    phase: BalancePhase,
    /// The next engine step to read.
    next: u64,
    layers: usize,
    /// Columns of a ring entry's counts: `slots_per_rank` or `num_physical` (`counts_kind`).
    count_cols: usize,
    /// Steps lost so far.
    lost: Occurrences,
    /// Steps whose reported MoE time was beyond [`MAX_MOE_NS`].
    absurd_moe: Occurrences,
    /// Last field: marks the region when the sidecar leaves, after the store (and with it any
    /// mapping of the engine's GPU memory) is gone, so the engine may free its weights then.
    detach: Detach,
}

/// Sets `sidecar_state` on drop: exited ok after a finished run, failed otherwise.
struct Detach {
    region: Arc<Region>,
    finished: bool,
}

impl Drop for Detach {
    fn drop(&mut self) {
        crate::signals::forget_region();
        if self.region.get(off::SIDECAR_STATE) == sidecar_state::ATTACHED {
            let state = if self.finished { sidecar_state::EXITED_OK } else { sidecar_state::FAILED };
            self.region.set(off::SIDECAR_STATE, state);
        }
    }
}

impl ShmEngine {
    /// The collective part of the set-up (every rank, after every rank attached): the ranks agree
    /// that they hold the same placement, on the first step they read (the furthest engine rank's
    /// next step), and on the first command id; `comm` and `transport` are communicators of the
    /// switch protocol and of the host transport; `faults`: the store's (tests, `--fault`).
    pub fn start(
        attached: Attached,
        world: &Comm,
        comm: Comm,
        transport: Comm,
        chunk_bytes: usize,
        tuning: crate::gpu::store::NcclTuning,
        faults: StoreFaults,
    ) -> Result<ShmEngine, StartError> {
        let Attached { region, watch, opts, initial } = attached;
        let agreement = world.agree_hash(initial.hash())?;
        let here = [region.get(off::ENGINE_STEP), region.read_u64(off::CMD_ID).max(region.ack().0)];
        let max = world.allreduce_u64(&here, ReduceOp::Max)?;
        if !agreement.agreed() {
            return Err(StartError::Placements { min: agreement.min, max: agreement.max });
        }
        // Every rank's counts must mean the same thing, or the all-reduce would add counts of
        // local slots to counts of physical slots.
        let kinds: Vec<u64> = world.allgather_u64(&[region.layout.counts_kind as u64])?.iter().map(|k| k[0]).collect();
        if kinds.iter().any(|&k| k != kinds[0]) {
            let by_rank: Vec<String> = kinds.iter().enumerate().map(|(r, k)| format!("rank {r}: {k}")).collect();
            return Err(StartError::BadInput(format!(
                "the engine ranks write different counts_kind ({}): every rank of a job must record its loads alike; nothing was moved",
                by_rank.join(", ")
            )));
        }
        // SAFETY: `Detach` (which holds the region) forgets the field before the mapping goes.
        unsafe { crate::signals::watch_region(region.atomic(off::SIDECAR_STATE), sidecar_state::FAILED) };
        let l = region.layout.clone();
        let switch = ShmSwitch::new(region.clone(), comm, watch.clone(), max[1] + 1);
        let spec = match &l.ipc {
            None => StoreSpec {
                weights: Weights::Region { region: region.clone(), switch },
                transport: Transport::Host { chunk_bytes },
                comm: transport,
                faults,
            },
            Some(_) => StoreSpec {
                weights: Weights::DeviceIpc { region: region.clone(), switch },
                transport: Transport::Nccl { tuning },
                comm: transport,
                faults,
            },
        };
        let mut store = factory::build(world, spec)?;
        let globals = store.globals_hash().map_err(StoreError::Exec)?;
        Ok(ShmEngine {
            name: opts.name,
            watch,
            initial,
            store,
            globals,
            phase: opts.phase,
            next: max[0],
            layers: l.num_layers,
            count_cols: l.count_cols(),
            lost: Occurrences::default(),
            absurd_moe: Occurrences::default(),
            detach: Detach { region: region.clone(), finished: false },
            region,
        })
    }

    /// The end of the run: the table must still be valid (a re-allocated tensor makes every
    /// view of the weights stale: exit 1 naming it).
    fn check_table_fault(&self) -> Result<(), EngineError> {
        match self.region.table_fault() {
            0 => Ok(()),
            fault => Err(EngineError::Failed(apply::table_fault_message(&self.region, self.watch.rank, fault))),
        }
    }
}

impl Engine for ShmEngine {
    fn name(&self) -> String {
        format!("shm:{}", self.name)
    }

    fn describe(&self) -> String {
        let l = &self.region.layout;
        let tensors: Vec<String> = (0..l.num_tensors)
            .map(|t| {
                let e = l.entry(0, t);
                let kind = if e.is_expert() { "" } else { " global" };
                format!("{} {} {} B/row{kind}", e.name, e.dtype, e.row_bytes)
            })
            .collect();
        format!(
            "{} (pid {}, ring {}, {} tensors a layer: {}; {} B an expert), balancing {} steps from step {}",
            self.region.path.display(),
            self.watch.pid,
            l.ring_len,
            l.num_tensors,
            tensors.join(", "),
            l.expert_bytes,
            format!("{:?}", self.phase).to_lowercase(),
            self.next
        )
    }

    fn initial_placement(&self) -> &Placement {
        &self.initial
    }

    fn planned_steps(&self) -> Option<usize> {
        None
    }

    fn next_step(&mut self, _live: &Placement) -> Result<Option<StepCounts>, EngineError> {
        let t = self.next;
        let mut backoff = Backoff::new();
        // Since when the entry of step `t` is half written, and whether the engine had finished.
        let mut busy: Option<(Instant, bool)> = None;
        loop {
            self.region.check_size().map_err(EngineError::Failed)?;
            match self.region.read_step(t) {
                RingRead::Step { phase, moe_ns, counts, .. } => {
                    self.next += 1;
                    let moe_ns = if moe_ns > MAX_MOE_NS {
                        if let Some(n) = self.absurd_moe.count() {
                            log::warn!(
                                "engine rank {}: step {t} reports a MoE time of {moe_ns} ns, beyond an hour ({n} so far): counted as not measured; moe_ns is in nanoseconds",
                                self.watch.rank
                            );
                        }
                        0
                    } else {
                        moe_ns
                    };
                    let slots = Array2::from_shape_vec((self.layers, self.count_cols), counts)
                        .map_err(|e| EngineError::Failed(format!("step {t}: {e}")))?;
                    return Ok(Some(StepCounts {
                        engine_step: t,
                        slots,
                        balanced: self.phase.counts(phase),
                        lost: false,
                        moe_ns,
                    }));
                }
                RingRead::Lost => {
                    self.region.check_step_counter().map_err(EngineError::Failed)?;
                    self.next += 1;
                    if let Some(n) = self.lost.count() {
                        log::warn!(
                            "engine rank {}: step {t} was overwritten before it was read ({n} so far): counted as zero; the sidecar falls behind the engine (a longer ring helps)",
                            self.watch.rank
                        );
                    }
                    let slots = Array2::zeros((self.layers, self.count_cols));
                    return Ok(Some(StepCounts { engine_step: t, slots, balanced: false, lost: true, moe_ns: 0 }));
                }
                RingRead::NotYet => match self.watch.check(&self.region).map_err(EngineError::Failed)? {
                    Liveness::Finished => {
                        // Every step it recorded before finishing is in the ring: read them all.
                        if !matches!(self.region.read_step(t), RingRead::NotYet) {
                            continue;
                        }
                        self.check_table_fault()?;
                        self.detach.finished = true;
                        return Ok(None);
                    }
                    Liveness::Alive => backoff.wait(),
                },
                RingRead::Busy => {
                    let finished = self.watch.check(&self.region).map_err(EngineError::Failed)? == Liveness::Finished;
                    let (rank, pid) = (self.watch.rank, self.watch.pid);
                    let (since, was_finished) = *busy.get_or_insert((Instant::now(), false));
                    if finished && was_finished {
                        // Finished, and the entry still odd on the read after: it stays torn.
                        return Err(EngineError::Failed(format!(
                            "engine rank {rank} (pid {pid}) finished with the ring entry of step {t} half written (its sequence word odd): the engine left it torn (a record that failed half way?)"
                        )));
                    }
                    busy = Some((since, finished));
                    if since.elapsed() > self.watch.timeout {
                        return Err(EngineError::Failed(format!(
                            "engine rank {rank} (pid {pid}): the ring entry of step {t} has stayed half written (its sequence word odd) for {:.1} s (--engine-timeout {:.1} s): the engine left it torn (a record that failed half way?); restart the engine",
                            since.elapsed().as_secs_f64(),
                            self.watch.timeout.as_secs_f64()
                        )));
                    }
                    backoff.wait();
                }
            }
        }
    }

    fn store(&mut self) -> &mut dyn ExpertStore {
        self.store.as_mut()
    }

    fn store_ref(&self) -> &dyn ExpertStore {
        self.store.as_ref()
    }

    fn globals_unchanged(&mut self) -> Result<Option<bool>, EngineError> {
        let now =
            self.store.globals_hash().map_err(|e| EngineError::Failed(format!("hashing the global tensors: {e}")))?;
        Ok(match (self.globals, now) {
            (Some(a), Some(b)) => Some(a == b),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests;

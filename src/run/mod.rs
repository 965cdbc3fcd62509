//! `eplb-worker run`: the SPMD balancing loop, one rank per GPU, no coordinator.
//!
//! Every step, every rank:
//! 1. takes its engine's per-slot token counts and sums them per logical expert;
//! 2. all-reduces them (sum), with the manager's time-interval flag piggybacked;
//! 3. pushes the global load into the sliding window; when a round is due, computes the policy on
//!    the window load (`previous` = the live placement), selects the layers to update, and agrees
//!    on the hash of that plan (min/max all-reduce); a disagreement stops every rank, nothing moved;
//! 4. migrates at most `--eplb-layers-per-step` queued layers: stage, verify, agree, commit.
//!
//! Decisions depend only on all-reduced data and flags, so every rank takes them at the same step.
//!
//! Seams for other engines and transports: [`make_store`] picks the [`ExpertStore`] from
//! `--transport` (host memory and MPI, or GPU memory and NCCL), and the loop drives it only
//! through [`crate::executor::migrate_layer`] and [`ExpertStore::verify_live`].

pub mod args;
mod report;

pub use args::{EngineKind, Fault, RunArgs, TransportKind};
pub use report::{LayerRow, Report, RoundRow};

use std::time::Instant;

use ndarray::Array2;
use thiserror::Error;

use crate::collective::host::HostTransport;
use crate::collective::{Comm, MpiError, MpiRuntime, ReduceOp};
use crate::engine::synthetic::DriftingZipf;
use crate::engine::{logical_from_slots, slot_loads, LoadSource};
use crate::executor::{migrate_layer, ExecError, ExpertStore, HostExpertStore, LayerMigration};
use crate::gpu::{self, device::Gpu, nccl::NcclComm, store::DeviceExpertStore, store::NcclTuning, GpuError};
use crate::load::{self, LoadError, TraceSelect};
use crate::manager::{Interval, Manager, Mode, RoundDecision};
use crate::plan::file::{self, PlacementFileError};
use crate::policy::{metrics, Placement, PlacementShape, PolicyConfig, PolicyError};
use crate::rank::{Topology, TopologyError};

/// The cost model's defaults in `run` (`--step-ms`, `--migration-gbps`): a decode step of a large
/// MoE model, and NVLink-class migration (BENCHMARKS.md measures 200-265 GB/s a GPU with NCCL).
pub const DEFAULT_STEP_MS: f64 = 20.0;
pub const DEFAULT_MIGRATION_GBPS: f64 = 200.0;

/// Default layers and experts of the built-in load.
pub const DEFAULT_LAYERS: usize = 8;
pub const DEFAULT_EXPERTS: usize = 64;

/// The hash a rank offers when its policy failed: never equal to a real plan's by design of the
/// all-reduce (if every rank failed alike they agree, and all stop with the policy's error).
const POLICY_FAILED_HASH: u64 = 0x6661_696c_6564_2121;

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Mpi(#[from] MpiError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    PlacementFile(#[from] PlacementFileError),
    #[error("{0}")]
    Config(String),
    #[error("{context}: {source}")]
    Policy { context: String, source: PolicyError },
    #[error("step {step}: the ranks computed different plans (hash min {min:016x}, max {max:016x}): their loads or code differ; nothing was moved")]
    PlanDisagreement { step: usize, min: u64, max: u64 },
    #[error("step {step}: {source}")]
    Exec { step: usize, source: ExecError },
    #[error("{wrong_bytes} live bytes failed verification over all ranks")]
    LiveVerification { wrong_bytes: u64 },
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("--report: {0}")]
    Report(PlacementFileError),
    /// Another rank failed during setup and printed why.
    #[error("rank(s) {ranks} failed during setup")]
    PeerSetup { ranks: String, code: i32 },
}

impl RunError {
    /// 2 for bad input, 1 for a runtime failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Topology(TopologyError::Mpi(_)) | RunError::Mpi(_) | RunError::Report(_) => 1,
            RunError::Topology(_) | RunError::Load(_) | RunError::Config(_) | RunError::Policy { .. } => 2,
            RunError::PlacementFile(PlacementFileError::Write { .. }) => 1,
            RunError::PlacementFile(_) => 2,
            RunError::PlanDisagreement { .. } | RunError::Exec { .. } | RunError::LiveVerification { .. } => 1,
            RunError::PeerSetup { code, .. } => *code,
            RunError::Gpu(e) => e.exit_code(),
        }
    }

    /// An error only this rank saw: the others may wait for it forever, so the job is aborted.
    fn is_local(&self) -> bool {
        matches!(self, RunError::Mpi(_) | RunError::Topology(TopologyError::Mpi(_)))
            || matches!(self, RunError::Exec { source: ExecError::Mpi(_), .. })
    }

    /// Whether rank `rank` prints the error: rank 0 prints the errors every rank shares, a rank
    /// whose own setup failed prints its own (see [`run_on`]).
    fn printed_by(&self, rank: usize) -> bool {
        rank == 0 || self.is_local()
    }
}

/// What a run did, for the caller.
#[derive(Debug)]
pub struct RunOutcome {
    pub rank: usize,
    pub report: Report,
}

/// The resolved sizes of a run.
#[derive(Debug, Clone)]
pub struct RunShape {
    pub num_layers: usize,
    pub num_logical: usize,
    pub shape: PlacementShape,
}

/// Checks the flags against the world and the load: `--ep-size`, the redundant slots, the groups.
pub fn resolve_shape(args: &RunArgs, topo: &Topology, source: &LoadSource) -> Result<RunShape, RunError> {
    let world = topo.world_size;
    if let Some(ep) = args.ep_size {
        if ep != world {
            return Err(RunError::Config(format!(
                "--ep-size {ep} must match the number of devices: this job has {world} ranks (start one rank per GPU)"
            )));
        }
    }
    let (layers, num_logical) = (source.num_layers(), source.num_logical());
    let num_replicas = match (args.num_redundant_experts, args.redundant_experts_num) {
        (Some(n), _) => num_logical + n,
        (None, Some(per_rank)) => num_logical + per_rank * world,
        (None, None) => (num_logical + world).div_ceil(world) * world,
    };
    if num_replicas % world != 0 {
        let next = num_replicas.div_ceil(world) * world;
        return Err(RunError::Config(format!(
            "{num_logical} experts + {} redundant = {num_replicas} slots do not divide over {world} ranks; use --num-redundant-experts {}",
            num_replicas - num_logical,
            next - num_logical
        )));
    }
    let shape =
        PlacementShape { num_replicas, num_gpus: world, num_nodes: topo.num_nodes, num_groups: args.num_groups };
    shape
        .validate(num_logical)
        .map_err(|source| RunError::Policy { context: "--num-groups/--num-redundant-experts".into(), source })?;
    Ok(RunShape { num_layers: layers, num_logical, shape })
}

/// The load the synthetic engine replays: `--trace` or the built-in generator.
pub fn load_source(args: &RunArgs) -> Result<LoadSource, RunError> {
    match &args.trace {
        Some(path) => {
            let trace = load::read_trace(path, &TraceSelect { dataset: args.trace_dataset.clone() })?;
            for (flag, given, have) in [
                ("--num-layers", args.num_layers, trace.num_layers()),
                ("--num-experts", args.num_experts, trace.num_logical()),
            ] {
                if given.is_some_and(|g| g != have) {
                    return Err(RunError::Config(format!(
                        "{flag} {} disagrees with {}: it has {have}",
                        given.unwrap_or(0),
                        path.display()
                    )));
                }
            }
            // Every step must fit the policy's arithmetic; check them once here.
            for s in 0..trace.num_steps() {
                trace.step(s)?;
            }
            Ok(LoadSource::Trace(trace))
        }
        None => {
            let (l, e) = (args.num_layers.unwrap_or(DEFAULT_LAYERS), args.num_experts.unwrap_or(DEFAULT_EXPERTS));
            if l == 0 || e == 0 {
                return Err(RunError::Config("--num-layers and --num-experts must be at least 1".into()));
            }
            Ok(LoadSource::Zipf(DriftingZipf {
                drift_steps: args.drift_steps as usize,
                ..DriftingZipf::new(l, e, args.seed)
            }))
        }
    }
}

/// The expert store `--transport` selects, before the collective part of its set-up.
pub enum StoreSetup {
    Ready(Box<dyn ExpertStore>),
    /// The GPU is open; the NCCL communicator and the device store come once every rank is here.
    Gpu {
        gpu: Gpu,
        comm: Comm,
        experts: Vec<Vec<usize>>,
    },
}

/// The transport every rank uses: `auto` becomes `nccl` only when every rank can use a GPU
/// (collective over `world` for `auto`).
pub fn resolve_transport(kind: TransportKind, topo: &Topology, world: &Comm) -> Result<TransportKind, RunError> {
    Ok(match kind {
        TransportKind::Auto => {
            let usable = u64::from(gpu::gpu_usable(topo.local_rank));
            if world.allreduce_u64(&[usable], ReduceOp::Min)?[0] == 1 {
                TransportKind::Nccl
            } else {
                TransportKind::Host
            }
        }
        other => other,
    })
}

/// The local part of the store's set-up, holding `experts[layer][slot]` (this rank's slots):
/// the host store, or this rank's GPU. `comm` is a communicator of the store's own.
pub fn make_store(
    args: &RunArgs,
    transport: TransportKind,
    comm: Comm,
    experts: &[Vec<usize>],
    topo: &Topology,
) -> Result<StoreSetup, RunError> {
    if transport == TransportKind::Nccl {
        let gpu = gpu::open_local_gpu(topo.local_rank)?;
        return Ok(StoreSetup::Gpu { gpu, comm, experts: experts.to_vec() });
    }
    let transport = HostTransport::new(comm, args.chunk_bytes);
    let store = HostExpertStore::new(transport, args.expert_bytes, experts)
        .map_err(|e| RunError::Config(format!("the host store: {e}")))?;
    Ok(StoreSetup::Ready(Box::new(store)))
}

/// The collective part of the store's set-up (every rank calls it): the NCCL communicator, then
/// the device store with every live slot filled.
fn finish_store(args: &RunArgs, setup: StoreSetup, rank: usize) -> Result<Box<dyn ExpertStore>, RunError> {
    let mut store = match setup {
        StoreSetup::Ready(store) => store,
        StoreSetup::Gpu { gpu, comm, experts } => {
            let nccl = NcclComm::bootstrap(&comm)?;
            let tuning = NcclTuning::from_mib(args.nccl_group_mib, args.nccl_chunk_mib, args.nccl_register);
            Box::new(DeviceExpertStore::new(gpu, nccl, &experts, args.expert_bytes, tuning)?)
        }
    };
    if args.fault.contains(&Fault::CorruptTransfer(rank)) {
        store.corrupt_next_stage();
    }
    Ok(store)
}

/// Runs `eplb-worker run` on this rank: starts MPI, runs the loop, stops MPI.
///
/// On an error the message is printed here, before MPI stops, and not by the caller: `mpirun`
/// kills the whole job as soon as one rank exits with a non-zero code, so rank 0 prints the
/// errors every rank shares and then meets the others in a barrier, which no rank leaves before
/// the message is out. An error only one rank saw (a failed MPI call) is printed by that rank,
/// which then aborts the job, since the others may be waiting for it.
pub fn run(args: &RunArgs) -> Result<RunOutcome, RunError> {
    let (_runtime, world) = match MpiRuntime::init().and_then(|rt| Ok((rt, Comm::world()?))) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("eplb-worker run: error: {e}");
            return Err(e.into());
        }
    };
    let rank = world.rank();
    let result = run_on(&world, args);
    if let Err(e) = &result {
        if e.is_local() && world.size() > 1 {
            eprintln!("eplb-worker run: rank {rank}: error: {e}");
            world.abort(e.exit_code())
        }
        if e.printed_by(rank) {
            eprintln!("eplb-worker run: error: {e}");
        }
        let _ = world.barrier();
    }
    result
}

/// Everything a rank holds during the run.
struct State {
    topo: Topology,
    run_shape: RunShape,
    source: LoadSource,
    initial: Placement,
    store: Box<dyn ExpertStore>,
}

/// A rank's state before the collective part of the store's set-up.
struct Prepared {
    run_shape: RunShape,
    source: LoadSource,
    initial: Placement,
    store: StoreSetup,
}

/// The run on `world` (MPI started).
pub fn run_on(world: &Comm, args: &RunArgs) -> Result<RunOutcome, RunError> {
    let rank = world.rank();
    // Collective calls first, so that a rank whose local setup fails does not leave the others
    // waiting in one of them.
    let topo = Topology::discover(world, args.ranks_per_node)?;
    let transport = resolve_transport(args.transport, &topo, world)?;
    let store_comm = world.dup()?;
    let prepared = agree_on_setup(world, setup(args, &topo, store_comm, transport))?;
    let store = agree_on_setup(world, finish_store(args, prepared.store, rank))?;
    let Prepared { run_shape, source, initial, .. } = prepared;
    let mut state = State { topo: topo.clone(), run_shape, source, initial, store };
    let devices = topo.devices_block(world, &state.store.device())?;
    Looper::new(world, args, &mut state).run(devices)
}

/// Every rank learns whether every rank's local set-up succeeded (one all-gather of exit codes),
/// so that no rank goes on into a collective call that a failed rank will never make.
fn agree_on_setup<T>(world: &Comm, local: Result<T, RunError>) -> Result<T, RunError> {
    let rank = world.rank();
    let code = match &local {
        Ok(_) => 0u64,
        Err(e) => e.exit_code().max(1) as u64,
    };
    let codes: Vec<u64> = world.allgather_u64(&[code])?.iter().map(|c| c[0]).collect();
    let failed: Vec<usize> = (0..codes.len()).filter(|&r| codes[r] != 0).collect();
    match local {
        Err(e) if failed.len() < codes.len() => {
            // Only some ranks failed (a file missing on one node): each says why.
            eprintln!("eplb-worker run: rank {rank}: error: {e}");
            Err(RunError::PeerSetup { ranks: format!("{failed:?}"), code: e.exit_code() })
        }
        Err(e) => Err(e),
        Ok(_) if !failed.is_empty() => {
            let code = codes.iter().copied().max().unwrap_or(1) as i32;
            Err(RunError::PeerSetup { ranks: format!("{failed:?}"), code })
        }
        Ok(s) => Ok(s),
    }
}

fn setup(args: &RunArgs, topo: &Topology, store_comm: Comm, transport: TransportKind) -> Result<Prepared, RunError> {
    if let Some(d) = args.expert_parallel_degree {
        log::info!("--expert_parallel_degree={d} is accepted for xLLM compatibility and ignored");
    }
    let source = load_source(args)?;
    let run_shape = resolve_shape(args, topo, &source)?;
    let (layers, num_logical, shape) = (run_shape.num_layers, run_shape.num_logical, run_shape.shape);
    let initial = match &args.init_placement {
        Some(path) => {
            let p = file::read_placement(path, num_logical)?;
            p.check_shape(layers, &shape).map_err(|source| RunError::Policy {
                context: format!("--init-placement {}", path.display()),
                source,
            })?;
            p
        }
        None => Placement::trivial(layers, num_logical, shape.num_replicas),
    };
    let spr = shape.slots_per_rank();
    let experts: Vec<Vec<usize>> = (0..layers).map(|l| local_slots(&initial, l, topo.world_rank, spr)).collect();
    let store = make_store(args, transport, store_comm, &experts, topo)?;
    Ok(Prepared { run_shape, source, initial, store })
}

/// The experts of rank `rank`'s slots in `layer` of `placement` (`[slots_per_rank]`).
fn local_slots(placement: &Placement, layer: usize, rank: usize, slots_per_rank: usize) -> Vec<usize> {
    placement.phy2log.row(layer).iter().skip(rank * slots_per_rank).take(slots_per_rank).copied().collect()
}

/// One row of a rebalance table; `seconds` is None for a layer that was not committed.
fn table_row(
    step: usize,
    layer: usize,
    experts: usize,
    bytes: u64,
    copies: usize,
    seconds: Option<f64>,
    wrong: u64,
) -> String {
    let (time, gbps) = match seconds {
        Some(t) if t > 0.0 => (format!("{:.1}", t * 1e6), format!("{:.3}", bytes as f64 / t / 1e9)),
        _ => ("-".to_string(), "-".to_string()),
    };
    format!("{step:>8} {layer:>6} {experts:>8} {bytes:>12} {copies:>7} {time:>11} {gbps:>12} {wrong:>7}")
}

/// The element-wise minimum over ranks of per-step times (µs): the rank that arrives last at a
/// collective does not wait in it, so the minimum is the cost of the step's own work, free of the
/// wait for slower ranks. Every rank holds as many samples (decisions are the same everywhere).
fn fastest_rank(world: &Comm, us: &[f64]) -> Result<Vec<f64>, MpiError> {
    let ns: Vec<u64> = us.iter().map(|&t| (t * 1e3) as u64).collect();
    Ok(world.allreduce_u64(&ns, ReduceOp::Min)?.into_iter().map(|t| t as f64 / 1e3).collect())
}

/// Prints on rank 0 only, flushing each line (progress shows as it happens under mpirun).
struct Out {
    on: bool,
}

impl Out {
    fn line(&self, s: impl AsRef<str>) {
        if self.on {
            use std::io::Write;
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o, "{}", s.as_ref());
            let _ = o.flush();
        }
    }
}

const TABLE_HEADER: &str = "#   step  layer  experts        bytes  copies    time(us)  algbw(GB/s)  #wrong";

/// The loop and its counters.
struct Looper<'a> {
    world: &'a Comm,
    args: &'a RunArgs,
    st: &'a mut State,
    out: Out,
    report: Report,
    live: Placement,
    manager: Manager,
    /// Per-step manager time (all-reduce + window + decision), µs, and the all-reduce alone.
    step_us: Vec<f64>,
    allreduce_us: Vec<f64>,
    round_us: Vec<f64>,
    live_wrong: u64,
    live_checked: u64,
    bal_static: f64,
    bal_live: f64,
}

impl<'a> Looper<'a> {
    fn new(world: &'a Comm, args: &'a RunArgs, st: &'a mut State) -> Self {
        let RunShape { num_layers, num_logical, shape } = st.run_shape.clone();
        let config = args.manager.config(num_layers, args.expert_bytes as u64, DEFAULT_STEP_MS, DEFAULT_MIGRATION_GBPS);
        let report = Report::new(&st.topo, &shape, num_layers, num_logical, args, &st.source, st.store.transport());
        Looper {
            world,
            args,
            out: Out { on: world.rank() == 0 },
            report,
            live: st.initial.clone(),
            manager: Manager::new(config, shape, num_layers, num_logical),
            st,
            step_us: Vec::new(),
            allreduce_us: Vec::new(),
            round_us: Vec::new(),
            live_wrong: 0,
            live_checked: 0,
            bal_static: 0.0,
            bal_live: 0.0,
        }
    }

    fn header(&self, devices: &str) {
        let (a, rs, topo) = (self.args, &self.st.run_shape, &self.st.topo);
        let shape = rs.shape;
        self.out.line(format!(
            "# eplb-worker run: {} ranks on {} node(s) of {}{}, engine synthetic: {}",
            topo.world_size,
            topo.num_nodes,
            topo.local_size,
            if topo.faked { " (faked with --ranks-per-node)" } else { "" },
            self.st.source.describe()
        ));
        self.out.line(format!(
            "#  {} layers x {} experts, {} slots ({} a rank), expert {} B, {} steps, initial placement {}",
            rs.num_layers,
            rs.num_logical,
            shape.num_replicas,
            shape.slots_per_rank(),
            a.expert_bytes,
            a.steps,
            a.init_placement.as_ref().map_or("trivial".into(), |p| p.display().to_string())
        ));
        self.out.line(format!("#  manager: {}", self.manager.config.describe()));
        let mode = if shape.is_hierarchical() && (shape.num_groups > 1 || shape.num_nodes > 1) {
            format!("hierarchical mode: {} groups over {} nodes", shape.num_groups, shape.num_nodes)
        } else {
            "global mode".to_string()
        };
        self.out.line(format!(
            "#  policy {} ({mode}), transport {}, chunk {} B",
            format!("{:?}", a.manager.policy).to_lowercase(),
            self.st.store.transport(),
            a.chunk_bytes
        ));
        self.out.line("#");
        self.out.line(devices.trim_end());
    }

    fn run(mut self, devices: String) -> Result<RunOutcome, RunError> {
        self.header(&devices);
        let result = self.steps();
        // Every rank reaches here together (collective errors only), so the totals can be reduced.
        let live = self.world.allreduce_u64(&[self.live_wrong, self.live_checked], ReduceOp::Sum)?;
        let r = &mut self.report;
        r.wrong_live_bytes = live[0];
        r.live_verified_bytes = live[1];
        let n = r.steps.max(1) as f64;
        r.balancedness_static = self.bal_static / n;
        r.balancedness_live = self.bal_live / n;
        r.final_placement_hash = format!("{:016x}", self.live.hash());
        let step_us = fastest_rank(self.world, &self.step_us)?;
        let allreduce_us = fastest_rank(self.world, &self.allreduce_us)?;
        let round_us = fastest_rank(self.world, &self.round_us)?;
        self.report.set_manager_times(&step_us, &allreduce_us, &round_us);
        let result = result.and_then(|()| {
            if live[0] > 0 {
                Err(RunError::LiveVerification { wrong_bytes: live[0] })
            } else {
                Ok(())
            }
        });
        if let Err(e) = &result {
            self.report.error = Some(e.to_string());
        }
        self.out.line(self.report.summary());
        if let (Some(path), 0) = (&self.args.report, self.world.rank()) {
            file::write_json_atomic(path, &serde_json::to_value(&self.report).unwrap_or_default())
                .map_err(RunError::Report)?;
        }
        result.map(|()| RunOutcome { rank: self.world.rank(), report: self.report })
    }

    fn steps(&mut self) -> Result<(), RunError> {
        let RunShape { num_layers, num_logical, shape } = self.st.run_shape.clone();
        let (rank, spr, gpn) = (self.world.rank(), shape.slots_per_rank(), shape.gpus_per_node());
        let progress_every = (self.args.steps / 10).max(1);
        let mut last_round_at = Instant::now();
        let policy_config = self.args.manager.policy_config();
        for step in 0..self.args.steps {
            // 1. The engine's counts on this rank's slots, summed per logical expert.
            let global_truth = self.st.source.global_step(step);
            let slots = slot_loads(global_truth.view(), &self.live, rank, spr);
            let local = logical_from_slots(slots.view(), &self.live, rank, num_logical);
            // 2. The all-reduce, with the time flag of rank 0's clock.
            let time_flag = match self.manager.config.mode {
                Mode::Rounds(r) => match r.interval {
                    Interval::Seconds(s) => rank == 0 && last_round_at.elapsed().as_secs_f64() >= s,
                    Interval::Steps(_) => false,
                },
                Mode::Time => false,
            };
            let t0 = Instant::now();
            let (sum, flags) = self.world.allreduce_loads(&local.into_raw_vec_and_offset().0, &[time_flag])?;
            let t_reduced = Instant::now();
            let global = Array2::from_shape_vec((num_layers, num_logical), sum)
                .map_err(|e| RunError::Config(format!("load all-reduce: {e}")))?;
            if rank == 0 {
                let bal =
                    |p: &Placement| metrics::balance_report(global.view(), p.phy2log.view(), spr, gpn).balancedness;
                self.bal_static += bal(&self.st.initial);
                self.bal_live += bal(&self.live);
            }
            // 3. The manager's decision (a round, or a step of the time mode), and agreement.
            let mut observed = global;
            if self.args.fault.contains(&Fault::CorruptLoad(rank)) {
                // Fault injection: this rank's copy of the reduced load is wrong.
                for mut row in observed.rows_mut() {
                    let total: u64 = row.iter().fold(0u64, |a, &v| a.saturating_add(v));
                    row[0] = row[0].saturating_add(total / 2 + 1);
                }
            }
            self.manager.observe(observed);
            let due = self.decide(step, flags[0], &policy_config)?;
            if due {
                last_round_at = Instant::now();
            }
            let t_decided = t0.elapsed().as_secs_f64() * 1e6;
            if due {
                self.round_us.push(t_decided);
            } else {
                self.step_us.push(t_decided);
                self.allreduce_us.push((t_reduced - t0).as_secs_f64() * 1e6);
            }
            // 4. Migrate the next queued layers.
            for update in self.manager.next_layers() {
                let old = self.live.phy2log.row(update.layer).to_vec();
                let migration = LayerMigration::derive(update.layer, &old, &update.new_row, spr, gpn);
                match migrate_layer(self.st.store.as_mut(), self.world, &migration, rank) {
                    Ok(stats) => {
                        self.row(step, &stats);
                        self.live.phy2log.row_mut(update.layer).assign(&ndarray::ArrayView1::from(&update.new_row));
                        self.manager.committed(&update);
                        let r = &mut self.report;
                        r.layers_updated += 1;
                        r.experts_moved += stats.experts_moved as u64;
                        r.bytes_moved += stats.bytes_moved;
                        r.migration_seconds += stats.seconds;
                    }
                    Err(ExecError::Verification { layer, wrong_bytes }) => {
                        // The row of the layer that was staged but not committed.
                        let staged = migration.transfers.len();
                        let bytes = (staged * self.st.store.expert_bytes()) as u64;
                        self.out.line(table_row(step, layer, staged, bytes, 0, None, wrong_bytes));
                        self.report.wrong_bytes += wrong_bytes;
                        return Err(RunError::Exec { step, source: ExecError::Verification { layer, wrong_bytes } });
                    }
                    Err(source) => {
                        return Err(RunError::Exec { step, source });
                    }
                }
            }
            self.live = Placement::from_phy2log(self.live.phy2log.clone(), num_logical)
                .map_err(|source| RunError::Policy { context: format!("step {step}: live placement"), source })?;
            if self.args.verify_live_every_step {
                for layer in 0..num_layers {
                    let experts = local_slots(&self.live, layer, rank, spr);
                    self.live_wrong +=
                        self.st.store.verify_live(layer, &experts).map_err(|source| RunError::Exec { step, source })?;
                    self.live_checked += (spr * self.st.store.expert_bytes()) as u64;
                }
            }
            self.report.steps = step + 1;
            if rank == 0 && (step + 1) % progress_every == 0 {
                log::info!(
                    "step {}/{}: {} rebalances, {} layers updated, {} experts moved, balancedness live {:.4} static {:.4}",
                    step + 1,
                    self.args.steps,
                    self.report.rebalances,
                    self.report.layers_updated,
                    self.report.experts_moved,
                    self.bal_live / (step + 1) as f64,
                    self.bal_static / (step + 1) as f64
                );
            }
        }
        Ok(())
    }

    /// The manager's decision at `step` (if it makes one), plan agreement, queueing. Returns
    /// whether it was a round: a round of the rounds mode, or a step of the time mode that
    /// switches layers.
    fn decide(&mut self, step: usize, time_flag: bool, config: &PolicyConfig) -> Result<bool, RunError> {
        let proposal = match self.manager.decide(step, time_flag, &self.live, config) {
            Ok(None) => return Ok(false),
            Ok(Some(d)) => Ok(d),
            Err(e) => Err(e),
        };
        let hash = proposal.as_ref().map_or(POLICY_FAILED_HASH, RoundDecision::hash);
        let agreement = self.world.agree_hash(hash)?;
        if !agreement.agreed() {
            self.report.plans_agreed = false;
            self.out.line(format!(
                "# round at step {step}: plan hashes differ over the ranks (min {:016x}, max {:016x}): nothing moves",
                agreement.min, agreement.max
            ));
            return Err(RunError::PlanDisagreement { step, min: agreement.min, max: agreement.max });
        }
        let decision = proposal
            .map_err(|source| RunError::Policy { context: format!("step {step}: the policy failed"), source })?;
        let rounds = matches!(self.manager.config.mode, Mode::Rounds(_));
        if !rounds && decision.updates.is_empty() {
            return Ok(false);
        }
        self.out.line("#");
        self.out.line(format!(
            "# round {} at step {step}: {} layer(s) to migrate ({} changed, {} still similar, {} below min-improvement); plan {hash:016x} agreed by {} ranks",
            self.report.rounds.len() + 1,
            decision.updates.len(),
            decision.changed,
            decision.similar,
            decision.small_gain,
            self.world.size()
        ));
        if !decision.updates.is_empty() {
            self.report.rebalances += 1;
            self.out.line(TABLE_HEADER);
        }
        self.report.rounds.push(RoundRow {
            step,
            changed: decision.changed,
            similar: decision.similar,
            small_gain: decision.small_gain,
            selected: decision.updates.iter().map(|u| u.layer).collect(),
            plan_hash: format!("{hash:016x}"),
        });
        self.manager.accept(step, decision);
        Ok(true)
    }

    fn row(&mut self, step: usize, s: &crate::executor::LayerStats) {
        let gbps = if s.seconds > 0.0 { s.bytes_moved as f64 / s.seconds / 1e9 } else { 0.0 };
        self.out.line(table_row(step, s.layer, s.experts_moved, s.bytes_moved, s.local_copies, Some(s.seconds), 0));
        self.report.layers.push(LayerRow {
            step,
            layer: s.layer,
            experts_moved: s.experts_moved,
            bytes: s.bytes_moved,
            local_copies: s.local_copies,
            seconds: s.seconds,
            gbps,
            wrong_bytes: 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> RunArgs {
        args::parse_run_args(flags).unwrap()
    }

    fn topo(world_size: usize, num_nodes: usize) -> Topology {
        Topology {
            world_rank: 0,
            world_size,
            node: 0,
            num_nodes,
            local_rank: 0,
            local_size: world_size / num_nodes,
            host: "h".into(),
            faked: true,
        }
    }

    fn shape(flags: &[&str], world: usize, nodes: usize, experts: usize) -> Result<RunShape, RunError> {
        let source = LoadSource::Zipf(DriftingZipf::new(2, experts, 0));
        resolve_shape(&args(flags), &topo(world, nodes), &source)
    }

    #[test]
    fn redundant_slots_default_and_flags() {
        // Default: one extra slot a rank, rounded up so that the slots divide.
        assert_eq!(shape(&[], 4, 1, 64).unwrap().shape.num_replicas, 68);
        assert_eq!(shape(&[], 8, 1, 60).unwrap().shape.num_replicas, 72);
        assert_eq!(shape(&["--num-redundant-experts", "16"], 4, 1, 64).unwrap().shape.num_replicas, 80);
        assert_eq!(shape(&["--redundant_experts_num=2"], 4, 1, 64).unwrap().shape.num_replicas, 72);
        let e = shape(&["--num-redundant-experts", "3"], 4, 1, 64).unwrap_err();
        assert!(e.to_string().contains("use --num-redundant-experts 4") && e.exit_code() == 2, "{e}");
    }

    #[test]
    fn ep_size_and_groups_are_checked() {
        assert!(shape(&["--ep-size", "4"], 4, 1, 64).is_ok());
        let e = shape(&["--ep_size=16"], 4, 1, 64).unwrap_err();
        assert!(e.to_string().contains("must match the number of devices") && e.exit_code() == 2, "{e}");
        let s = shape(&["--num-groups", "4"], 8, 2, 64).unwrap().shape;
        assert!(s.is_hierarchical() && s.num_nodes == 2);
        let e = shape(&["--num-groups", "6"], 8, 2, 64).unwrap_err();
        assert!(matches!(e, RunError::Policy { .. }) && e.exit_code() == 2, "{e}");
    }

    #[test]
    fn table_rows_line_up_with_the_header() {
        let ok = table_row(12, 3, 7, 7340032, 1, Some(0.005), 0);
        let failed = table_row(12, 3, 7, 7340032, 0, None, 5);
        assert_eq!(ok.len(), TABLE_HEADER.len());
        assert_eq!(failed.len(), TABLE_HEADER.len());
        assert!(ok.contains("5000.0") && ok.contains("1.468") && failed.ends_with("      5"));
    }
}

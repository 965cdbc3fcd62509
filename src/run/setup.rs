//! Set-up of `run`: from the flags to a ready state (topology, shape, the engine with its initial
//! placement and its expert store), agreed by every rank before the loop starts.

use crate::collective::{Comm, ReduceOp};
use crate::engine::shm::region::Layout;
use crate::engine::shm::{self, ShmEngine, ShmOptions, StartError};
use crate::engine::synthetic::DriftingZipf;
use crate::engine::{Engine, LoadSource, SyntheticEngine};
use crate::executor::factory::{self, Opened, StoreError, StoreSpec, Transport, Weights};
use crate::executor::ExecError;
use crate::gpu;
use crate::load::{self, TraceSelect};
use crate::manager::fault;
use crate::manager::{Clock, Controller, Manager};
use crate::plan::file;
use crate::policy::{Placement, PlacementShape};
use crate::rank::Topology;

use super::config::{EngineConfig, PlacementConfig, RunConfig};
use super::safety::{agree_on_setup, agree_on_shapes, load_identity};
use super::{EngineKind, RunError, RunShape, TransportKind, DEFAULT_EXPERTS, DEFAULT_LAYERS};

/// A rank ready for the loop.
pub(crate) struct Ready {
    pub topo: Topology,
    pub run_shape: RunShape,
    /// The engine, holding its initial placement and its expert store.
    pub engine: Box<dyn Engine>,
    /// The manager (its mode decorated with this rank's manager faults, if `--fault` asks for
    /// any) and its wall clock.
    pub controller: Controller,
}

impl Ready {
    /// The rank's state once its engine is up: the manager is made for the engine's layers and
    /// expert size, with the faults `--fault` asks of this rank ([`fault::decorate`]: the loop
    /// never knows of them).
    fn new(config: &RunConfig, topo: Topology, run_shape: RunShape, engine: Box<dyn Engine>) -> Ready {
        let RunShape { num_layers, num_logical, shape } = run_shape.clone();
        let expert_bytes = engine.store_ref().expert_bytes() as u64;
        let manager_config =
            config.manager.config(num_layers, expert_bytes, super::DEFAULT_STEP_MS, super::DEFAULT_MIGRATION_GBPS);
        let manager = Manager::new(manager_config, config.manager.policy_config(), shape, num_layers, num_logical);
        let controller =
            Controller::new(fault::decorate(manager, config.faults.manager(topo.world_rank)), Clock::wall());
        Ready { topo, run_shape, engine, controller }
    }
}

/// Sets up this rank: topology, transport, the engine and its store. Collective over `world`:
/// every rank learns whether every rank's set-up succeeded, so that none goes on alone.
pub(crate) fn setup(world: &Comm, config: &RunConfig) -> Result<Ready, RunError> {
    let rank = world.rank();
    // Collective calls first, so that a rank whose local setup fails does not leave the others
    // waiting in one of them.
    let topo = Topology::discover(world, config.placement.ranks_per_node)?;
    match &config.engine.kind {
        EngineKind::Synthetic => {
            let transport = resolve_transport(config.store.transport, &topo, world)?;
            let store_comm = world.dup()?;
            let prepared = agree_on_setup(world, prepare_synthetic(config, &topo, store_comm, transport))?;
            // What the flags resolved to must agree too, before the store's collective set-up.
            let load = load_identity(&prepared.source);
            agree_on_shapes(world, &prepared.run_shape, &load, &prepared.initial, transport)?;
            let store = agree_on_setup(world, factory::finish(prepared.store).map_err(store_error))?;
            let engine = SyntheticEngine::new(prepared.source, prepared.initial, store, config.engine.steps, rank)
                .paced(config.manager.step_ms);
            Ok(Ready::new(config, topo, prepared.run_shape, Box::new(engine)))
        }
        EngineKind::Shm(name) => {
            let e = &config.engine;
            let opts =
                ShmOptions { name: name.clone(), wait: e.wait, timeout: e.heartbeat_timeout, phase: e.balance_phase };
            let (comm, transport) = (world.dup()?, world.dup()?);
            let attached = shm::attach(&opts, rank, world.size())
                .map_err(|source| RunError::Engine { rank, source })
                .and_then(|attached| {
                    let run_shape = shm_shape(e, &config.placement, &topo, attached.layout())?;
                    shm_transport(config.store.transport, attached.layout())?;
                    Ok((attached, run_shape))
                });
            let (attached, run_shape) = agree_on_setup(world, attached)?;
            let (chunk_bytes, tuning, faults) =
                (config.store.chunk_bytes, config.store.tuning(), config.faults.store(rank));
            let engine = ShmEngine::start(attached, world, comm, transport, chunk_bytes, tuning, faults).map_err(
                |e| match e {
                    StartError::Mpi(e) => RunError::Mpi(e),
                    StartError::Store(e) => store_error(e),
                    StartError::BadInput(what) => {
                        RunError::Engine { rank, source: crate::engine::EngineError::BadInput(what) }
                    }
                    other => RunError::Exec { step: 0, source: ExecError::Other(other.to_string()) },
                },
            )?;
            Ok(Ready::new(config, topo, run_shape, Box::new(engine)))
        }
    }
}

/// The transport follows where the engine keeps its weights: host weights move over MPI, GPU
/// weights (CUDA IPC) over NCCL; `--transport auto` picks it, a contrary choice is an error.
fn shm_transport(transport: TransportKind, l: &Layout) -> Result<(), RunError> {
    let gpu = l.ipc.is_some();
    match (transport, gpu) {
        (TransportKind::Nccl, false) => Err(RunError::Config(
            "--transport nccl: this engine keeps its weights in host memory (weights_kind 0): use --transport host or auto".into(),
        )),
        (TransportKind::Host, true) => Err(RunError::Config(
            "--transport host: this engine keeps its weights on its GPU (CUDA IPC, weights_kind 1): use --transport nccl or auto".into(),
        )),
        _ => Ok(()),
    }
}

/// The shape of an shm engine: the region's, checked against the flags that name it.
fn shm_shape(e: &EngineConfig, p: &PlacementConfig, topo: &Topology, l: &Layout) -> Result<RunShape, RunError> {
    for (flag, given, have) in [
        ("--num-layers", e.num_layers, l.num_layers),
        ("--num-experts", e.num_experts, l.num_logical),
        ("--num-redundant-experts", p.num_redundant_experts, l.num_physical() - l.num_logical),
        (
            "--redundant_experts_num",
            p.redundant_experts_num.map(|n| n * topo.world_size),
            l.num_physical() - l.num_logical,
        ),
    ] {
        if given.is_some_and(|g| g != have) {
            return Err(RunError::Config(format!(
                "{flag} disagrees with the engine: it has {have} ({} layers x {} experts in {} slots over {} ranks)",
                l.num_layers,
                l.num_logical,
                l.num_physical(),
                l.world_size
            )));
        }
    }
    if let Some(ep) = p.ep_size.filter(|&ep| ep != topo.world_size) {
        return Err(RunError::Config(format!(
            "--ep-size {ep} must match the number of devices: this job has {} ranks (start one rank per GPU)",
            topo.world_size
        )));
    }
    let shape = PlacementShape {
        num_replicas: l.num_physical(),
        num_gpus: topo.world_size,
        num_nodes: topo.num_nodes,
        num_groups: p.num_groups,
    };
    shape
        .validate(l.num_logical)
        .map_err(|source| RunError::Policy { context: "the engine's shape with --num-groups".into(), source })?;
    Ok(RunShape { num_layers: l.num_layers, num_logical: l.num_logical, shape })
}

/// Checks the flags against the world and the load: `--ep-size`, the redundant slots, the groups.
pub(crate) fn resolve_shape(p: &PlacementConfig, topo: &Topology, source: &LoadSource) -> Result<RunShape, RunError> {
    resolve_shape_of(p, topo, source.num_layers(), source.num_logical())
}

/// [`resolve_shape`] for an engine of `layers` MoE layers of `num_logical` experts.
pub(crate) fn resolve_shape_of(
    p: &PlacementConfig,
    topo: &Topology,
    layers: usize,
    num_logical: usize,
) -> Result<RunShape, RunError> {
    let world = topo.world_size;
    if let Some(ep) = p.ep_size {
        if ep != world {
            return Err(RunError::Config(format!(
                "--ep-size {ep} must match the number of devices: this job has {world} ranks (start one rank per GPU)"
            )));
        }
    }
    let num_replicas = match (p.num_redundant_experts, p.redundant_experts_num) {
        (Some(n), _) => num_logical.checked_add(n),
        (None, Some(per_rank)) => per_rank.checked_mul(world).and_then(|n| n.checked_add(num_logical)),
        (None, None) => num_logical.checked_add(world).map(|n| n.div_ceil(world) * world),
    }
    .unwrap_or(usize::MAX);
    // Sizes the policy can plan in bounded time and memory, before anything is allocated.
    crate::limits::check_shape(num_replicas, world, ("the slots (experts + --num-redundant-experts)", "the ranks"))?;
    if num_replicas % world != 0 {
        let next = num_replicas.div_ceil(world) * world;
        return Err(RunError::Config(format!(
            "{num_logical} experts + {} redundant = {num_replicas} slots do not divide over {world} ranks; use --num-redundant-experts {}",
            num_replicas - num_logical,
            next - num_logical
        )));
    }
    let shape = PlacementShape { num_replicas, num_gpus: world, num_nodes: topo.num_nodes, num_groups: p.num_groups };
    shape
        .validate(num_logical)
        .map_err(|source| RunError::Policy { context: "--num-groups/--num-redundant-experts".into(), source })?;
    Ok(RunShape { num_layers: layers, num_logical, shape })
}

/// The load the synthetic engine replays: `--trace` or the built-in generator.
pub(crate) fn load_source(e: &EngineConfig) -> Result<LoadSource, RunError> {
    match &e.trace {
        Some(path) => {
            let trace = load::read_trace(path, &TraceSelect { dataset: e.trace_dataset.clone() })?;
            for (flag, given, have) in [
                ("--num-layers", e.num_layers, trace.num_layers()),
                ("--num-experts", e.num_experts, trace.num_logical()),
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
            // At least 1 each ([`RunConfig::new`]).
            let (layers, experts) = (e.num_layers.unwrap_or(DEFAULT_LAYERS), e.num_experts.unwrap_or(DEFAULT_EXPERTS));
            Ok(LoadSource::Zipf(DriftingZipf {
                drift_steps: e.drift_steps as usize,
                ..DriftingZipf::new(layers, experts, e.seed)
            }))
        }
    }
}

/// Checks that the load of a step and the window of steps the policy plans on (u64 each) fit in
/// host memory, before either is allocated.
fn check_load_memory(config: &RunConfig, layers: usize, experts: usize) -> Result<(), RunError> {
    let window = config.manager.eplb_window_steps.unwrap_or(crate::manager::args::ROUNDS_WINDOW_STEPS);
    let steps = (window as usize).saturating_add(4);
    Ok(crate::limits::check_host_memory(
        "the load window",
        crate::limits::product(&[layers, experts, steps, 8]),
        &format!("{layers} layers x {experts} experts x {window} steps of window"),
        "lower --num-layers, --num-experts or --eplb-window-steps",
    )?)
}

/// A store's set-up error as a run error.
fn store_error(e: StoreError) -> RunError {
    match e {
        StoreError::Gpu(e) => RunError::Gpu(e),
        StoreError::Exec(e) => RunError::Exec { step: 0, source: e },
        StoreError::Mpi(e) => RunError::Mpi(e),
        StoreError::Config(what) => RunError::Config(what),
        StoreError::Peers { ranks, code } => RunError::PeerSetup { ranks, code },
    }
}

/// The expert store `--transport` selects, before the collective part of its set-up.
pub(crate) type StoreSetup = Opened;

/// The transport every rank uses: `auto` becomes `nccl` only when every rank can use a GPU
/// (collective over `world` for `auto`).
pub(crate) fn resolve_transport(kind: TransportKind, topo: &Topology, world: &Comm) -> Result<TransportKind, RunError> {
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
/// the host store, or this rank's GPU ([`factory::open`]), with the faults `--fault` asks of this
/// rank. `comm` is a communicator of the store's own.
pub(crate) fn make_store(
    config: &RunConfig,
    transport: TransportKind,
    comm: Comm,
    experts: &[Vec<usize>],
    topo: &Topology,
) -> Result<StoreSetup, RunError> {
    let (layers, spr) = (experts.len(), experts.first().map_or(0, Vec::len));
    let expert_bytes = config.engine.expert_bytes;
    let (weights, transport) = if transport == TransportKind::Nccl {
        let gpu = gpu::open_local_gpu(topo.local_rank)?;
        (
            Weights::Device { gpu, experts: experts.to_vec(), expert_bytes },
            Transport::Nccl { tuning: config.store.tuning() },
        )
    } else {
        // The ranks of one host share its memory (all of them when the nodes are faked).
        let on_host = if topo.faked { topo.world_size } else { topo.local_size };
        crate::limits::check_host_memory(
            "the expert weights",
            crate::limits::product(&[layers + 1, spr, expert_bytes, on_host]),
            &format!("{on_host} rank(s) on this host x ({layers} layers + staging) x {spr} slots x {expert_bytes} B"),
            "lower --expert-bytes or the layers, or use fewer ranks a host",
        )?;
        (
            Weights::Heap { experts: experts.to_vec(), expert_bytes },
            Transport::Host { chunk_bytes: config.store.chunk_bytes },
        )
    };
    let faults = config.faults.store(topo.world_rank);
    factory::open(StoreSpec { weights, transport, comm, faults }).map_err(|e| match e {
        StoreError::Exec(e) => RunError::Config(format!("the host store: {e}")),
        other => store_error(other),
    })
}

/// The synthetic engine's state before the collective part of its store's set-up.
struct PreparedSynthetic {
    run_shape: RunShape,
    source: LoadSource,
    initial: Placement,
    store: StoreSetup,
}

/// The local part of the synthetic engine's set-up: its load, the shape, the initial placement
/// (`--init-placement` or trivial) and the local part of its store.
fn prepare_synthetic(
    config: &RunConfig,
    topo: &Topology,
    store_comm: Comm,
    transport: TransportKind,
) -> Result<PreparedSynthetic, RunError> {
    if let Some(d) = config.placement.expert_parallel_degree {
        log::info!("--expert_parallel_degree={d} is accepted for xLLM compatibility and ignored");
    }
    let source = load_source(&config.engine)?;
    check_load_memory(config, source.num_layers(), source.num_logical())?;
    let run_shape = resolve_shape(&config.placement, topo, &source)?;
    let (layers, num_logical, shape) = (run_shape.num_layers, run_shape.num_logical, run_shape.shape);
    let initial = match &config.placement.init_placement {
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
    let store = make_store(config, transport, store_comm, &experts, topo)?;
    Ok(PreparedSynthetic { run_shape, source, initial, store })
}

/// The experts of rank `rank`'s slots in `layer` of `placement` (`[slots_per_rank]`).
pub(crate) fn local_slots(placement: &Placement, layer: usize, rank: usize, slots_per_rank: usize) -> Vec<usize> {
    placement.phy2log.row(layer).iter().skip(rank * slots_per_rank).take(slots_per_rank).copied().collect()
}

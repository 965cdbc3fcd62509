//! `eplb-worker run`: the SPMD balancing loop, one rank per GPU, no coordinator.
//!
//! The run reads Manager -> Policy -> Executor, in four pieces:
//! * [`setup`]: flags to a ready state: topology, shape, the engine (its initial placement and
//!   the [`crate::executor::ExpertStore`] holding its weights), agreed by every rank;
//! * `looper`: the loop. Every step, every rank:
//!   1. takes its engine's token counts of its own slots ([`crate::engine::Engine::next_step`])
//!      and sums them per logical expert with the placement that was live at that step;
//!   2. all-reduces them (sum), with the manager's time-interval flag and the end-of-run and
//!      engine-failure flags piggybacked;
//!   3. pushes the global load into the sliding window; when a round is due, computes the policy
//!      on the window load (`previous` = the live placement), selects the layers to update, and
//!      agrees on the hash of that plan (min/max all-reduce); a disagreement stops every rank,
//!      nothing moved;
//!   4. migrates at most `--eplb-layers-per-step` queued layers: stage, verify, agree
//!      ([`crate::executor::stage_layer`]), then commit;
//! * [`live`]: the one owner of a commit: the bytes (the store's commit), the live placement and
//!   the manager's reference load change together, in one place;
//! * `output`: the header, the tables, the summary and the JSON report (`report`).
//!
//! Decisions depend only on all-reduced data and flags, so every rank takes them at the same step.

pub mod args;
pub mod config;
pub mod force;
pub mod live;
mod looper;
mod output;
mod report;
pub mod safety;
pub mod setup;

pub use args::RunArgs;
pub(crate) use args::{EngineKind, TransportKind};
pub(crate) use config::RunConfig;
pub use report::Report;
#[cfg(test)]
use setup::resolve_shape;

use thiserror::Error;

/// The cost model's defaults in `run` (`--step-ms`, `--migration-gbps`): a decode step of a large
/// MoE model, and NVLink-class migration (BENCHMARKS.md measures 200-265 GB/s a GPU with NCCL).
pub(crate) const DEFAULT_STEP_MS: f64 = 20.0;
pub(crate) const DEFAULT_MIGRATION_GBPS: f64 = 200.0;

use crate::collective::{Comm, MpiError, MpiRuntime};
use crate::engine::EngineError;
use crate::executor::ExecError;
use crate::exit::{ExitKind, Failure};
use crate::gpu::GpuError;
use crate::load::LoadError;
use crate::observe::metrics::{Metrics, MetricsServer};
use crate::plan::file::PlacementFileError;
use crate::policy::PolicyError;
use crate::rank::TopologyError;

/// The resolved sizes of a run.
#[derive(Debug, Clone)]
pub(crate) struct RunShape {
    pub num_layers: usize,
    pub num_logical: usize,
    pub shape: crate::policy::PlacementShape,
}

/// Default layers and experts of the built-in load.
pub(crate) const DEFAULT_LAYERS: usize = 8;
pub(crate) const DEFAULT_EXPERTS: usize = 64;

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
    /// Flags that cannot work together or with the engine (bad input); the message names the flag.
    #[error("{0}")]
    Config(String),
    /// An invariant of the loop did not hold (a bug, exit 1: not the input's fault).
    #[error("internal error: {0}; this is a bug, please report it with the command line")]
    Internal(String),
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
    #[error(transparent)]
    Metrics(#[from] crate::observe::metrics::MetricsError),
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    #[error(transparent)]
    Limit(#[from] crate::limits::LimitError),
    /// The ranks were started with different settings (see [`safety::begin`]).
    #[error("{0}")]
    Settings(String),
    /// Another rank failed during setup and printed why.
    #[error("rank(s) {ranks} failed during setup")]
    PeerSetup { ranks: String, code: i32 },
    /// This rank's engine failed or is not what the flags say; every rank stops.
    /// (The engine's messages name its rank, or the region's path, which holds it.)
    #[error("{source}")]
    Engine { rank: usize, source: EngineError },
    /// The engines of these ranks failed (each of those ranks printed why); every rank stops.
    #[error("step {step}: the engine of rank(s) {ranks} failed (see their messages); nothing was half applied")]
    PeerEngine { step: usize, ranks: String },
    /// This rank received SIGTERM or SIGINT; every rank stopped at the same step.
    #[error("{}", crate::signals::interrupted(*signal))]
    Interrupted { signal: i32 },
    /// Another rank received SIGTERM or SIGINT.
    #[error("step {step}: rank(s) {ranks} were interrupted by a signal; the run was stopped before its end, nothing is half applied")]
    PeerInterrupted { step: usize, ranks: String },
}

impl Failure for RunError {
    fn kind(&self) -> ExitKind {
        match self {
            RunError::Topology(TopologyError::Mpi(_)) | RunError::Mpi(_) => ExitKind::Runtime,
            RunError::Topology(_) | RunError::Load(_) | RunError::Config(_) | RunError::Policy { .. } => {
                ExitKind::BadInput
            }
            RunError::Limit(_) | RunError::Settings(_) => ExitKind::BadInput,
            RunError::Output(e) | RunError::PlacementFile(PlacementFileError::Write(e)) => e.kind(),
            RunError::PlacementFile(_) => ExitKind::BadInput,
            RunError::PlanDisagreement { .. } | RunError::Exec { .. } | RunError::LiveVerification { .. } => {
                ExitKind::Runtime
            }
            RunError::PeerSetup { code, .. } => ExitKind::from_code(*code),
            RunError::Gpu(e) => e.kind(),
            RunError::Metrics(_) => ExitKind::BadInput,
            RunError::Engine { source, .. } => source.kind(),
            RunError::PeerEngine { .. } | RunError::Interrupted { .. } | RunError::PeerInterrupted { .. } => {
                ExitKind::Runtime
            }
            RunError::Internal(_) => ExitKind::Internal,
        }
    }
}

impl RunError {
    /// An error only this rank saw: the others may wait for it forever, so the job is aborted.
    pub(crate) fn is_local(&self) -> bool {
        self.mpi().is_some()
            || matches!(self, RunError::Exec { source: ExecError::Engine(_), .. })
            || matches!(self, RunError::Engine { source: EngineError::Failed(_), .. })
    }

    /// The MPI failure (or watchdog timeout) behind this error, if that is what it is.
    fn mpi(&self) -> Option<&MpiError> {
        match self {
            RunError::Mpi(e) | RunError::Topology(TopologyError::Mpi(e)) => Some(e),
            RunError::Exec { source: ExecError::Mpi(e), .. } => Some(e),
            RunError::Gpu(GpuError::Watchdog(e)) => Some(e),
            _ => None,
        }
    }

    /// Whether this is the watchdog's timeout (`--timeout`).
    pub(crate) fn is_timeout(&self) -> bool {
        self.mpi().is_some_and(MpiError::is_timeout)
    }

    /// Whether rank `rank` prints the error: rank 0 prints the errors every rank shares, a rank
    /// prints its own failure (an engine, an NCCL, CUDA or MPI call of its own), which rank 0
    /// then names (see [`run_on`]).
    pub(crate) fn printed_by(&self, rank: usize) -> bool {
        match self {
            // Each failing rank says why; rank 0 names them unless it is one of them.
            RunError::Engine { .. } => true,
            RunError::Exec {
                source: ExecError::Nccl { .. } | ExecError::Cuda { .. } | ExecError::Other(_), ..
            } => true,
            _ => rank == 0 || self.is_local(),
        }
    }
}

/// What a run did, for the caller.
#[derive(Debug)]
pub struct RunOutcome {
    pub rank: usize,
    pub report: Report,
}

/// Runs `eplb-worker run` on this rank: starts MPI, validates the flags into a [`RunConfig`]
/// (every rank learns whether every rank's flags were valid: exit 2, nothing started), runs the
/// loop, stops MPI.
///
/// On an error the message is printed here, before MPI stops, and not by the caller: `mpirun`
/// kills the whole job as soon as one rank exits with a non-zero code, so rank 0 prints the
/// errors every rank shares and then meets the others in a barrier, which no rank leaves before
/// the message is out. An error only one rank saw (a failed MPI call) is printed by that rank,
/// which then aborts the job, since the others may be waiting for it.
pub fn run(args: &RunArgs) -> Result<RunOutcome, RunError> {
    let (_runtime, mut world) = match MpiRuntime::init().and_then(|rt| Ok((rt, Comm::world()?))) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("eplb-worker run: error: {e}");
            return Err(e.into());
        }
    };
    let rank = world.rank();
    crate::failure::set_rank(rank);
    crate::signals::install();
    let config = match safety::agree_on_setup(&world, RunConfig::new(args)) {
        Ok(config) => config,
        Err(e) => {
            safety::fail(&world, &safety::ReportHandle::none(rank), &e);
            return Err(e);
        }
    };
    let report = safety::ReportHandle::new(&config.output, rank);
    let result = safety::begin(&mut world, &config, &report).and_then(|()| run_on(&world, &config, &report));
    if let Err(e) = &result {
        safety::fail(&world, &report, e);
    }
    result
}

/// The run on `world` (MPI started, the flags agreed): set up, then the loop.
pub(crate) fn run_on(world: &Comm, config: &RunConfig, report: &safety::ReportHandle) -> Result<RunOutcome, RunError> {
    let ready = setup::setup(world, config)?;
    // Rank 0's endpoint, agreed like the rest of the set-up (a port in use stops every rank).
    let served = safety::agree_on_setup(world, serve_metrics(config, world.rank(), &ready))?;
    let devices = ready.topo.devices_block(world, &ready.engine.store_ref().device())?;
    let mut looper = looper::Looper::new(world, config, report, ready);
    if let Some((metrics, server)) = &served {
        looper.watch(Box::new(metrics.clone()), Some(server.addr()));
    }
    let result = looper.run(devices);
    if let (Some((_, server)), Some(m)) = (served, config.output.metrics) {
        // The final values stay up for a last scrape, then the server stops.
        std::thread::sleep(m.linger);
        drop(server);
    }
    result
}

/// `--metrics-port` on rank 0: the metrics and their HTTP server (see [`crate::observe::metrics`]).
fn serve_metrics(
    config: &RunConfig,
    rank: usize,
    ready: &setup::Ready,
) -> Result<Option<(Metrics, MetricsServer)>, RunError> {
    let Some(m) = config.output.metrics.filter(|_| rank == 0) else { return Ok(None) };
    let metrics = Metrics::new(&[
        ("engine", ready.engine.name()),
        ("policy", format!("{:?}", config.manager.policy).to_lowercase()),
        ("transport", ready.engine.store_ref().transport().to_string()),
        ("world_size", ready.topo.world_size.to_string()),
    ])?;
    let server = MetricsServer::start(metrics.clone(), m.bind, m.port)?;
    Ok(Some((metrics, server)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::synthetic::DriftingZipf;
    use crate::engine::LoadSource;
    use crate::rank::Topology;
    use output::{table_row, TABLE_HEADER};

    fn config(flags: &[&str]) -> RunConfig {
        config::parse_config(flags).unwrap()
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
        resolve_shape(&config(flags).placement, &topo(world, nodes), &source)
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

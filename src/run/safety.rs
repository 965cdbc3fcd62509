//! Never hang, never corrupt, never lie: the run's side of issue 12, in one place.
//!
//! * [`begin`] (collective, before anything else): arms the watchdog (`--timeout`), has rank 0
//!   check that the report can be written without destroying an input and replace any old report
//!   with `"status": "running"`, then has every rank agree on the flags that the collectives and
//!   the plan depend on ([`flag_settings`]); [`agree_on_shapes`] does the same for what the flags
//!   resolved to (the load's shape, the slots, the initial placement), before the store's
//!   collective set-up;
//! * [`ReportHandle::finish`]: the one way the final report is written (`ok`, or `failed` and
//!   `error`); [`fail`]: the end of a failed run on one rank (print, report, abort when a peer may
//!   wait);
//! * [`agree_on_setup`]: every rank learns whether every rank's local set-up succeeded.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use serde_json::json;

use super::config::{OutputConfig, RunConfig};
use super::{RunError, RunShape, TransportKind};
use crate::collective::settings::{agree_on_settings, Setting, SettingsError};
use crate::collective::{self, Comm, Watchdog};
use crate::engine::LoadSource;
use crate::exit::Failure;
use crate::output::{self, Named, StatusReport};
use crate::policy::Placement;

/// The run's JSON report (`--report`), held by the run and lent to whoever finishes it (the
/// output at the end of the loop, [`fail`] on an error): rank 0 writes it, and it is finished at
/// most once, and only once started, so that a path refused by the checks (an input, a folder) is
/// never written.
#[derive(Debug)]
pub struct ReportHandle {
    /// `--report`: every rank knows it (a rank other than 0 may write the failed report, see
    /// [`ReportHandle::finish_for_rank_0`]).
    path: Option<PathBuf>,
    inputs: Vec<(&'static str, PathBuf)>,
    rank: usize,
    /// Whether this rank started the report (`running`).
    started: Cell<bool>,
    /// Whether this rank wrote the final report already.
    finished: Cell<bool>,
}

impl ReportHandle {
    /// The report of `output` on rank `rank`.
    pub fn new(output: &OutputConfig, rank: usize) -> ReportHandle {
        ReportHandle {
            path: output.report.clone(),
            inputs: output.inputs.clone(),
            rank,
            started: Cell::new(false),
            finished: Cell::new(false),
        }
    }

    /// No report (a run refused before its config existed).
    pub fn none(rank: usize) -> ReportHandle {
        ReportHandle::new(&OutputConfig { report: None, metrics: None, inputs: Vec::new() }, rank)
    }

    /// The report this rank writes: rank 0's, when `--report` was given.
    fn status_report(&self) -> Option<StatusReport> {
        self.path.as_deref().filter(|_| self.rank == 0).map(|p| StatusReport::at("--report", p))
    }

    /// Rank 0: checks that the report destroys no input, then replaces any old one with `running`.
    fn start(&self, path: &Path, world_size: usize) -> Result<(), RunError> {
        let inputs: Vec<Named<'_>> = self.inputs.iter().map(|(flag, p)| Named::new(flag, p)).collect();
        output::check_outputs(&[Named::new("--report", path)], &inputs)?;
        StatusReport::start("--report", path, json!({ "world_size": world_size }))?;
        self.started.set(true);
        Ok(())
    }

    /// Writes the final report (rank 0, with `--report`): `doc` with `status` `ok`, or `failed`
    /// and `error`. Every exit path of a run that started its report goes through here or
    /// [`fail`].
    pub fn finish(&self, doc: serde_json::Value, error: Option<&str>) -> Result<(), RunError> {
        let Some(report) = self.status_report().filter(|_| self.started.get()) else { return Ok(()) };
        self.finished.set(true);
        report.finish(doc, error).map_err(RunError::from)
    }

    /// The failed report, written by this rank (not 0) for an error only it saw: the abort that
    /// follows ends rank 0 too, which may be waiting for this rank in a collective and would leave
    /// `running` for good. Written only over a report that still says `running` (rank 0's final
    /// one, or another failing rank's, stands).
    fn finish_for_rank_0(&self, world_size: usize, e: &RunError) {
        let Some(path) = self.path.as_deref() else { return };
        let running = crate::input::read_regular(path, crate::input::MAX_JSON_BYTES)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|d| d["status"] == output::STATUS_RUNNING);
        if running {
            let rank = self.rank;
            let doc = json!({ "world_size": world_size, "failed_rank": rank });
            let _ = StatusReport::at("--report", path).finish(doc, Some(&format!("rank {rank}: {e}")));
        }
    }
}

/// How long a rank other than 0 that timed out waits before ending the job, so that rank 0
/// (which timed out too, unless it is the silent one) writes the failed report first.
const REPORT_GRACE: Duration = Duration::from_secs(3);

/// The start of every run, on every rank, before any other collective: the watchdog, the
/// report (rank 0: checked, then `running`), and the agreement on the flags. A failure of any
/// rank is every rank's: all return the same error (exit 2), none goes on.
pub(crate) fn begin(world: &mut Comm, config: &RunConfig, report: &ReportHandle) -> Result<(), RunError> {
    world.set_watchdog(Rc::new(Watchdog::new(world, config.timeout)?));
    collective::set_blocking_timeout(world.rank(), config.timeout);
    let local = match (&config.output.report, world.rank()) {
        (Some(path), 0) => report.start(path, world.size()),
        _ => Ok(()),
    };
    agree_on_setup(world, local)?;
    agree_on_settings(world, &flag_settings(config)).map_err(settings_error)
}

/// Every rank learns whether every rank's local set-up succeeded (one all-gather of exit codes),
/// so that no rank goes on into a collective call that a failed rank will never make.
pub(crate) fn agree_on_setup<T>(world: &Comm, local: Result<T, RunError>) -> Result<T, RunError> {
    let rank = world.rank();
    let code = match &local {
        Ok(_) => 0u64,
        Err(e) => e.exit_code().max(1) as u64,
    };
    let (failed, max_code) = world.failed_ranks(code)?;
    match local {
        Err(e) if failed.len() < world.size() => {
            // Only some ranks failed (a file missing on one node): each says why.
            eprintln!("eplb-worker run: rank {rank}: error: {e}");
            Err(RunError::PeerSetup { ranks: format!("{failed:?}"), code: e.exit_code() })
        }
        Err(e) => Err(e),
        Ok(_) if !failed.is_empty() => Err(RunError::PeerSetup { ranks: format!("{failed:?}"), code: max_code as i32 }),
        Ok(s) => Ok(s),
    }
}

fn settings_error(e: SettingsError) -> RunError {
    match e {
        SettingsError::Mpi(e) => RunError::Mpi(e),
        SettingsError::Differ { .. } => RunError::Settings(e.to_string()),
    }
}

/// `Some(v)` as `v`, `None` as `(not given)`.
fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "(not given)".to_string(), T::to_string)
}

/// Every flag that the sizes of the collectives, the transfers or the plan depend on, as the
/// command line spelled it. Paths are compared by presence only (the same file may be mounted
/// at different places on different nodes); their content is compared by [`agree_on_shapes`].
pub(crate) fn flag_settings(c: &RunConfig) -> Vec<Setting> {
    let given = |p: &Option<PathBuf>| if p.is_some() { "given" } else { "(not given)" };
    let (e, p, m, st) = (&c.engine, &c.placement, &c.manager, &c.store);
    vec![
        Setting::new("--engine", format!("{:?}", e.kind)),
        Setting::new("--trace", given(&e.trace)),
        Setting::new("--trace-dataset", opt(&e.trace_dataset)),
        Setting::new("--num-layers", opt(&e.num_layers)),
        Setting::new("--num-experts", opt(&e.num_experts)),
        Setting::new("--expert-bytes", e.expert_bytes),
        Setting::new("--steps", e.steps),
        Setting::new("--drift-steps", e.drift_steps),
        Setting::new("--seed", e.seed),
        Setting::new("--num-redundant-experts", opt(&p.num_redundant_experts)),
        Setting::new("--redundant_experts_num", opt(&p.redundant_experts_num)),
        Setting::new("--num-groups", p.num_groups),
        Setting::new("--ep-size", opt(&p.ep_size)),
        Setting::new("--ranks-per-node", opt(&p.ranks_per_node)),
        Setting::new("--init-placement", given(&p.init_placement)),
        Setting::new("--balance-phase", format!("{:?}", e.balance_phase)),
        Setting::new("--enable-eplb", m.enable_eplb),
        Setting::new("--step-ms", opt(&m.step_ms)),
        Setting::new("--migration-gbps", opt(&m.migration_gbps)),
        Setting::new("--measure-migration", m.measure_migration),
        Setting::new("--eplb-layers-per-step", m.eplb_layers_per_step),
        Setting::new("--eplb-update-interval", opt(&m.eplb_update_interval)),
        Setting::new("--eplb-update-interval-steps", opt(&m.eplb_update_interval_steps)),
        Setting::new("--eplb-update-threshold", opt(&m.eplb_update_threshold)),
        Setting::new("--eplb-min-improvement", opt(&m.eplb_min_improvement)),
        Setting::new("--eplb-window-steps", opt(&m.eplb_window_steps)),
        Setting::new("--policy", format!("{:?}", m.policy).to_lowercase()),
        Setting::new("--move-cost", opt(&m.move_cost)),
        Setting::new("--transport", format!("{:?}", st.transport).to_lowercase()),
        Setting::new("--chunk-bytes", st.chunk_bytes),
        Setting::new("--nccl-group-mib", st.nccl_group_mib),
        Setting::new("--nccl-chunk-mib", st.nccl_chunk_mib),
        Setting::new("--nccl-register", st.nccl_register),
        Setting::new("--verify-live-every-step", st.verify_live_every_step),
    ]
}

/// Agrees on what the flags resolved to on each rank: the load's shape (a trace file may differ
/// between nodes), the slots, the initial placement and the transport. Collective over `world`.
pub(crate) fn agree_on_shapes(
    world: &Comm,
    run_shape: &RunShape,
    load: &str,
    initial: &Placement,
    transport: TransportKind,
) -> Result<(), RunError> {
    let s = &run_shape.shape;
    let settings = vec![
        Setting::new(
            "the load's shape (layers x experts)",
            format!("{} x {}", run_shape.num_layers, run_shape.num_logical),
        ),
        Setting::new("the load", load),
        Setting::new("the slots (--num-redundant-experts)", s.num_replicas),
        Setting::new("the nodes (--ranks-per-node)", s.num_nodes),
        Setting::new("the initial placement (--init-placement)", format!("hash {:016x}", initial.hash())),
        Setting::new("the transport (--transport)", format!("{transport:?}").to_lowercase()),
    ];
    agree_on_settings(world, &settings).map_err(settings_error)
}

/// What identifies the load on every rank, without its path (a file may be mounted at different
/// places): the trace's format, dataset and steps, or the built-in load's parameters.
pub(crate) fn load_identity(source: &LoadSource) -> String {
    match source {
        LoadSource::Trace(t) => {
            format!(
                "{} steps of {}{}",
                t.num_steps(),
                t.format,
                t.dataset.as_ref().map(|d| format!(", dataset {d}")).unwrap_or_default()
            )
        }
        other => other.describe(),
    }
}

/// [`fail`] for an error only this rank saw (it ends the job and does not return); other errors
/// return, to be failed by every rank together.
pub(crate) fn end_if_local(world: &Comm, report: &ReportHandle, e: &RunError) {
    if e.is_local() && world.size() > 1 {
        fail(world, report, e);
    }
}

/// The end of a failed run on this rank: the message (rank 0 prints the errors every rank
/// shares, a rank prints its own local error), the failed report if the loop did not write it
/// (rank 0), then, for an error only this rank saw (a failed MPI call, a timeout), `MPI_Abort`
/// of the whole job, since the others may be waiting for this rank. Other errors are shared by
/// every rank: all meet in a barrier, so that no rank exits before rank 0 printed the message.
pub fn fail(world: &Comm, report: &ReportHandle, e: &RunError) {
    let rank = world.rank();
    let local = e.is_local() && world.size() > 1;
    if local || (rank != 0 && e.printed_by(rank)) {
        eprintln!("eplb-worker run: rank {rank}: error: {e}");
    } else if e.printed_by(rank) {
        eprintln!("eplb-worker run: error: {e}");
    }
    if !report.finished.get() {
        let _ = report.finish(json!({ "world_size": world.size() }), Some(&e.to_string()));
    }
    if local && rank != 0 && !e.is_timeout() {
        report.finish_for_rank_0(world.size(), e);
    }
    if local {
        if rank != 0 && e.is_timeout() {
            std::thread::sleep(REPORT_GRACE);
        }
        world.abort(e.exit_code())
    }
    let _ = world.barrier();
}

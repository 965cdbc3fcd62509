//! The validated configuration of `eplb-worker run`: [`RunArgs`] (the flags, as clap parsed them)
//! becomes a [`RunConfig`] once, at the edge, as ripgrep's `LowArgs` become `HiArgs`. Nothing
//! downstream sees a flag: set-up, safety, the output, the report and the loop each take the part
//! of the config they need ([`EngineConfig`], [`PlacementConfig`], the manager's flags,
//! [`StoreConfig`], [`OutputConfig`], [`Faults`]).
//!
//! [`RunConfig::new`] checks what the flags alone can say (no topology, no file read): flags that
//! do not apply to the engine, sizes of 0, an expert size the stores cannot hold. Its errors are
//! bad input (exit 2) and name the flag. What needs the world or a file (the slots against the
//! ranks, a trace's shape) is checked in set-up, with every rank agreeing.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::args::{EngineKind, Fault, RunArgs, TransportKind};
use super::RunError;
use crate::engine::shm::BalancePhase;
use crate::executor::factory::StoreFaults;
use crate::gpu::store::NcclTuning;
use crate::manager::fault::ManagerFaults;
use crate::manager::ManagerArgs;

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub(crate) struct RunConfig {
    pub engine: EngineConfig,
    pub placement: PlacementConfig,
    /// The manager's and the policy's flags (shared with `simulate`; the manager validates and
    /// converts them itself, once the layers and the expert size are known).
    pub manager: ManagerArgs,
    pub store: StoreConfig,
    /// `--timeout`: the longest a rank waits for the others.
    pub timeout: Duration,
    pub output: OutputConfig,
    pub faults: Faults,
}

/// The engine and the load it replays.
#[derive(Debug, Clone)]
pub(crate) struct EngineConfig {
    pub kind: EngineKind,
    /// shm: which steps are balanced; how long to wait for the region; when a heartbeat is stale.
    pub balance_phase: BalancePhase,
    pub wait: Duration,
    pub heartbeat_timeout: Duration,
    /// The synthetic engine's load: a trace (and its dataset), or the built-in drifting load.
    pub trace: Option<PathBuf>,
    pub trace_dataset: Option<String>,
    /// `--num-layers`, `--num-experts` as given (at least 1 when given).
    pub num_layers: Option<usize>,
    pub num_experts: Option<usize>,
    /// Bytes of one expert (synthetic engine: a positive multiple of 8).
    pub expert_bytes: usize,
    pub steps: usize,
    pub drift_steps: u64,
    pub seed: u64,
}

/// The slots, the groups and the initial placement.
#[derive(Debug, Clone)]
pub(crate) struct PlacementConfig {
    pub num_redundant_experts: Option<usize>,
    /// xLLM's spelling: extra slots per rank.
    pub redundant_experts_num: Option<usize>,
    pub num_groups: usize,
    pub ep_size: Option<usize>,
    /// Accepted for xLLM and ignored (logged).
    pub expert_parallel_degree: Option<i64>,
    pub ranks_per_node: Option<usize>,
    pub init_placement: Option<PathBuf>,
}

/// How the weights move and are checked.
#[derive(Debug, Clone)]
pub(crate) struct StoreConfig {
    pub transport: TransportKind,
    /// The host transport's largest message.
    pub chunk_bytes: usize,
    /// The NCCL flags as given (MiB), for the settings agreement; [`StoreConfig::tuning`] in bytes.
    pub nccl_group_mib: f64,
    pub nccl_chunk_mib: f64,
    pub nccl_register: bool,
    pub verify_live_every_step: bool,
    /// `--force-moves N`.
    pub force_moves: Option<u64>,
}

impl StoreConfig {
    /// The NCCL transport's tuning in bytes.
    pub(crate) fn tuning(&self) -> NcclTuning {
        NcclTuning::from_mib(self.nccl_group_mib, self.nccl_chunk_mib, self.nccl_register)
    }
}

/// What rank 0 writes and serves.
#[derive(Debug, Clone)]
pub struct OutputConfig {
    /// `--report FILE`.
    pub report: Option<PathBuf>,
    /// `--metrics-port` and its companions.
    pub metrics: Option<MetricsConfig>,
    /// The inputs an output must never be: `(flag, path)` of `--trace` and `--init-placement`.
    pub inputs: Vec<(&'static str, PathBuf)>,
}

/// The Prometheus endpoint of rank 0.
#[derive(Debug, Clone, Copy)]
pub struct MetricsConfig {
    pub port: u16,
    pub bind: IpAddr,
    /// How long the final values stay up after the run.
    pub linger: Duration,
}

/// The faults to inject (tests), by kind: whether rank `rank` is asked for each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Faults {
    list: Vec<Fault>,
}

impl Faults {
    pub fn new(list: Vec<Fault>) -> Faults {
        Faults { list }
    }

    /// The manager decorators rank `rank` asks for: it perturbs its copy of the all-reduced load,
    /// or panics at its first decision ([`crate::manager::fault`]).
    pub fn manager(&self, rank: usize) -> ManagerFaults {
        ManagerFaults {
            rank,
            corrupt_load: self.list.contains(&Fault::CorruptLoad(rank)),
            panic: self.list.contains(&Fault::Panic(rank)),
        }
    }

    /// The store decorators rank `rank` asks the executor factory for.
    pub fn store(&self, rank: usize) -> StoreFaults {
        StoreFaults {
            corrupt_next_stage: self.list.contains(&Fault::CorruptTransfer(rank)),
            hang_in_stage: self.list.contains(&Fault::HangTransfer(rank)),
        }
    }
}

impl RunConfig {
    /// Validates `args` (see the module documentation); errors are bad input and name the flag.
    pub fn new(args: &RunArgs) -> Result<RunConfig, RunError> {
        let shm = matches!(args.engine, EngineKind::Shm(_));
        if shm {
            let given = [
                ("--trace", args.trace.is_some()),
                ("--init-placement", args.init_placement.is_some()),
                ("--fault corrupt-load-on-rank", args.fault.iter().any(|f| matches!(f, Fault::CorruptLoad(_)))),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, on)| *on) {
                return Err(RunError::Config(format!(
                    "{flag} does not apply to --engine shm: the engine brings its own load, placement and weights"
                )));
            }
        }
        for (flag, given) in [("--num-layers", args.num_layers), ("--num-experts", args.num_experts)] {
            if given == Some(0) {
                return Err(RunError::Config(format!("{flag} must be at least 1")));
            }
        }
        if !shm && (args.expert_bytes == 0 || !args.expert_bytes.is_multiple_of(8)) {
            return Err(RunError::Config(format!(
                "--expert-bytes {} is not a positive multiple of 8 (the weights are checked in 8-byte words)",
                args.expert_bytes
            )));
        }
        let inputs = [("--trace", &args.trace), ("--init-placement", &args.init_placement)]
            .into_iter()
            .filter_map(|(flag, p)| p.clone().map(|p| (flag, p)))
            .collect();
        Ok(RunConfig {
            engine: EngineConfig {
                kind: args.engine.clone(),
                balance_phase: args.balance_phase,
                wait: Duration::from_secs_f64(args.engine_wait),
                heartbeat_timeout: Duration::from_secs_f64(args.engine_timeout),
                trace: args.trace.clone(),
                trace_dataset: args.trace_dataset.clone(),
                num_layers: args.num_layers,
                num_experts: args.num_experts,
                expert_bytes: args.expert_bytes,
                steps: args.steps,
                drift_steps: args.drift_steps,
                seed: args.seed,
            },
            placement: PlacementConfig {
                num_redundant_experts: args.num_redundant_experts,
                redundant_experts_num: args.redundant_experts_num,
                num_groups: args.num_groups,
                ep_size: args.ep_size,
                expert_parallel_degree: args.expert_parallel_degree,
                ranks_per_node: args.ranks_per_node,
                init_placement: args.init_placement.clone(),
            },
            manager: args.manager.clone(),
            store: StoreConfig {
                transport: args.transport,
                chunk_bytes: args.chunk_bytes,
                nccl_group_mib: args.nccl_group_mib,
                nccl_chunk_mib: args.nccl_chunk_mib,
                nccl_register: args.nccl_register,
                verify_live_every_step: args.verify_live_every_step,
                force_moves: args.force_moves,
            },
            timeout: Duration::from_secs_f64(args.timeout),
            output: OutputConfig {
                report: args.report.clone(),
                metrics: args.metrics_port.map(|port| MetricsConfig {
                    port,
                    bind: args.metrics_bind,
                    linger: Duration::from_secs_f64(args.metrics_linger),
                }),
                inputs,
            },
            faults: Faults::new(args.fault.clone()),
        })
    }
}

/// Parses `run`'s flags and validates them (tests).
#[cfg(test)]
pub(crate) fn parse_config(flags: &[&str]) -> Result<RunConfig, RunError> {
    let args = super::args::parse_run_args(flags).map_err(|e| RunError::Config(e.to_string()))?;
    RunConfig::new(&args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::Failure;

    fn refused(flags: &[&str], want: &str) {
        let e = parse_config(flags).unwrap_err();
        assert!(e.to_string().contains(want) && e.exit_code() == 2, "{flags:?}: {e}");
    }

    #[test]
    fn flags_that_cannot_work_are_refused_at_the_edge_naming_the_flag() {
        refused(&["--engine", "shm:x", "--trace", "t.csv"], "--trace does not apply to --engine shm");
        refused(&["--engine", "shm:x", "--init-placement", "p.json"], "--init-placement does not apply");
        refused(&["--engine", "shm:x", "--fault", "corrupt-load-on-rank=0"], "--fault corrupt-load-on-rank does");
        refused(&["--num-layers", "0"], "--num-layers must be at least 1");
        refused(&["--num-experts", "0"], "--num-experts must be at least 1");
        refused(&["--expert-bytes", "12"], "--expert-bytes 12 is not a positive multiple of 8");
        refused(&["--expert-bytes", "0"], "--expert-bytes 0");
        // The shm engine brings its own expert size: the flag's default is not checked there.
        assert!(parse_config(&["--engine", "shm:x", "--expert-bytes", "12"]).is_ok());
    }

    #[test]
    fn the_config_holds_what_the_flags_said_in_the_units_downstream_uses() {
        let c = parse_config(&[
            "--timeout",
            "2.5",
            "--metrics-port",
            "0",
            "--metrics-linger",
            "1.5",
            "--trace",
            "t.csv",
            "--nccl-group-mib",
            "2",
            "--fault",
            "corrupt-transfer-on-rank=1",
            "--fault",
            "panic-on-rank=0",
        ])
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(2500));
        let m = c.output.metrics.unwrap();
        assert_eq!((m.port, m.linger, m.bind.to_string()), (0, Duration::from_millis(1500), "127.0.0.1".into()));
        assert_eq!(c.output.inputs, vec![("--trace", PathBuf::from("t.csv"))]);
        assert_eq!(c.store.tuning().group_bytes, 2 << 20);
        let f = &c.faults;
        assert!(f.store(1).corrupt_next_stage && !f.store(0).corrupt_next_stage && !f.store(1).hang_in_stage);
        assert!(f.manager(0).panic && !f.manager(1).panic && !f.manager(0).corrupt_load && f.manager(0).rank == 0);
        assert!(!f.manager(1).any() && !f.store(0).any());
        assert!(parse_config(&[]).unwrap().output.metrics.is_none());
    }
}

//! Arguments of `eplb-worker run`, with xLLM's gflag spellings as aliases.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::collective::host::DEFAULT_CHUNK_BYTES;
use crate::engine::shm::BalancePhase;
use crate::manager::ManagerArgs;

/// The inference job the balancer runs beside: `synthetic` or `shm:NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineKind {
    /// Expert weights whose bytes are a pure function of (layer, expert, offset), and per-slot
    /// token counts from --trace or the built-in drifting zipf-like load.
    Synthetic,
    /// A real engine's shared-memory regions named NAME (docs/engine-contract.md): rank r attaches
    /// to engine rank r's region.
    Shm(String),
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineKind::Synthetic => write!(f, "synthetic"),
            EngineKind::Shm(name) => write!(f, "shm:{name}"),
        }
    }
}

/// Parses `synthetic` or `shm:NAME` (NAME: letters, digits, `_`, `-`, `.`).
pub fn parse_engine(s: &str) -> Result<EngineKind, String> {
    match s.split_once(':') {
        None if s == "synthetic" => Ok(EngineKind::Synthetic),
        Some(("shm", name))
            if !name.is_empty()
                && name.len() <= 200
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                && !name.starts_with('.') =>
        {
            Ok(EngineKind::Shm(name.to_string()))
        }
        Some(("shm", name)) => {
            Err(format!("{name:?} is not a region name: use letters, digits, '_', '-' and '.' (not first)"))
        }
        _ => Err(format!("unknown engine {s:?}; known: synthetic, shm:NAME")),
    }
}

/// How expert weights move between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportKind {
    /// Host memory and non-blocking MPI point-to-point.
    Host,
    /// GPU memory and NCCL, one GPU per rank (its local rank's, or the only one visible).
    Nccl,
    /// NCCL when every rank has a GPU and the CUDA and NCCL libraries load, else host.
    Auto,
}

/// A fault to inject, for tests: `corrupt-load-on-rank=R`, `corrupt-transfer-on-rank=R`,
/// `hang-transfer-on-rank=R` or `panic-on-rank=R`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Rank R perturbs its copy of the all-reduced load: the plan hashes differ.
    CorruptLoad(usize),
    /// Rank R flips a byte of its first staged slot: the verification fails.
    CorruptTransfer(usize),
    /// Rank R hangs (sleeps for good, as a stuck or descheduled process would) where its first
    /// migration starts: its peers' transfer waits must time out (`--timeout`) and end the job.
    HangTransfer(usize),
    /// Rank R panics at its manager's first decision (a round, or a step of the time mode), before
    /// the plan agreement (a bug): the panic hook must end the job with exit code 1, never 101
    /// or a hang.
    Panic(usize),
}

/// Parses `KIND=RANK`, one of the kinds of [`Fault`].
pub fn parse_fault(s: &str) -> Result<Fault, String> {
    let (kind, rank) = s.split_once('=').ok_or_else(|| format!("expected KIND=RANK, got {s:?}"))?;
    let rank: usize = rank.parse().map_err(|_| format!("{rank:?} is not a rank"))?;
    match kind {
        "corrupt-load-on-rank" => Ok(Fault::CorruptLoad(rank)),
        "corrupt-transfer-on-rank" => Ok(Fault::CorruptTransfer(rank)),
        "hang-transfer-on-rank" => Ok(Fault::HangTransfer(rank)),
        "panic-on-rank" => Ok(Fault::Panic(rank)),
        _ => Err(format!(
            "unknown fault {kind:?}; known: corrupt-load-on-rank, corrupt-transfer-on-rank, hang-transfer-on-rank, \
             panic-on-rank"
        )),
    }
}

/// Seconds, 0 or more (at most a day).
fn non_negative_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=86400.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0 to 86400")),
    }
}

/// Arguments of `eplb-worker run`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Example (4 ranks, the built-in drifting load, default manager: decisions in time):\n  \
    mpirun -n 4 --oversubscribe eplb-worker run\n\n\
    xLLM's gflags are accepted as they are, e.g. --enable_eplb=true --ep_size=16 \
    --eplb_update_interval=2000 --eplb_update_threshold=0.9 --redundant_experts_num=1")]
pub struct RunArgs {
    /// The inference job: `synthetic` (built-in), or `shm:NAME`, a real engine's shared-memory
    /// regions (docs/engine-contract.md).
    #[arg(long, value_name = "synthetic|shm:NAME", default_value = "synthetic", value_parser = parse_engine,
          help_heading = "Engine")]
    pub engine: EngineKind,
    /// shm engine: which steps the balancer plans on (mixed steps count for prefill and decode).
    #[arg(long, value_enum, default_value_t = BalancePhase::All, help_heading = "Engine")]
    pub balance_phase: BalancePhase,
    /// shm engine: seconds to wait for the engine's region to appear.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0, value_parser = crate::limits::seconds, help_heading = "Engine")]
    pub engine_wait: f64,
    /// shm engine: an engine whose heartbeat is older than this is stopped or hung (exit 1).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = crate::limits::seconds, help_heading = "Engine")]
    pub engine_timeout: f64,
    /// Replay this load file, one step per iteration, wrapping around (the `plan` formats and the
    /// per-iteration CSV). Default: the built-in drifting zipf-like load.
    #[arg(long, value_name = "FILE", help_heading = "Engine")]
    pub trace: Option<PathBuf>,
    /// Per-iteration CSV: the dataset to replay (default: the first in the file).
    #[arg(long, value_name = "NAME", requires = "trace", help_heading = "Engine")]
    pub trace_dataset: Option<String>,
    /// MoE layers of the built-in load (default 8; a trace gives its own).
    #[arg(long, value_name = "L", help_heading = "Engine")]
    pub num_layers: Option<usize>,
    /// E: logical experts a layer of the built-in load (default 64; a trace gives its own).
    #[arg(long, value_name = "E", help_heading = "Engine")]
    pub num_experts: Option<usize>,
    /// Bytes of one expert's weights (a multiple of 8).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20, help_heading = "Engine")]
    pub expert_bytes: usize,
    /// Steps to run.
    #[arg(long, default_value_t = 100, help_heading = "Engine")]
    pub steps: usize,
    /// Built-in load: steps for one set of hot experts to give way to the next.
    #[arg(long, value_name = "STEPS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Engine")]
    pub drift_steps: u64,
    /// Seed of the built-in load.
    #[arg(long, default_value_t = 0, help_heading = "Engine")]
    pub seed: u64,

    /// Extra physical slots over all ranks (R = E + N, a multiple of the world size). Default:
    /// one a rank, rounded up so that the slots divide over the ranks.
    #[arg(long, value_name = "N", alias = "num_redundant_experts", help_heading = "Placement")]
    pub num_redundant_experts: Option<usize>,
    /// xLLM's --redundant_experts_num: extra slots per rank (R = E + N * world size).
    #[arg(
        long,
        value_name = "N",
        alias = "redundant_experts_num",
        conflicts_with = "num_redundant_experts",
        help_heading = "Placement"
    )]
    pub redundant_experts_num: Option<usize>,
    /// K: expert groups; with K a multiple of the nodes, the policy keeps each group in one node.
    #[arg(long, value_name = "K", default_value_t = 1, alias = "num_groups", help_heading = "Placement")]
    pub num_groups: usize,
    /// The expert-parallel size; if given, it must equal the number of ranks.
    #[arg(long, value_name = "N", alias = "ep_size", help_heading = "Placement")]
    pub ep_size: Option<usize>,
    /// Accepted for xLLM compatibility and ignored: every rank here is one expert-parallel rank.
    #[arg(long, value_name = "D", alias = "expert_parallel_degree", hide = true)]
    pub expert_parallel_degree: Option<i64>,
    /// Fake nodes of P consecutive ranks on one host (default: nodes from MPI's shared-memory split).
    #[arg(long, value_name = "P", help_heading = "Placement")]
    pub ranks_per_node: Option<usize>,
    /// The initial placement: a placement file (`plan --output`, SGLang's --init-expert-location
    /// JSON). Default: the trivial placement, slot s holds expert s mod E.
    #[arg(long, value_name = "FILE", help_heading = "Placement")]
    pub init_placement: Option<PathBuf>,
    /// The manager's and the policy's flags (shared with `simulate`).
    #[command(flatten)]
    pub manager: ManagerArgs,

    /// How expert weights move.
    #[arg(long, value_enum, default_value_t = TransportKind::Auto, help_heading = "Executor")]
    pub transport: TransportKind,
    /// Largest MPI message of the host transport.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CHUNK_BYTES,
          value_parser = clap::value_parser!(usize), help_heading = "Executor")]
    pub chunk_bytes: usize,
    /// NCCL transport: average bytes one rank moves per NCCL group (the layer's transfers are cut
    /// into groups, the same cut on every rank).
    #[arg(long, value_name = "MIB", default_value_t = 1024.0, value_parser = crate::limits::positive,
          help_heading = "Executor")]
    pub nccl_group_mib: f64,
    /// NCCL transport: largest piece of one expert inside a group (0: whole experts).
    #[arg(long, value_name = "MIB", default_value_t = 0.0, value_parser = crate::limits::non_negative,
          help_heading = "Executor")]
    pub nccl_chunk_mib: f64,
    /// NCCL transport: register the weight buffers with NCCL (zero-copy send/recv on NVLink).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL", help_heading = "Executor")]
    pub nccl_register: bool,
    /// Every step, every rank checks all its live expert weights (slow; for tests).
    #[arg(long, help_heading = "Executor")]
    pub verify_live_every_step: bool,
    /// Benchmark mode: every N steps, force a new placement of one layer (the layers in turn)
    /// inside each rank (its slots rotated, and every other time one redundant replica replaced
    /// by another expert; every expert stays present), staged, verified and applied through the
    /// normal protocol. For measuring moves where balance cannot cause any (one GPU, one engine
    /// rank). Off by default.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Executor")]
    pub force_moves: Option<u64>,

    /// The longest a rank waits for the others in a collective, a transfer or a commit; past it,
    /// the rank names the ranks that did not answer and ends the job (exit 1).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::collective::watchdog::DEFAULT_TIMEOUT_SECONDS,
          value_parser = crate::limits::seconds, help_heading = "Executor")]
    pub timeout: f64,

    /// Write a JSON report (rank 0): "status" is "running" from the start, then "ok", or
    /// "failed" with "error".
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub report: Option<PathBuf>,
    /// Rank 0 serves Prometheus metrics at http://BIND:PORT/metrics while the run goes (0: any
    /// free port; the header prints the address).
    #[arg(long, value_name = "PORT", help_heading = "Output")]
    pub metrics_port: Option<u16>,
    /// The address the metrics listen on: loopback unless opened (e.g. 0.0.0.0 for a Prometheus
    /// on another host).
    #[arg(long, value_name = "IP", default_value = "127.0.0.1", requires = "metrics_port", help_heading = "Output")]
    pub metrics_bind: std::net::IpAddr,
    /// Keep serving the final metrics this many seconds after the run (a scrape of a short run).
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0, value_parser = non_negative_seconds,
          requires = "metrics_port", help_heading = "Output")]
    pub metrics_linger: f64,
    /// Fault injection for tests: corrupt-load-on-rank=R, corrupt-transfer-on-rank=R,
    /// hang-transfer-on-rank=R, panic-on-rank=R.
    #[arg(long, value_name = "KIND=RANK", value_parser = parse_fault, hide = true)]
    pub fault: Vec<Fault>,
}

/// Parses `run`'s flags alone (tests).
#[cfg(test)]
pub(crate) fn parse_run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
    use clap::Parser;
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }
    Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|c| c.run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        parse_run_args(args)
    }

    #[test]
    fn xllm_gflags_parse_as_they_are() {
        let a = parse(&[
            "--enable_eplb=true",
            "--expert_parallel_degree=2",
            "--ep_size=16",
            "--eplb_update_interval=2000",
            "--eplb_update_threshold=0.9",
            "--redundant_experts_num=1",
        ])
        .unwrap();
        let m = &a.manager;
        assert!(m.enable_eplb);
        assert_eq!((a.ep_size, m.eplb_update_interval, m.eplb_update_threshold), (Some(16), Some(2000.0), Some(0.9)));
        assert_eq!(a.redundant_experts_num, Some(1));
        assert!(!parse(&["--enable_eplb=false"]).unwrap().manager.enable_eplb);
        assert!(parse(&["--enable-eplb"]).unwrap().manager.enable_eplb);
        // xLLM's flags select its rounds, with xLLM's defaults for the ones not given.
        let c = m.config(2, 1 << 20, 20.0, 200.0);
        let crate::manager::Mode::Rounds(r) = c.mode else { panic!("xLLM flags select rounds") };
        assert_eq!((r.interval, r.threshold), (crate::manager::Interval::Seconds(2000.0), 0.9));
        let only_interval = parse(&["--eplb_update_interval=5"]).unwrap().manager.config(2, 1 << 20, 20.0, 200.0);
        let crate::manager::Mode::Rounds(r) = only_interval.mode else { panic!("rounds") };
        assert_eq!((r.threshold, r.min_improvement, r.window_steps), (1.0, 0.05, 10));
        let d = parse(&[]).unwrap();
        assert!(d.manager.enable_eplb && !d.manager.rounds() && d.transport == TransportKind::Auto);
        assert_eq!(d.manager.config(2, 1 << 20, 20.0, 200.0).mode, crate::manager::Mode::Time);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&["--eplb-update-threshold", "1.5"]).is_err());
        assert!(parse(&["--eplb-min-improvement", "-0.1"]).is_err());
        assert!(parse(&["--eplb-update-interval", "0"]).is_err());
        assert!(parse(&["--eplb-update-interval-steps", "0"]).is_err());
        assert!(parse(&["--num-redundant-experts", "4", "--redundant_experts_num", "1"]).is_err());
        assert!(parse(&["--trace-dataset", "wikitext"]).is_err(), "a dataset needs a trace");
        assert_eq!(parse(&["--fault", "corrupt-load-on-rank=3"]).unwrap().fault, vec![Fault::CorruptLoad(3)]);
        assert!(parse(&["--fault", "corrupt-everything=1"]).is_err());
        // Every float flag is finite and in its range (issue 12): nan/inf never act as a default.
        for bad in [
            &["--move-cost", "nan"][..],
            &["--move-cost", "inf"],
            &["--move-cost=-1"],
            &["--nccl-group-mib", "inf"],
            &["--nccl-chunk-mib", "nan"],
            &["--eplb-update-interval", "inf"],
            &["--eplb-update-threshold", "nan"],
            &["--timeout", "0"],
            &["--timeout", "nan"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse(&[]).unwrap().timeout, 120.0);
        assert_eq!(parse(&["--timeout", "2.5"]).unwrap().timeout, 2.5);
        assert_eq!(parse(&["--fault", "panic-on-rank=1"]).unwrap().fault, vec![Fault::Panic(1)]);
        assert_eq!(parse(&["--fault", "hang-transfer-on-rank=2"]).unwrap().fault, vec![Fault::HangTransfer(2)]);
        assert!(parse(&["--engine", "vllm"]).is_err());
        assert_eq!(parse(&["--step-ms", "50"]).unwrap().manager.step_ms, Some(50.0));
        assert!(parse(&["--metrics-port", "70000"]).is_err());
        assert!(parse(&["--metrics-bind", "0.0.0.0"]).is_err(), "a bind needs a port");
        let m = parse(&["--metrics-port", "9400"]).unwrap();
        assert_eq!(
            (m.metrics_port, m.metrics_bind.to_string(), m.metrics_linger),
            (Some(9400), "127.0.0.1".into(), 0.0)
        );
        assert!(parse(&["--metrics-port", "0", "--metrics-linger", "-3"]).is_err());
        assert!(parse(&["--engine", "shm:"]).is_err());
        assert!(parse(&["--engine", "shm:../etc"]).is_err());
    }

    #[test]
    fn engines_parse() {
        assert_eq!(parse(&[]).unwrap().engine, EngineKind::Synthetic);
        assert_eq!(parse(&["--engine", "synthetic"]).unwrap().engine, EngineKind::Synthetic);
        let shm = parse(&["--engine", "shm:demo-1"]).unwrap().engine;
        assert_eq!((shm.clone(), shm.to_string()), (EngineKind::Shm("demo-1".into()), "shm:demo-1".into()));
    }
}

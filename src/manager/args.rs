//! The Manager's and the Policy's flags, shared by `run` and `simulate` (one definition, so that a
//! simulation replays exactly what `run` would decide). xLLM's gflag spellings are aliases.

use clap::{ArgAction, Args};

use super::{CostModel, Interval, ManagerConfig, Measure, Mode, Rounds};
use crate::limits::{non_negative, positive, unit_interval};
use crate::policy::{PolicyConfig, PolicyKind, Price};

/// xLLM's round-based manager: its defaults when any of its flags is given.
pub const XLLM_INTERVAL_SECONDS: f64 = 1000.0;
pub const XLLM_THRESHOLD: f64 = 1.0;
pub const ROUNDS_MIN_IMPROVEMENT: f64 = 0.05;
pub const ROUNDS_WINDOW_STEPS: u64 = 10;

/// The Manager's and the Policy's flags.
#[derive(Debug, Clone, Args)]
pub struct ManagerArgs {
    /// Rebalance (true) or only observe (false).
    #[arg(long, alias = "enable_eplb", action = ArgAction::Set, num_args = 0..=1, default_value_t = true,
          default_missing_value = "true", value_name = "BOOL", help_heading = "Manager")]
    pub enable_eplb: bool,
    /// Balanced MoE time of one step, all layers, in ms (the cost model; default: run 20, simulate
    /// 60 s over the trace's steps, the competition's). Without it, `run` measures it when the
    /// engine reports its steps' MoE times (docs/engine-contract.md). When given to `run`, it also
    /// paces the synthetic engine: each step lasts at least this long.
    #[arg(long, value_name = "MS", value_parser = crate::limits::milliseconds, help_heading = "Manager")]
    pub step_ms: Option<f64>,
    /// Migration bandwidth per GPU in GB/s (10^9 bytes/s), the cost of a changed slot (default:
    /// run 200, simulate 900, the competition's).
    #[arg(long, value_name = "GBPS", value_parser = positive, help_heading = "Manager")]
    pub migration_gbps: Option<f64>,
    /// `run`: measure what a changed slot costs from the executor's own migrations (the slowest
    /// rank's time to transfer a layer's experts into staging, over the layer's changed slots, a
    /// running mean) instead of --migration-gbps, which holds until the first migration.
    #[arg(long, help_heading = "Manager")]
    pub measure_migration: bool,
    /// Layers switched per step, so that no step stalls long (0: all at once).
    #[arg(long, value_name = "L", alias = "eplb_layers_per_step", default_value_t = 1, help_heading = "Manager")]
    pub eplb_layers_per_step: usize,
    /// xLLM rounds: seconds between rounds (rank 0's clock, acted on by every rank at the same
    /// step). Giving any xLLM round flag selects the round-based manager.
    #[arg(long, value_name = "SECONDS", alias = "eplb_update_interval", value_parser = crate::limits::seconds,
          help_heading = "Manager (xLLM rounds)")]
    pub eplb_update_interval: Option<f64>,
    /// xLLM rounds: steps between rounds instead of seconds (deterministic runs and tests).
    #[arg(long, value_name = "N", alias = "eplb_update_interval_steps",
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Manager (xLLM rounds)")]
    pub eplb_update_interval_steps: Option<u64>,
    /// xLLM rounds: update a layer only when the cosine similarity of its load with the load of
    /// its last update is below T (0..=1; default 1).
    #[arg(long, value_name = "T", alias = "eplb_update_threshold", value_parser = unit_interval,
          help_heading = "Manager (xLLM rounds)")]
    pub eplb_update_threshold: Option<f64>,
    /// xLLM rounds: skip a layer whose predicted peak GPU load drops by less than this fraction
    /// (0..=1; default 0.05).
    #[arg(long, value_name = "X", aliases = ["eplb_min_improvement", "eplb_min_peak_load_improvement"],
          value_parser = unit_interval, help_heading = "Manager (xLLM rounds)")]
    pub eplb_min_improvement: Option<f64>,
    /// xLLM rounds: steps of load summed in the sliding window the policy plans on (default 10).
    #[arg(long, value_name = "W", alias = "eplb_window_steps",
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Manager (xLLM rounds)")]
    pub eplb_window_steps: Option<u64>,

    /// Placement algorithm.
    #[arg(long, value_parser = PolicyKind::value_parser(), default_value = "incremental", help_heading = "Placement")]
    pub policy: PolicyKind,
    /// Incremental policy: a fixed price of one moved copy, as a fraction of the mean GPU load
    /// (default: from the cost model, the copy's time over the change's expected lifetime).
    #[arg(long, value_name = "FRACTION", value_parser = non_negative, help_heading = "Placement")]
    pub move_cost: Option<f64>,
    /// Policy threads over layers on every rank (0: one per core).
    #[arg(long, default_value_t = 1, help_heading = "Placement")]
    pub threads: usize,
}

impl ManagerArgs {
    /// Whether an xLLM round flag was given (the round-based manager).
    pub fn rounds(&self) -> bool {
        self.eplb_update_interval.is_some()
            || self.eplb_update_interval_steps.is_some()
            || self.eplb_update_threshold.is_some()
            || self.eplb_min_improvement.is_some()
            || self.eplb_window_steps.is_some()
    }

    /// The manager's configuration for `layers` layers, with the caller's defaults of the cost
    /// model (`step_ms`, `migration_gbps`) and the expert size.
    pub fn config(&self, layers: usize, expert_bytes: u64, default_step_ms: f64, default_gbps: f64) -> ManagerConfig {
        let mode = if self.rounds() {
            Mode::Rounds(Rounds {
                interval: match self.eplb_update_interval_steps {
                    Some(n) => Interval::Steps(n as usize),
                    None => Interval::Seconds(self.eplb_update_interval.unwrap_or(XLLM_INTERVAL_SECONDS)),
                },
                threshold: self.eplb_update_threshold.unwrap_or(XLLM_THRESHOLD),
                min_improvement: self.eplb_min_improvement.unwrap_or(ROUNDS_MIN_IMPROVEMENT),
                window_steps: self.eplb_window_steps.unwrap_or(ROUNDS_WINDOW_STEPS) as usize,
            })
        } else {
            Mode::Time
        };
        ManagerConfig {
            enable: self.enable_eplb,
            layers_per_step: self.eplb_layers_per_step,
            mode,
            cost: CostModel::new(
                self.step_ms.unwrap_or(default_step_ms),
                layers,
                expert_bytes,
                self.migration_gbps.unwrap_or(default_gbps),
            ),
            move_cost: self.move_cost,
            measure: Measure { step_time: self.step_ms.is_none(), migration: self.measure_migration },
        }
    }

    /// The policy's configuration (its price per copy is set by the manager at each decision).
    pub fn policy_config(&self) -> PolicyConfig {
        PolicyConfig {
            kind: self.policy,
            threads: self.threads,
            move_cost: self.move_cost.map_or(crate::policy::incremental::DEFAULT_PRICE, Price::from_fraction),
        }
    }
}

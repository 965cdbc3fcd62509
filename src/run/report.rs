//! The JSON report of `run` (`--report FILE`, written by rank 0) and the final summary.

use serde::Serialize;

use crate::engine::Engine;
use crate::policy::{PlacementShape, PolicyKind};
use crate::rank::Topology;

/// One rebalance round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRow {
    pub step: usize,
    pub changed: usize,
    pub similar: usize,
    pub small_gain: usize,
    /// The layers selected, in migration order.
    pub selected: Vec<usize>,
    pub plan_hash: String,
}

/// One migrated layer (a row of the table).
#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    pub step: usize,
    pub layer: usize,
    pub experts_moved: usize,
    pub bytes: u64,
    pub local_copies: usize,
    pub seconds: f64,
    pub gbps: f64,
    pub wrong_bytes: u64,
    /// The engine step from which the engine uses the layer's new placement (shm engines; the
    /// synthetic engine's commit is live from the next step).
    pub apply_step: Option<u64>,
}

/// Median, 90th percentile and mean of per-step times, in µs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TimeStats {
    pub count: usize,
    pub median_us: f64,
    pub p90_us: f64,
    pub mean_us: f64,
}

impl TimeStats {
    pub fn of(samples: &[f64]) -> TimeStats {
        if samples.is_empty() {
            return TimeStats::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        TimeStats {
            count: s.len(),
            median_us: s[s.len() / 2],
            p90_us: s[(s.len() * 9 / 10).min(s.len() - 1)],
            mean_us: s.iter().sum::<f64>() / s.len() as f64,
        }
    }
}

/// The manager's cost per step: for each step, the minimum over ranks (the rank that arrived
/// last, which did not wait for the others), then statistics over steps.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ManagerTimes {
    /// Steps without a round (every step in the time mode): the load all-reduce plus estimate, decision and agreement.
    pub step: TimeStats,
    /// The load all-reduce alone, on the same steps.
    pub allreduce: TimeStats,
    /// Steps with a round: all-reduce, policy, selection and plan agreement.
    pub round: TimeStats,
}

/// What `run --report` writes.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub world_size: usize,
    pub num_nodes: usize,
    pub ranks_per_node: usize,
    pub num_layers: usize,
    pub num_logical: usize,
    pub num_replicas: usize,
    pub slots_per_rank: usize,
    pub num_groups: usize,
    pub expert_bytes: usize,
    pub policy: crate::policy::PolicyKind,
    pub transport: &'static str,
    /// The engine: `synthetic` or `shm:NAME`.
    pub engine: String,
    /// What drives the engine (the synthetic engine's load).
    pub load: String,
    /// Steps completed.
    pub steps: usize,
    /// Rounds that selected at least one layer.
    pub rebalances: usize,
    pub layers_updated: usize,
    pub experts_moved: u64,
    pub bytes_moved: u64,
    /// Staged bytes that failed verification (nothing was committed when > 0).
    pub wrong_bytes: u64,
    pub plans_agreed: bool,
    /// Mean over steps of the balancedness the initial placement would have had on that step's load.
    pub balancedness_static: f64,
    /// The same for the placement live at each step.
    pub balancedness_live: f64,
    pub migration_seconds: f64,
    pub migration_gbps: f64,
    /// Live bytes checked with --verify-live-every-step (all ranks, all steps), and the wrong ones.
    pub live_verified_bytes: u64,
    pub wrong_live_bytes: u64,
    /// Engine steps whose counts were lost before they were read (counted as zero), over all ranks.
    pub lost_steps: u64,
    /// Layer applies an engine cancelled on every rank (nothing changed; re-planned later).
    pub cancelled_applies: u64,
    /// Whether the engine's global tensors (never moved, never written by eplb) hash at the end
    /// as they did at attach, on every rank; `None` when the engine lists none.
    pub globals_unchanged: Option<bool>,
    /// Layers moved by `--force-moves` (counted in `layers_updated` too).
    pub forced_moves: u64,
    pub manager: ManagerTimes,
    /// The manager's cost model at the end: the balanced step time and the migration bandwidth,
    /// and how many measured samples each holds (0: the flag or the default).
    pub cost_model: Option<crate::manager::CostInputs>,
    pub final_placement_hash: String,
    pub rounds: Vec<RoundRow>,
    pub layers: Vec<LayerRow>,
    /// Balancedness per step (downsampled on long runs), for `plot`.
    pub series: crate::observe::Series,
    pub error: Option<String>,
}

impl Report {
    pub fn new(
        topo: &Topology,
        shape: &PlacementShape,
        num_layers: usize,
        num_logical: usize,
        policy: PolicyKind,
        engine: &dyn Engine,
    ) -> Report {
        Report {
            world_size: topo.world_size,
            num_nodes: topo.num_nodes,
            ranks_per_node: topo.local_size,
            num_layers,
            num_logical,
            num_replicas: shape.num_replicas,
            slots_per_rank: shape.slots_per_rank(),
            num_groups: shape.num_groups,
            expert_bytes: engine.store_ref().expert_bytes(),
            policy,
            transport: engine.store_ref().transport(),
            engine: engine.name(),
            load: engine.describe(),
            steps: 0,
            rebalances: 0,
            layers_updated: 0,
            experts_moved: 0,
            bytes_moved: 0,
            wrong_bytes: 0,
            plans_agreed: true,
            balancedness_static: 0.0,
            balancedness_live: 0.0,
            migration_seconds: 0.0,
            migration_gbps: 0.0,
            live_verified_bytes: 0,
            wrong_live_bytes: 0,
            lost_steps: 0,
            cancelled_applies: 0,
            globals_unchanged: None,
            forced_moves: 0,
            manager: ManagerTimes::default(),
            cost_model: None,
            final_placement_hash: String::new(),
            rounds: Vec::new(),
            layers: Vec::new(),
            series: crate::observe::Series::default(),
            error: None,
        }
    }

    pub(crate) fn set_manager_times(&mut self, step_us: &[f64], allreduce_us: &[f64], round_us: &[f64]) {
        self.manager = ManagerTimes {
            step: TimeStats::of(step_us),
            allreduce: TimeStats::of(allreduce_us),
            round: TimeStats::of(round_us),
        };
        self.migration_gbps =
            if self.migration_seconds > 0.0 { self.bytes_moved as f64 / self.migration_seconds / 1e9 } else { 0.0 };
    }

    /// The closing lines, nccl-tests style.
    pub fn summary(&self) -> String {
        let ok = |n: u64| if n == 0 { "OK" } else { "FAILED" };
        let mut s = format!(
            "#\n# steps {} | rebalances {} | layers updated {} | experts moved {} | bytes moved {}\n\
             # Out of bounds values : {} {}\n\
             # balancedness (mean over steps): static {:.4}, live {:.4}\n\
             # migration {:.3} s, {:.3} GB/s | manager a step: median {:.1} us (all-reduce {:.1} us), a round {:.1} us\n",
            self.steps,
            self.rebalances,
            self.layers_updated,
            self.experts_moved,
            self.bytes_moved,
            self.wrong_bytes,
            ok(self.wrong_bytes),
            self.balancedness_static,
            self.balancedness_live,
            self.migration_seconds,
            self.migration_gbps,
            self.manager.step.median_us,
            self.manager.allreduce.median_us,
            self.manager.round.mean_us,
        );
        if self.live_verified_bytes > 0 || self.wrong_live_bytes > 0 {
            s += &format!(
                "# live weights verified every step: {} bytes, {} wrong {}\n",
                self.live_verified_bytes,
                self.wrong_live_bytes,
                ok(self.wrong_live_bytes)
            );
        }
        if let Some(c) = &self.cost_model {
            let source = |n: u64| if n > 0 { format!("measured, {n} samples") } else { "flag or default".to_string() };
            s += &format!(
                "# cost model: step {:.3} ms ({}), migration {:.3} GB/s a changed slot ({})\n",
                c.step_ms,
                source(c.step_samples),
                c.migration_gbps,
                source(c.migration_samples)
            );
        }
        if let Some(same) = self.globals_unchanged {
            s += &format!("# global tensors unchanged: {}\n", if same { "yes" } else { "NO" });
        }
        if !self.plans_agreed {
            s += "# plans agreed: NO (nothing was moved)\n";
        }
        s.trim_end().to_string()
    }
}

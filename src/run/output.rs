//! Output of `run`, nccl-tests style, printed by rank 0: the header, one table per rebalance
//! round with a row per migrated layer (and its `#wrong` column), the summary, and the JSON report.

use super::config::RunConfig;
use super::report::{LayerRow, Report, RoundRow};
use super::safety::ReportHandle;
use super::{RunError, RunShape};
use crate::engine::Engine;
use crate::executor::LayerStats;
use crate::manager::{ManagerConfig, RoundDecision};
use crate::observe::{LayerEvent, ManagerEvent, RoundEvent, RunObserver, SeriesRecorder, StepEvent};
use crate::rank::Topology;

pub(super) const TABLE_HEADER: &str = "#   step  layer  experts        bytes  copies    time(us)  algbw(GB/s)  #wrong";

/// One row of a rebalance table; `seconds` is None for a layer that was not committed.
pub(super) fn table_row(
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

/// What rank 0 prints and the report it writes; the other ranks keep the same report silently.
/// Rank 0 also tells its observers (the report's series, the metrics when served) what happened.
pub(super) struct Output {
    /// Whether this rank prints (rank 0).
    on: bool,
    pub report: Report,
    series: SeriesRecorder,
    watchers: Vec<Box<dyn RunObserver>>,
    /// Where the metrics are served, for the header.
    metrics_addr: Option<std::net::SocketAddr>,
}

impl Output {
    pub fn new(rank: usize, report: Report) -> Output {
        Output { on: rank == 0, report, series: SeriesRecorder::default(), watchers: Vec::new(), metrics_addr: None }
    }

    /// Adds an observer (rank 0 only: the others' are never called); `addr`: where it serves.
    pub(crate) fn watch(&mut self, observer: Box<dyn RunObserver>, addr: Option<std::net::SocketAddr>) {
        self.watchers.push(observer);
        self.metrics_addr = self.metrics_addr.or(addr);
    }

    /// Tells every observer (rank 0).
    fn notify(&mut self, f: impl Fn(&mut dyn RunObserver)) {
        if self.on {
            f(&mut self.series);
            for w in &mut self.watchers {
                f(w.as_mut());
            }
        }
    }

    /// A step's balancedness (rank 0, steps of the balanced phase).
    pub fn step(&mut self, e: &StepEvent) {
        self.notify(|o| o.step(e));
    }

    /// The manager's time on a step.
    pub fn manager(&mut self, e: ManagerEvent) {
        self.notify(|o| o.manager(&e));
    }

    /// Prints on rank 0 only, flushing each line (progress shows as it happens under mpirun).
    pub fn line(&self, s: impl AsRef<str>) {
        if self.on {
            use std::io::Write;
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o, "{}", s.as_ref());
            let _ = o.flush();
        }
    }

    /// The header: the job, the shape, the manager, the policy and transport, then the
    /// `# Using devices` block.
    pub fn header(
        &self,
        config: &RunConfig,
        topo: &Topology,
        rs: &RunShape,
        engine: &dyn Engine,
        manager: &ManagerConfig,
        devices: &str,
    ) {
        let shape = rs.shape;
        self.line(format!(
            "# eplb-worker run: {} ranks on {} node(s) of {}{}, engine {}: {}",
            topo.world_size,
            topo.num_nodes,
            topo.local_size,
            if topo.faked { " (faked with --ranks-per-node)" } else { "" },
            engine.name(),
            engine.describe()
        ));
        let steps = engine.planned_steps().map_or("until the engine stops".to_string(), |s| format!("{s} steps"));
        self.line(format!(
            "#  {} layers x {} experts, {} slots ({} a rank), expert {} B, {steps}, initial placement {}",
            rs.num_layers,
            rs.num_logical,
            shape.num_replicas,
            shape.slots_per_rank(),
            engine.store_ref().expert_bytes(),
            config.placement.init_placement.as_ref().map_or("trivial".into(), |p| p.display().to_string())
        ));
        self.line(format!("#  manager: {}", manager.describe()));
        let mode = if shape.is_hierarchical() && (shape.num_groups > 1 || shape.num_nodes > 1) {
            format!("hierarchical mode: {} groups over {} nodes", shape.num_groups, shape.num_nodes)
        } else {
            "global mode".to_string()
        };
        self.line(format!(
            "#  policy {} ({mode}), transport {}, chunk {} B",
            format!("{:?}", config.manager.policy).to_lowercase(),
            engine.store_ref().transport(),
            config.store.chunk_bytes
        ));
        if let Some(addr) = self.metrics_addr {
            self.line(format!("#  metrics: http://{addr}/metrics"));
        }
        self.line("#");
        self.line(devices.trim_end());
    }

    /// A round agreed by every rank: its line, the table header when it moves anything, and its
    /// entry in the report.
    /// `plan_seconds`: the policy and the selection on this rank.
    pub fn round(&mut self, step: usize, decision: &RoundDecision, hash: u64, world_size: usize, plan_seconds: f64) {
        let layers_selected = decision.updates.len();
        self.notify(|o| o.round(&RoundEvent { step, layers_selected, plan_seconds }));
        self.line("#");
        self.line(format!(
            "# round {} at step {step}: {} layer(s) to migrate ({} changed, {} still similar, {} below min-improvement); plan {hash:016x} agreed by {world_size} ranks",
            self.report.rounds.len() + 1,
            decision.updates.len(),
            decision.changed,
            decision.similar,
            decision.small_gain,
        ));
        if !decision.updates.is_empty() {
            self.report.rebalances += 1;
            self.line(TABLE_HEADER);
        }
        self.report.rounds.push(RoundRow {
            step,
            changed: decision.changed,
            similar: decision.similar,
            small_gain: decision.small_gain,
            selected: decision.updates.iter().map(|u| u.layer).collect(),
            plan_hash: format!("{hash:016x}"),
        });
    }

    /// A committed layer: its row and its totals.
    pub fn committed(&mut self, step: usize, s: &LayerStats, apply_step: Option<u64>) {
        self.notify(|o| {
            o.layer(&LayerEvent {
                step,
                layer: s.layer,
                experts_moved: s.experts_moved,
                bytes: s.bytes_moved,
                seconds: s.seconds,
                wrong_bytes: 0,
            })
        });
        let gbps = if s.seconds > 0.0 { s.bytes_moved as f64 / s.seconds / 1e9 } else { 0.0 };
        self.line(table_row(step, s.layer, s.experts_moved, s.bytes_moved, s.local_copies, Some(s.seconds), 0));
        let r = &mut self.report;
        r.layers_updated += 1;
        r.experts_moved += s.experts_moved as u64;
        r.bytes_moved += s.bytes_moved;
        r.migration_seconds += s.seconds;
        r.layers.push(LayerRow {
            step,
            layer: s.layer,
            experts_moved: s.experts_moved,
            bytes: s.bytes_moved,
            local_copies: s.local_copies,
            seconds: s.seconds,
            gbps,
            wrong_bytes: 0,
            apply_step,
        });
    }

    /// A layer staged but not committed because `wrong` bytes failed verification.
    pub fn failed(&mut self, step: usize, layer: usize, experts: usize, bytes: u64, wrong: u64) {
        let e = LayerEvent { step, layer, experts_moved: experts, bytes, seconds: 0.0, wrong_bytes: wrong };
        self.notify(|o| o.layer(&e));
        self.line(table_row(step, layer, experts, bytes, 0, None, wrong));
        self.report.wrong_bytes += wrong;
    }

    /// The closing lines, and the report (rank 0): `"status": "ok"`, or `"failed"` with the
    /// run's error.
    pub fn finish(&mut self, report: &ReportHandle, result: &Result<(), RunError>) -> Result<(), RunError> {
        let error = result.as_ref().err().map(ToString::to_string);
        self.report.error = error.clone();
        self.report.series = self.series.series();
        self.line(self.report.summary());
        if self.on {
            let doc = serde_json::to_value(&self.report).unwrap_or_default();
            report.finish(doc, error.as_deref())?;
        }
        Ok(())
    }
}

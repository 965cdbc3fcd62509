//! Command-line interface of `eplb-worker`.

use clap::{Parser, Subcommand};

use crate::bench::BenchArgs;
use crate::plan::PlanArgs;
use crate::plot::PlotArgs;
use crate::run::RunArgs;
use crate::simulate::SimulateArgs;

/// eplb: expert-parallel load balancer for Mixture-of-Experts inference.
///
/// One process per GPU (`mpirun -n 16 eplb-worker run ...` or `srun --mpi=pmix`), no coordinator:
/// every rank all-reduces the expert loads, computes the same placement, and moves the changed
/// experts' weights. `plan` computes a placement offline from a load file.
#[derive(Debug, Parser)]
#[command(name = "eplb-worker", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compute a placement offline from a load file and write it as JSON.
    Plan(PlanArgs),
    /// Run the balancer under MPI, one rank per GPU: all-reduce the loads, decide, move weights.
    Run(Box<RunArgs>),
    /// Benchmark the GPU executor: migrate layers between two placements and time every rank
    /// (run under mpirun, one rank per GPU).
    BenchMigrate(BenchArgs),
    /// Replay a load trace through the Manager and Policy of `run` in one process (no MPI, no
    /// weights), model the migration, and score it beside DeepSeek's cadences.
    Simulate(SimulateArgs),
    /// Draw SVG charts of a `run` or `simulate` report: balancedness over steps, per layer, and
    /// the migrations per round.
    Plot(PlotArgs),
}

//! eplb: an expert-parallel load balancer for Mixture-of-Experts inference.
//!
//! * [`policy`]: placement tables from expert loads (pure functions);
//! * [`load`]: load files and traces;
//! * [`plan`]: the offline `plan` command and placement files;
//! * [`engine`]: the synthetic inference engine and its drifting load;
//! * [`rank`]: where a rank runs (world, node, local rank);
//! * [`collective`]: all-reduces, plan agreement and the host transport over MPI;
//! * [`manager`]: when to rebalance and which layers to update;
//! * [`executor`]: moving expert weights, staged and verified;
//! * [`run`]: the `run` subcommand, the SPMD loop;
//! * [`observe`]: what the loop reports: the report's per-step series, the Prometheus endpoint;
//! * [`plot`]: `eplb-worker plot`, SVG charts of a report;
//! * [`progress`]: progress bars on a terminal;
//! * [`simulate`]: the `simulate` subcommand: a trace through the same Manager and Policy, scored.
//! * [`split`]: per-step token quotas between an expert's replicas, the same on every rank.
//! * [`output`]: output files that never destroy anything; [`limits`]: sizes and ranges checked
//!   before any work; [`input`]: input files that are regular and bounded; [`failure`]: the
//!   panic hook; [`signals`]: SIGTERM and SIGINT end a run with a report that says so.

pub mod bench;
pub mod cli;
pub mod collective;
pub mod engine;
pub mod executor;
pub mod exit;
pub mod failure;
pub mod gpu;
pub(crate) mod guard;
pub(crate) mod input;
pub(crate) mod limits;
pub mod load;
pub mod manager;
pub mod observe;
pub(crate) mod output;
pub mod plan;
pub mod plot;
pub mod policy;
pub(crate) mod progress;
pub(crate) mod rank;
pub mod run;
pub(crate) mod signals;
pub mod simulate;
pub mod split;

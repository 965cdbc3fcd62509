//! eplb: an expert-parallel load balancer for Mixture-of-Experts inference.
//!
//! * [`policy`]: placement tables from expert loads (pure functions);
//! * [`load`]: load files and traces;
//! * [`plan`]: the offline `plan` command and placement files;
//! * [`engine`]: the synthetic inference engine and its drifting load.

pub mod bench;
pub mod cli;
pub mod collective;
pub mod engine;
pub mod executor;
pub mod gpu;
pub mod load;
pub mod plan;
pub mod policy;

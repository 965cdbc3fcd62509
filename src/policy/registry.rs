//! The policy registry: `--policy NAME` -> a constructor. The one place a policy is named.
//!
//! Adding a policy is one file and one line here: write `src/policy/NAME.rs` with a type that
//! implements [`Policy`] (one layer's `phy2log` row from integer loads, deterministic, with
//! documented tie-breaks), declare the module in `src/policy/mod.rs`, and add a [`Registered`]
//! line to [`POLICIES`]. `run`, `simulate`, `plan` and the manager then accept it by name; nothing
//! else matches on the policy.

use super::{deepseek, incremental, spread, Policy};

/// One registered policy: its `--policy` name, the help line, and its constructor.
pub struct Registered {
    /// The `--policy` value (lowercase, stable: reports and scripts use it).
    pub name: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// Builds the policy; called once per plan (`plan`) or per manager (`run`, `simulate`).
    pub make: fn() -> Box<dyn Policy>,
}

/// Every policy, in the order `--help` lists them. [`super::PolicyKind`]'s constants index it.
pub const POLICIES: &[Registered] = &[
    Registered {
        name: "deepseek",
        about: "DeepSeek's reference EPLB: a fresh placement every time (greedy replicas, greedy packing)",
        make: || Box::new(deepseek::Deepseek),
    },
    Registered {
        name: "incremental",
        about: "replica counts and packing chosen together by local search from the live placement, trading copies moved against peak load",
        make: || Box::new(incremental::Incremental),
    },
    Registered {
        name: "spread",
        about: "for per-step splitting: DeepSeek's replica counts, replicated experts chained along a ring of all GPUs",
        make: || Box::new(spread::Spread),
    },
];

//! The Policy: pure functions from per-layer expert loads to placement tables.
//!
//! Shapes follow DeepSeek's `eplb.py`:
//! * `weight [layers, num_logical]`: tokens per logical expert (`u64`);
//! * `phy2log [layers, num_replicas]`: physical slot -> logical expert; GPU g owns the slots
//!   `[g * slots_per_rank, (g + 1) * slots_per_rank)`;
//! * `logcnt [layers, num_logical]`: replicas per logical expert;
//! * `log2phy [layers, num_logical, max_replicas]`: the slots of each expert, ascending, -1 padded.
//!
//! Every rank computes the plan on its own, so everything here is deterministic: exact integer
//! arithmetic (see [`fixed`]), explicit tie-breaks, and layers computed independently so that the
//! thread count cannot change the result.

pub mod deepseek;
pub mod fixed;
pub mod incremental;
pub mod metrics;
mod packing;
#[cfg(test)]
mod proptests;
pub mod registry;
mod search;
pub mod spread;

use ndarray::{Array2, Array3, ArrayView1, ArrayView2, Axis};
use thiserror::Error;

/// Errors of the policy: shapes that cannot be placed, or placement tables that are not valid.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the load matrix is empty ({layers} layers x {experts} experts)")]
    EmptyLoad { layers: usize, experts: usize },
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
    #[error("{num_replicas} physical slots do not divide evenly over {num_gpus} GPUs; use {next}, the next multiple of {num_gpus}")]
    ReplicasNotMultipleOfGpus { num_replicas: usize, num_gpus: usize, next: usize },
    #[error("{num_replicas} physical slots are fewer than the {num_logical} logical experts; use at least {next} (a multiple of {num_gpus} GPUs)")]
    TooFewReplicas { num_replicas: usize, num_logical: usize, num_gpus: usize, next: usize },
    #[error("{num_groups} expert groups do not divide the {num_logical} logical experts{hint}")]
    GroupsDoNotDivide { num_groups: usize, num_logical: usize, hint: String },
    #[error("{num_gpus} GPUs do not divide evenly over {num_nodes} nodes")]
    GpusNotMultipleOfNodes { num_gpus: usize, num_nodes: usize },
    #[error("layer {layer}: the load sums to more than 2^64-1 tokens")]
    LoadOverflow { layer: usize },
    #[error("placement has {got_layers} layers x {got_slots} slots, expected {layers} x {slots}")]
    PlacementShape { got_layers: usize, got_slots: usize, layers: usize, slots: usize },
    #[error("placement layer {layer} slot {slot} holds expert {expert}, but there are only {num_logical} experts")]
    ExpertOutOfRange { layer: usize, slot: usize, expert: usize, num_logical: usize },
    #[error("placement layer {layer}: expert {expert} has no replica")]
    ExpertMissing { layer: usize, expert: usize },
}

/// The cluster a placement is computed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementShape {
    /// R: total physical expert slots per layer, over all GPUs.
    pub num_replicas: usize,
    /// G: GPUs (ranks).
    pub num_gpus: usize,
    /// N: nodes; the hierarchical policy keeps each expert group inside one node.
    pub num_nodes: usize,
    /// K: expert groups (DeepSeek-V3 has 8).
    pub num_groups: usize,
}

impl PlacementShape {
    /// Slots per GPU: `R / G`.
    pub fn slots_per_rank(&self) -> usize {
        self.num_replicas / self.num_gpus
    }

    /// GPUs per node: `G / N`.
    pub fn gpus_per_node(&self) -> usize {
        self.num_gpus / self.num_nodes
    }

    /// Whether DeepSeek's hierarchical mode applies (`K % N == 0`); otherwise the global mode,
    /// which is the hierarchical code with one group and one node.
    pub fn is_hierarchical(&self) -> bool {
        self.num_groups.is_multiple_of(self.num_nodes)
    }

    /// The shape the hierarchical code runs with: itself, or one group and one node (global mode).
    pub fn resolved(&self) -> PlacementShape {
        if self.is_hierarchical() {
            *self
        } else {
            PlacementShape { num_groups: 1, num_nodes: 1, ..*self }
        }
    }

    /// Checks the shape against `num_logical` experts; every policy needs this to hold.
    pub fn validate(&self, num_logical: usize) -> Result<(), PolicyError> {
        for (value, what) in [
            (self.num_replicas, "the number of physical slots"),
            (self.num_gpus, "the number of GPUs"),
            (self.num_nodes, "the number of nodes"),
            (self.num_groups, "the number of expert groups"),
        ] {
            if value == 0 {
                return Err(PolicyError::Zero { what });
            }
        }
        let next_multiple = |x: usize| x.div_ceil(self.num_gpus) * self.num_gpus;
        if !self.num_replicas.is_multiple_of(self.num_gpus) {
            return Err(PolicyError::ReplicasNotMultipleOfGpus {
                num_replicas: self.num_replicas,
                num_gpus: self.num_gpus,
                next: next_multiple(self.num_replicas),
            });
        }
        if self.num_replicas < num_logical {
            return Err(PolicyError::TooFewReplicas {
                num_replicas: self.num_replicas,
                num_logical,
                num_gpus: self.num_gpus,
                next: next_multiple(num_logical),
            });
        }
        // Groups matter only in hierarchical mode; the global mode treats all experts as one group.
        if self.is_hierarchical() && !num_logical.is_multiple_of(self.num_groups) {
            let divisors: Vec<String> = (1..=num_logical)
                .filter(|d| num_logical.is_multiple_of(*d) && *d <= 64)
                .map(|d| d.to_string())
                .collect();
            return Err(PolicyError::GroupsDoNotDivide {
                num_groups: self.num_groups,
                num_logical,
                hint: format!("; divisors of {num_logical} are {}", divisors.join(", ")),
            });
        }
        if !self.num_gpus.is_multiple_of(self.num_nodes) {
            return Err(PolicyError::GpusNotMultipleOfNodes { num_gpus: self.num_gpus, num_nodes: self.num_nodes });
        }
        Ok(())
    }
}

/// The price of moving one expert copy, in parts per billion (ppb) of the layer's mean GPU load:
/// a policy that trades moves against balance moves a copy only where the peak GPU load falls by
/// more than this for every copy moved. An integer, so that every rank prices alike: a fraction
/// given as a flag is rounded once at the edge ([`Price::from_fraction`]), and the manager's Q32
/// price converts exactly in integers ([`Price::from_q32`]); no `f64` crosses the Manager/Policy
/// boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Price {
    ppb: u128,
}

impl Price {
    /// Moves are free: balance first.
    pub const ZERO: Price = Price { ppb: 0 };

    /// A price of `ppb` parts per billion of the mean GPU load.
    pub const fn from_ppb(ppb: u128) -> Price {
        Price { ppb }
    }

    /// A fraction of the mean GPU load as given on the command line (`--move-cost`), rounded once
    /// to the nearest ppb, at most `1e30` (a price no plan can pay); 0 for a negative or
    /// non-finite value.
    pub fn from_fraction(fraction: f64) -> Price {
        if fraction.is_finite() && fraction > 0.0 {
            Price::from_ppb((fraction * 1e9).round().min(1e30) as u128)
        } else {
            Price::ZERO
        }
    }

    /// A Q32 fraction of the mean GPU load (the manager's unit, [`crate::manager::cost`]):
    /// `round(q32 x 10^9 / 2^32)`, halves up, exact in integers. (The `f64` path this replaced,
    /// `(q32 / 2^32 x 10^9).round()`, gives the same integer for every `q32 < 2^33`, where the
    /// product is exact in `f64`; the manager's prices are below 2^32, one PAR.)
    pub fn from_q32(q32: u64) -> Price {
        Price::from_ppb((q32 as u128 * 1_000_000_000 + (1u128 << 31)) >> 32)
    }

    /// Parts per billion of the mean GPU load.
    pub const fn ppb(self) -> u128 {
        self.ppb
    }
}

/// A placement algorithm: one layer's `phy2log` row from that layer's integer loads.
///
/// Every rank computes the plan on its own, so an implementation must be a pure function of its
/// arguments: integer arithmetic (see [`fixed`]) and an explicit rule for every tie; the thread
/// count must not change it (layers are placed independently). Register it in [`registry`].
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// The `phy2log [num_replicas]` row of one layer.
    ///
    /// * `weight [num_logical]`: tokens per logical expert (its sum fits in `u64`);
    /// * `shape`: validated for `weight.len()` (not resolved: a hierarchical policy calls
    ///   [`PlacementShape::resolved`]);
    /// * `previous [num_replicas]`: the live row, if any (a policy may ignore it);
    /// * `price`: what one moved copy must buy (a policy may ignore it).
    fn place_layer(
        &self,
        weight: &[u64],
        shape: &PlacementShape,
        previous: Option<&[usize]>,
        price: Price,
    ) -> Vec<usize>;

    /// The fewest steps the time-mode manager expects a change of this policy's placements to
    /// pay for itself over (its price of a moved copy divides by the expected lifetime): 0, no
    /// floor, unless a policy's placements age slower than the load's estimate (spread under the
    /// split: [`spread::MIN_LIFETIME`]).
    fn min_lifetime(&self) -> u64 {
        0
    }

    /// Every layer: `weight [layers, num_logical]`, `previous` the live placement if any, on
    /// `threads` worker threads (0: one per core; the result never depends on it), calling
    /// `layer_done` after each layer (a progress bar's hook, from the worker threads).
    fn place(
        &self,
        weight: ArrayView2<u64>,
        shape: &PlacementShape,
        previous: Option<&Placement>,
        price: Price,
        threads: usize,
        layer_done: &(dyn Fn() + Sync),
    ) -> Result<Placement, PolicyError> {
        check_load(weight)?;
        let (layers, num_logical) = weight.dim();
        shape.validate(num_logical)?;
        if let Some(prev) = previous {
            prev.check_shape(layers, shape)?;
        }
        let rows = map_layers(layers, threads, |layer| {
            let w = weight.row(layer).to_vec();
            let prev = previous.map(|p| p.phy2log.row(layer).to_vec());
            let row = self.place_layer(&w, shape, prev.as_deref(), price);
            layer_done();
            row
        });
        let mut phy2log = Array2::<usize>::zeros((layers, shape.num_replicas));
        for (layer, row) in rows.into_iter().enumerate() {
            phy2log.row_mut(layer).assign(&ArrayView1::from(&row));
        }
        Placement::from_phy2log(phy2log, num_logical)
    }
}

/// Which registered policy computes the placement: an index into [`registry::POLICIES`],
/// parsed from its name (`--policy`), shown and serialized as its name.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyKind {
    index: usize,
}

impl PolicyKind {
    /// DeepSeek's reference EPLB (see [`deepseek`]).
    pub const DEEPSEEK: PolicyKind = PolicyKind { index: 0 };
    /// The incremental policy, the default (see [`incremental`]).
    pub const INCREMENTAL: PolicyKind = PolicyKind { index: 1 };
    /// The ring for per-step splitting (see [`spread`]).
    pub const SPREAD: PolicyKind = PolicyKind { index: 2 };

    /// Every registered policy, in registry order.
    pub fn all() -> impl Iterator<Item = PolicyKind> {
        (0..registry::POLICIES.len()).map(|index| PolicyKind { index })
    }

    /// The policy registered as `name`.
    pub fn from_name(name: &str) -> Option<PolicyKind> {
        registry::POLICIES.iter().position(|r| r.name == name).map(|index| PolicyKind { index })
    }

    fn entry(self) -> &'static registry::Registered {
        &registry::POLICIES[self.index]
    }

    /// Its `--policy` name.
    pub fn name(self) -> &'static str {
        self.entry().name
    }

    /// A new instance of the policy.
    pub fn make(self) -> Box<dyn Policy> {
        (self.entry().make)()
    }

    /// The `--policy` parser: the registered names, each with its help line.
    pub fn value_parser() -> impl clap::builder::TypedValueParser<Value = PolicyKind> {
        use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
        PossibleValuesParser::new(registry::POLICIES.iter().map(|r| PossibleValue::new(r.name).help(r.about)))
            .try_map(|name| PolicyKind::from_name(&name).ok_or_else(|| format!("no policy named {name:?}")))
    }
}

impl std::fmt::Debug for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for PolicyKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Knobs of the policies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    pub kind: PolicyKind,
    /// Worker threads over layers; 0 means one per available core. The result never depends on it.
    pub threads: usize,
    /// The price of moving one expert copy (policies that trade moves against balance; see
    /// [`incremental`]); 0 puts balance first.
    pub move_cost: Price,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig { kind: PolicyKind::INCREMENTAL, threads: 0, move_cost: incremental::DEFAULT_PRICE }
    }
}

/// A placement of every layer's experts on the physical slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// phy2log [layers, num_replicas]
    pub phy2log: Array2<usize>,
    /// logcnt [layers, num_logical]
    pub logcnt: Array2<usize>,
    /// log2phy [layers, num_logical, max_replicas]: slots ascending, -1 padded.
    pub log2phy: Array3<i64>,
}

impl Placement {
    /// Builds `logcnt` and `log2phy` from `phy2log`, checking that every expert index is below
    /// `num_logical` and that every expert has at least one replica.
    pub fn from_phy2log(phy2log: Array2<usize>, num_logical: usize) -> Result<Placement, PolicyError> {
        let layers = phy2log.nrows();
        let mut logcnt = Array2::<usize>::zeros((layers, num_logical));
        for ((layer, slot), &expert) in phy2log.indexed_iter() {
            if expert >= num_logical {
                return Err(PolicyError::ExpertOutOfRange { layer, slot, expert, num_logical });
            }
            logcnt[[layer, expert]] += 1;
        }
        if let Some(((layer, expert), _)) = logcnt.indexed_iter().find(|(_, &c)| c == 0) {
            return Err(PolicyError::ExpertMissing { layer, expert });
        }
        let max_replicas = logcnt.iter().copied().max().unwrap_or(0);
        let mut log2phy = Array3::<i64>::from_elem((layers, num_logical, max_replicas), -1);
        let mut filled = vec![0usize; num_logical];
        for (layer, row) in phy2log.outer_iter().enumerate() {
            filled.iter_mut().for_each(|f| *f = 0);
            for (slot, &expert) in row.iter().enumerate() {
                log2phy[[layer, expert, filled[expert]]] = slot as i64;
                filled[expert] += 1;
            }
        }
        Ok(Placement { phy2log, logcnt, log2phy })
    }

    /// The trivial placement engines start with: slot s holds expert `s mod num_logical`
    /// (SGLang's `trivial`).
    pub fn trivial(layers: usize, num_logical: usize, num_replicas: usize) -> Placement {
        let phy2log = Array2::from_shape_fn((layers, num_replicas), |(_, s)| s % num_logical);
        Placement::from_phy2log(phy2log, num_logical).expect("the trivial placement is valid when R >= E")
    }

    pub fn num_layers(&self) -> usize {
        self.phy2log.nrows()
    }

    pub fn num_replicas(&self) -> usize {
        self.phy2log.ncols()
    }

    pub fn num_logical(&self) -> usize {
        self.logcnt.ncols()
    }

    /// Checks that this placement fits `layers` layers and `shape`'s slots.
    pub fn check_shape(&self, layers: usize, shape: &PlacementShape) -> Result<(), PolicyError> {
        if self.num_layers() != layers || self.num_replicas() != shape.num_replicas {
            return Err(PolicyError::PlacementShape {
                got_layers: self.num_layers(),
                got_slots: self.num_replicas(),
                layers,
                slots: shape.num_replicas,
            });
        }
        Ok(())
    }

    /// A 64-bit hash of `phy2log` (FNV-1a over the shape and every entry, little-endian u64):
    /// ranks compare it before anything moves.
    pub fn hash(&self) -> u64 {
        hash_phy2log(self.phy2log.view())
    }
}

/// FNV-1a 64 over `phy2log`'s shape and entries (as little-endian u64).
pub fn hash_phy2log(phy2log: ArrayView2<usize>) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let (rows, cols) = phy2log.dim();
    for v in [rows, cols].into_iter().chain(phy2log.iter().copied()) {
        for byte in (v as u64).to_le_bytes() {
            h ^= byte as u64;
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

/// Checks that every layer's load sums to at most `u64::MAX` (the policy's arithmetic needs it).
pub fn check_load(weight: ArrayView2<u64>) -> Result<(), PolicyError> {
    let (layers, experts) = weight.dim();
    if layers == 0 || experts == 0 {
        return Err(PolicyError::EmptyLoad { layers, experts });
    }
    for (layer, row) in weight.axis_iter(Axis(0)).enumerate() {
        row.iter().try_fold(0u64, |acc, &w| acc.checked_add(w)).ok_or(PolicyError::LoadOverflow { layer })?;
    }
    Ok(())
}

/// Computes a placement for every layer.
///
/// * `weight [layers, num_logical]`: tokens per logical expert;
/// * `previous`: the placement now live, if any (`phy2log [layers, num_replicas]`); the
///   incremental policy starts from it, DeepSeek's ignores it.
pub fn rebalance(
    weight: ArrayView2<u64>,
    shape: &PlacementShape,
    previous: Option<&Placement>,
    config: &PolicyConfig,
) -> Result<Placement, PolicyError> {
    rebalance_observed(weight, shape, previous, config, &|| {})
}

/// [`rebalance`], calling `layer_done` after each layer (from the worker threads, in any order):
/// a progress bar's hook. The placement does not depend on it.
pub fn rebalance_observed(
    weight: ArrayView2<u64>,
    shape: &PlacementShape,
    previous: Option<&Placement>,
    config: &PolicyConfig,
    layer_done: &(dyn Fn() + Sync),
) -> Result<Placement, PolicyError> {
    config.kind.make().place(weight, shape, previous, config.move_cost, config.threads, layer_done)
}

/// Runs `f(layer)` for every layer on `threads` worker threads (0: one per core) of a
/// persistent pool. Each layer is computed alone and the results keep the layer order, so the
/// output does not depend on the thread count.
pub fn map_layers<T: Send, F: Fn(usize) -> T + Sync + Send>(layers: usize, threads: usize, f: F) -> Vec<T> {
    use rayon::prelude::*;
    let threads =
        if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { threads };
    if threads <= 1 || layers <= 1 {
        return (0..layers).map(f).collect();
    }
    match pool(threads) {
        Some(pool) => pool.install(|| (0..layers).into_par_iter().map(&f).collect()),
        None => (0..layers).map(f).collect(),
    }
}

/// The worker pool of `threads` threads, made once per distinct count (None if it cannot start).
fn pool(threads: usize) -> Option<std::sync::Arc<rayon::ThreadPool>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = pools.get(&threads) {
        return Some(p.clone());
    }
    let p = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(threads).build().ok()?);
    pools.insert(threads, p.clone());
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(r: usize, g: usize, n: usize, k: usize) -> PlacementShape {
        PlacementShape { num_replicas: r, num_gpus: g, num_nodes: n, num_groups: k }
    }

    #[test]
    fn validate_names_the_fix() {
        let e = shape(260, 8, 1, 1).validate(256).unwrap_err();
        assert_eq!(e, PolicyError::ReplicasNotMultipleOfGpus { num_replicas: 260, num_gpus: 8, next: 264 });
        assert!(e.to_string().contains("use 264"));
        let e = shape(64, 8, 1, 1).validate(100).unwrap_err();
        assert!(e.to_string().contains("at least 104"), "{e}");
        assert!(matches!(shape(64, 8, 1, 3).validate(64), Err(PolicyError::GroupsDoNotDivide { .. })));
        // 7 groups on 8 nodes is the global mode: the groups need not divide the experts.
        assert!(shape(320, 64, 8, 7).validate(256).is_ok());
        assert!(matches!(shape(64, 8, 3, 1).validate(64), Err(PolicyError::GpusNotMultipleOfNodes { .. })));
        assert!(matches!(shape(64, 0, 1, 1).validate(64), Err(PolicyError::Zero { .. })));
        assert!(shape(72, 8, 4, 8).validate(64).is_ok());
    }

    #[test]
    fn from_phy2log_builds_log2phy_and_rejects_bad_tables() {
        let p = Placement::from_phy2log(ndarray::arr2(&[[0, 1, 0, 2]]), 3).unwrap();
        assert_eq!(p.logcnt, ndarray::arr2(&[[2, 1, 1]]));
        assert_eq!(p.log2phy, ndarray::arr3(&[[[0, 2], [1, -1], [3, -1]]]));
        assert_eq!(
            Placement::from_phy2log(ndarray::arr2(&[[0, 1, 0, 0]]), 3).unwrap_err(),
            PolicyError::ExpertMissing { layer: 0, expert: 2 }
        );
        assert!(matches!(
            Placement::from_phy2log(ndarray::arr2(&[[0, 1, 5]]), 3),
            Err(PolicyError::ExpertOutOfRange { expert: 5, .. })
        ));
    }

    #[test]
    fn check_load_rejects_overflow_and_empty() {
        assert_eq!(check_load(ndarray::arr2(&[[u64::MAX, 1]]).view()), Err(PolicyError::LoadOverflow { layer: 0 }));
        assert!(matches!(check_load(Array2::<u64>::zeros((0, 4)).view()), Err(PolicyError::EmptyLoad { .. })));
    }

    #[test]
    fn hash_sees_every_entry_and_the_shape() {
        let a = ndarray::arr2(&[[0usize, 1, 2, 3]]);
        let b = ndarray::arr2(&[[0usize, 1, 3, 2]]);
        let c = ndarray::arr2(&[[0usize, 1], [2, 3]]);
        assert_ne!(hash_phy2log(a.view()), hash_phy2log(b.view()));
        assert_ne!(hash_phy2log(a.view()), hash_phy2log(c.view()));
        assert_eq!(hash_phy2log(a.view()), hash_phy2log(a.clone().view()));
    }

    #[test]
    fn the_registry_names_every_policy_once_and_the_constants_match() {
        let names: Vec<&str> = PolicyKind::all().map(PolicyKind::name).collect();
        assert_eq!(names, ["deepseek", "incremental", "spread"]);
        for (kind, name) in [
            (PolicyKind::DEEPSEEK, "deepseek"),
            (PolicyKind::INCREMENTAL, "incremental"),
            (PolicyKind::SPREAD, "spread"),
        ] {
            assert_eq!((kind.name(), PolicyKind::from_name(name)), (name, Some(kind)));
            assert_eq!(format!("{kind:?}"), name);
        }
        assert_eq!(PolicyKind::from_name("Deepseek"), None);
    }

    #[test]
    fn prices_convert_in_integers_as_the_float_path_did() {
        assert_eq!(Price::from_fraction(0.0004).ppb(), 400_000);
        assert_eq!(Price::from_fraction(-1.0), Price::ZERO);
        assert_eq!(Price::from_fraction(f64::NAN), Price::ZERO);
        assert_eq!(Price::from_fraction(1e40).ppb(), 1e30 as u128);
        // The f64 path it replaced: (q32 / 2^32 x 1e9).round(), exact below 2^33.
        let mut seed = 7u64;
        for q in [0u64, 1, 2, 3, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 33) - 1]
            .into_iter()
            .chain((0..10_000).map(|_| crate::engine::lcg64(&mut seed) >> 31))
        {
            let float = ((q as f64 / (1u64 << 32) as f64) * 1e9).round() as u128;
            assert_eq!(Price::from_q32(q).ppb(), float, "q32 {q}");
        }
        // Halves round up: 2^31 / 2^32 x 1e9 = 0.5e9 exactly; 1 / 2^32 x 1e9 = 0.23.
        assert_eq!((Price::from_q32(1 << 31).ppb(), Price::from_q32(1).ppb()), (500_000_000, 0));
    }
}

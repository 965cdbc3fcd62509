//! The Executor: moves the changed experts' weights, layer by layer, staged and verified.
//!
//! For one layer, every rank:
//! 1. derives the same [`LayerMigration`] from the old and new `phy2log` rows ([`plan`]);
//! 2. **stages** its part ([`ExpertStore::stage`]): receives into its staging buffer (at most one
//!    layer's local slots), sends from its live slots, local and staged copies;
//! 3. **verifies** the staged bytes against the expected content ([`ExpertStore::verify_staged`]);
//! 4. agrees with every other rank that no byte was wrong (an all-reduce of the error count);
//! 5. **commits** the staged slots into the live ones ([`ExpertStore::commit`]), or, if any rank
//!    saw a wrong byte, commits nothing and stops with an error.
//!
//! Steps 1-4 are [`stage_layer`]; step 5 is the caller's, which owns the live placement
//! (`crate::run::live`); [`migrate_layer`] does all five for callers without one.
//!
//! Steps 2, 3 and 5 belong to the store, which knows where the weights live. An expert is row `s`
//! of every per-expert tensor of its layer ([`memory::ExpertRows`], contract 2). The host store is
//! three separate pieces: storage ([`memory::SlotMemory`]), transport
//! ([`crate::collective::host::HostTransport`]) and verification ([`verify::Verification`] and the
//! shared [`verify::Verifier`]); the GPU store (`crate::gpu::store`) is GPU memory, NCCL and a
//! checksum kernel, with the same [`verify::Verifier`]. Every store is built in one place,
//! [`factory`], from where the weights live and the transport.

pub mod factory;
pub mod fault;
pub mod host;
pub mod memory;
pub mod plan;
pub mod verify;

pub use host::HostExpertStore;
pub(crate) use memory::{EngineSwitch, SlotMemory};
pub use plan::LayerMigration;
pub(crate) use plan::RankMigration;

use std::time::Instant;

use thiserror::Error;

use crate::collective::{Comm, MpiError, ReduceOp};

/// Errors of the executor. Nothing is committed after any of them.
#[derive(Debug, Error)]
pub enum ExecError {
    #[error(transparent)]
    Mpi(#[from] MpiError),
    /// An NCCL call failed: its `ncclResult_t` code and `ncclGetErrorString`.
    #[error("NCCL error {code} in {op}: {message}")]
    Nccl { op: &'static str, code: i32, message: String },
    /// A CUDA driver call failed.
    #[error("CUDA error in {op}: {message}")]
    Cuda { op: &'static str, message: String },
    /// Staged bytes failed verification on some rank: the layer was not committed anywhere.
    #[error("layer {layer}: {wrong_bytes} staged bytes failed verification over all ranks; nothing was committed")]
    Verification { layer: usize, wrong_bytes: u64 },
    /// Ranks failed to stage or verify their part (each printed its error): the layer was not
    /// committed anywhere. `errors`: `rank R: <its error>` for each.
    #[error("layer {layer}: {} rank(s) failed to stage their part ({}); nothing was committed", .errors.len(), .errors.join("; "))]
    PeerFailed { layer: usize, errors: Vec<String> },
    /// The engine beside this rank died, stopped or failed: this rank stops (and the job with it).
    #[error("{0}")]
    Engine(String),
    /// The commit was cancelled on every rank: nothing changed anywhere.
    #[error("layer {layer}: the commit was cancelled on every rank ({reason}); nothing was changed")]
    Cancelled { layer: usize, reason: String },
    #[error("{0}")]
    Other(String),
}

/// What a commit did, the same on every rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// The staged slots are live from the caller's next step (memory the executor writes).
    Next,
    /// The engine switched the layer at the boundary before its step `.0`, on every rank.
    AtStep(u64),
    /// Cancelled on every rank (`reason`): nothing changed; the layer may be staged again.
    Cancelled(String),
}

/// Time spent in the stages of one layer's migration on this rank, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTiming {
    /// Transfers and local copies into staging.
    pub transfer_seconds: f64,
    /// Checking the staged bytes.
    pub verify_seconds: f64,
}

/// One rank's expert weights: `num_layers` layers of `slots_per_rank` live slots of
/// `expert_bytes` bytes each, plus a staging buffer of one layer's local slots.
///
/// The synthetic engine's content of logical expert `e` of layer `l` is
/// [`crate::engine::pattern_word`]`(l, e, i)` for its 8-byte word `i`, so any rank verifies what it
/// holds without more messages.
pub trait ExpertStore {
    /// What the `# Using devices` block shows for this rank (`cpu` for host memory; a device store
    /// names its GPU).
    fn device(&self) -> String {
        "cpu".into()
    }
    /// The transport's name, for the header and the report (`host`, `nccl`).
    fn transport(&self) -> &'static str {
        "host"
    }
    fn expert_bytes(&self) -> usize;
    fn slots_per_rank(&self) -> usize;
    /// Runs this rank's part of a layer's migration into staging: receives, sends from the live
    /// slots, local copies, then staged copies. Returns when all of it has completed.
    fn stage(&mut self, m: &RankMigration) -> Result<StageTiming, ExecError>;
    /// Bytes of the staged slots (`m.changed_slots`) that differ from the expected content.
    fn verify_staged(&mut self, m: &RankMigration) -> Result<u64, ExecError>;
    /// Makes the staged slots (`m.changed_slots`) live. Called on every rank for the same layer
    /// once every rank verified its part; a store whose commit needs an agreement (an engine that
    /// switches at a step boundary) makes it here, so that every rank returns the same [`Commit`].
    fn commit(&mut self, m: &RankMigration) -> Result<Commit, ExecError>;
    /// Bytes of the live slots of `layer` that differ from the content of `experts`
    /// (`[slots_per_rank]`, the expert each local slot must hold).
    fn verify_live(&mut self, layer: usize, experts: &[usize]) -> Result<u64, ExecError>;
    /// A hash of the engine's global tensors (never moved, never written by eplb), to prove them
    /// untouched: `None` when the store has none.
    fn globals_hash(&mut self) -> Result<Option<u64>, ExecError> {
        Ok(None)
    }
}

/// What one layer's migration did, over all ranks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerStats {
    pub layer: usize,
    /// Expert copies that crossed between ranks.
    pub experts_moved: usize,
    /// Copies inside a rank (from a live or a staging slot).
    pub local_copies: usize,
    /// Bytes that crossed between ranks: `experts_moved * expert_bytes`.
    pub bytes_moved: u64,
    /// Wall time on this rank from the start of staging to the end of the commit, which includes
    /// waiting for the slowest rank in the agreement.
    pub seconds: f64,
    /// This rank's stage timing.
    pub timing: StageTiming,
}

/// A layer staged and verified on every rank, ready for [`ExpertStore::commit`].
#[derive(Debug)]
pub(crate) struct Staged {
    /// This rank's part of the migration.
    pub part: RankMigration,
    /// Over all ranks; `seconds` counts up to the agreement, the caller adds the commit.
    pub stats: LayerStats,
    start: Instant,
}

impl Staged {
    /// Wall time since staging started.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// Stages one layer on this rank, verifies the staged bytes, and agrees with every rank (an
/// all-reduce of the wrong-byte and failure counts over `comm`) that every byte arrived right.
/// When any rank saw a wrong byte or failed, every rank returns [`ExecError::Verification`] or
/// [`ExecError::PeerFailed`] alike, and nothing may be committed. Collective over `comm`: every
/// rank calls it with the same `migration`.
pub(crate) fn stage_layer(
    store: &mut dyn ExpertStore,
    comm: &Comm,
    migration: &LayerMigration,
    rank: usize,
) -> Result<Staged, ExecError> {
    let start = Instant::now();
    let m = migration.for_rank(rank);
    let staged = store.stage(&m).and_then(|mut timing| {
        let t = Instant::now();
        let wrong = store.verify_staged(&m)?;
        timing.verify_seconds = t.elapsed().as_secs_f64();
        Ok((timing, wrong))
    });
    // A rank whose peers did not answer within --timeout goes no further: it ends the job.
    let staged = match staged {
        Err(ExecError::Mpi(e)) if e.is_timeout() => return Err(ExecError::Mpi(e)),
        other => other,
    };
    // A rank that failed locally still joins the agreement, so that no other rank commits.
    let (wrong, failed) = match &staged {
        Ok((_, wrong)) => (*wrong, 0),
        Err(_) => (0, 1),
    };
    let totals = comm.allreduce_u64(&[wrong, failed], ReduceOp::Sum)?;
    if totals[1] > 0 {
        // Which ranks failed, and why: every rank learns it (one more all-gather, on failure only).
        let mine = staged.as_ref().err().map(ToString::to_string).unwrap_or_default();
        let errors: Vec<String> = comm
            .allgather_text(&mine, 512)?
            .into_iter()
            .enumerate()
            .filter(|(_, e)| !e.is_empty())
            .map(|(r, e)| format!("rank {r}: {e}"))
            .collect();
        staged?;
        return Err(ExecError::PeerFailed { layer: m.layer, errors });
    }
    let (timing, _) = staged?;
    if totals[0] > 0 {
        return Err(ExecError::Verification { layer: m.layer, wrong_bytes: totals[0] });
    }
    let experts_moved = migration.transfers.len();
    let stats = LayerStats {
        layer: m.layer,
        experts_moved,
        local_copies: migration.local_copies.iter().chain(&migration.staged_copies).map(Vec::len).sum(),
        bytes_moved: (experts_moved * store.expert_bytes()) as u64,
        seconds: start.elapsed().as_secs_f64(),
        timing,
    };
    Ok(Staged { part: m, stats, start })
}

/// Migrates one layer on this rank: [`stage_layer`], then [`ExpertStore::commit`]; a cancelled
/// commit is [`ExecError::Cancelled`]. Collective over `comm`: every rank calls it with the same
/// `migration`.
pub fn migrate_layer(
    store: &mut dyn ExpertStore,
    comm: &Comm,
    migration: &LayerMigration,
    rank: usize,
) -> Result<LayerStats, ExecError> {
    let staged = stage_layer(store, comm, migration, rank)?;
    match store.commit(&staged.part)? {
        Commit::Cancelled(reason) => Err(ExecError::Cancelled { layer: migration.layer, reason }),
        Commit::Next | Commit::AtStep(_) => Ok(LayerStats { seconds: staged.elapsed(), ..staged.stats }),
    }
}

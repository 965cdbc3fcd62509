//! The live placement, and the one owner of a commit.
//!
//! A layer's commit changes three things that must never disagree: the bytes in the live slots
//! (the store's commit: a copy, or the engine applying the staged slots at a step boundary), the
//! live placement (`phy2log`, and `log2phy`/`logcnt` derived from it), and the manager's
//! reference load of the layer. [`Live::commit`] is the only place where any of them changes
//! (and [`Live::commit_modeled`], its form without weights, for `simulate`).
//!
//! An engine may switch a layer at a later step than the one the loop is reading (it applies at
//! an agreed step ahead of its current one), so [`Live`] also remembers, for such a layer, the row
//! in force before the switch: [`Live::at`] gives the placement the engine routed a step on,
//! which converts that step's per-slot counts to logical loads.

use std::borrow::Cow;

use crate::executor::{Commit, ExecError, ExpertStore, Staged};
use crate::manager::{LayerUpdate, Manager};
use crate::policy::{Placement, PolicyError};

/// A layer the engine switches at engine step `from_step`: before it, `old_row` was in force.
#[derive(Debug, Clone, PartialEq)]
struct Switch {
    layer: usize,
    from_step: u64,
    old_row: Vec<usize>,
}

/// The live placement: the newest committed one, and the switches still ahead of the loop.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    /// `phy2log [layers, num_physical]`, with `log2phy` and `logcnt` derived from it.
    placement: Placement,
    num_logical: usize,
    /// Switches at engine steps the loop has not read yet, in commit order.
    ahead: Vec<Switch>,
}

/// What [`Live::commit`] did.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Committed {
    /// Live everywhere: from the loop's next step, or from this engine step.
    Applied { at_step: Option<u64> },
    /// Cancelled on every rank: nothing changed; the update may be staged again.
    Cancelled(String),
}

/// Errors of a commit.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("live placement: {0}")]
    Placement(#[from] PolicyError),
}

impl Live {
    pub fn new(initial: Placement) -> Live {
        let num_logical = initial.num_logical();
        Live { placement: initial, num_logical, ahead: Vec::new() }
    }

    /// The newest committed placement.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The placement the engine routed its step `engine_step` on.
    pub fn at(&self, engine_step: u64) -> Result<Cow<'_, Placement>, PolicyError> {
        let behind: Vec<&Switch> = self.ahead.iter().filter(|s| engine_step < s.from_step).collect();
        if behind.is_empty() {
            return Ok(Cow::Borrowed(&self.placement));
        }
        let mut phy2log = self.placement.phy2log.clone();
        // Newest first, so that the oldest row of a layer switched twice wins.
        for s in behind.iter().rev() {
            phy2log.row_mut(s.layer).assign(&ndarray::ArrayView1::from(&s.old_row));
        }
        Ok(Cow::Owned(Placement::from_phy2log(phy2log, self.num_logical)?))
    }

    /// The loop has read engine step `engine_step`: forgets the switches at or before it.
    pub fn passed(&mut self, engine_step: u64) {
        self.ahead.retain(|s| s.from_step > engine_step);
    }

    /// Commits a layer staged and verified on every rank: the store makes the staged bytes live,
    /// then the live placement takes the new row and the manager its reference load, all three or
    /// none. Collective (through the store's commit): every rank calls it for the same layer.
    pub fn commit(
        &mut self,
        store: &mut dyn ExpertStore,
        manager: Option<&mut Manager>,
        update: &LayerUpdate,
        staged: &Staged,
    ) -> Result<Committed, CommitError> {
        let at_step = match store.commit(&staged.part)? {
            Commit::Cancelled(reason) => return Ok(Committed::Cancelled(reason)),
            Commit::Next => None,
            Commit::AtStep(s) => Some(s),
        };
        self.take(manager, update, at_step)?;
        Ok(Committed::Applied { at_step })
    }

    /// Commits a layer where no weights move (`simulate` models the migration): the live
    /// placement takes the new row and the manager its reference load, from the next step.
    pub fn commit_modeled(&mut self, manager: Option<&mut Manager>, update: &LayerUpdate) -> Result<(), PolicyError> {
        self.take(manager, update, None)
    }

    /// The live placement takes `update`'s row (in force from engine step `at_step`, or the
    /// loop's next step), then the manager its reference load.
    fn take(
        &mut self,
        manager: Option<&mut Manager>,
        update: &LayerUpdate,
        at_step: Option<u64>,
    ) -> Result<(), PolicyError> {
        let old_row = self.placement.phy2log.row(update.layer).to_vec();
        let mut phy2log = self.placement.phy2log.clone();
        phy2log.row_mut(update.layer).assign(&ndarray::ArrayView1::from(&update.new_row));
        self.placement = Placement::from_phy2log(phy2log, self.num_logical)?;
        if let Some(from_step) = at_step {
            self.ahead.push(Switch { layer: update.layer, from_step, old_row });
        }
        if let Some(manager) = manager {
            manager.committed(update);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_ahead_keeps_the_old_row_for_earlier_steps() {
        let initial = Placement::from_phy2log(ndarray::arr2(&[[0, 1, 2, 0], [0, 1, 2, 1]]), 3).unwrap();
        let mut live = Live::new(initial.clone());
        let mut p = initial.phy2log.clone();
        p.row_mut(1).assign(&ndarray::arr1(&[2, 1, 0, 2]));
        live.placement = Placement::from_phy2log(p, 3).unwrap();
        live.ahead.push(Switch { layer: 1, from_step: 10, old_row: vec![0, 1, 2, 1] });
        assert_eq!(live.at(9).unwrap().phy2log, initial.phy2log);
        assert_eq!(live.at(9).unwrap().logcnt, initial.logcnt);
        assert_eq!(live.at(10).unwrap().phy2log, live.placement.phy2log);
        live.passed(9);
        assert_eq!(live.at(9).unwrap().phy2log, initial.phy2log, "step 10 not read yet");
        live.passed(10);
        assert!(live.ahead.is_empty());
        assert_eq!(live.at(9).unwrap().phy2log, live.placement.phy2log);
    }
}

//! The mailbox (docs/engine-contract.md): the sidecar posts one command under `cmd_seq` (a
//! sequence lock over `cmd_id, cmd_layer, cmd_apply_step, cmd_epoch`, the new `phy2log` row and
//! the copy mask); the engine reads it at a step boundary and answers with `ack_result`,
//! `ack_step`, then `ack_id` (release). An applied command's placement row and epoch are stored
//! before its answer ([`publish_placement`]), so a sidecar that sees `applied` sees them too.

use crate::sync::{fence, odd_fence, AtomicU32, AtomicU64, AtomicU8, Ordering, PUBLISH};

/// Words of the mailbox head, from `cmd_seq` (offset 256) to `ack_step` (offset 336).
pub const HEAD_WORDS: usize = 11;
const SEQ: usize = 0;
const ID: usize = 1;
const LAYER: usize = 2;
const APPLY_STEP: usize = 3;
const EPOCH: usize = 4;
const ACK_ID: usize = 8;
const ACK_RESULT: usize = 9;
const ACK_STEP: usize = 10;

/// Tries of the engine's read of a command: it never waits for the sidecar.
pub const READ_TRIES: u32 = 4;

/// A command's fixed fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandHead {
    /// 0: no command was ever posted.
    pub id: u64,
    pub layer: u64,
    /// Apply at the boundary before this engine step.
    pub apply_step: u64,
    /// The layer's epoch after the apply.
    pub epoch: u64,
}

/// An answer: (`ack_id`, `ack_result`, `ack_step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub id: u64,
    pub result: u64,
    pub step: u64,
}

/// Views of one region's mailbox.
#[derive(Clone, Copy)]
pub struct Mailbox<'a> {
    /// [`HEAD_WORDS`] words from offset 256.
    pub head: &'a [AtomicU64],
    /// `new_row [num_physical]` i32 (as u32 bits), at `command_offset`.
    pub row: &'a [AtomicU32],
    /// `copy_mask [slots_per_rank]` u8, after the row.
    pub mask: &'a [AtomicU8],
}

impl Mailbox<'_> {
    /// Posts a command (the sidecar side). `new_row` and `copy_mask` are cut to the views'
    /// lengths.
    pub fn post(&self, cmd: CommandHead, new_row: &[i32], copy_mask: &[bool]) {
        let seq = &self.head[SEQ];
        let s = seq.load(Ordering::Relaxed) & !1;
        seq.store(s + 1, Ordering::Relaxed);
        odd_fence();
        self.head[ID].store(cmd.id, Ordering::Relaxed);
        self.head[LAYER].store(cmd.layer, Ordering::Relaxed);
        self.head[APPLY_STEP].store(cmd.apply_step, Ordering::Relaxed);
        self.head[EPOCH].store(cmd.epoch, Ordering::Relaxed);
        for (w, &v) in self.row.iter().zip(new_row) {
            w.store(v as u32, Ordering::Relaxed);
        }
        for (w, &m) in self.mask.iter().zip(copy_mask) {
            w.store(u8::from(m), Ordering::Relaxed);
        }
        seq.store(s + 2, PUBLISH);
    }

    /// Reads the command (the engine side), never waiting: None while a post is under way
    /// (`cmd_seq` odd: a sidecar stopped in the middle of one must not hang the engine) or when
    /// the read was disturbed [`READ_TRIES`] times. `body(&head)` says whether the row and the
    /// mask are wanted (they are read into `new_row` and `copy_mask` only then, under the same
    /// lock); the second value says whether they were read.
    pub fn read(
        &self,
        body: impl Fn(&CommandHead) -> bool,
        new_row: &mut [i32],
        copy_mask: &mut [bool],
    ) -> Option<(CommandHead, bool)> {
        self.read_tries(READ_TRIES, body, new_row, copy_mask)
    }

    /// [`Mailbox::read`] with a bound on its tries.
    pub fn read_tries(
        &self,
        tries: u32,
        body: impl Fn(&CommandHead) -> bool,
        new_row: &mut [i32],
        copy_mask: &mut [bool],
    ) -> Option<(CommandHead, bool)> {
        let seq = &self.head[SEQ];
        for _ in 0..tries {
            let s1 = seq.load(Ordering::Acquire);
            if s1 % 2 == 1 {
                return None;
            }
            let head = CommandHead {
                id: self.head[ID].load(Ordering::Relaxed),
                layer: self.head[LAYER].load(Ordering::Relaxed),
                apply_step: self.head[APPLY_STEP].load(Ordering::Relaxed),
                epoch: self.head[EPOCH].load(Ordering::Relaxed),
            };
            let with_body = body(&head);
            if with_body {
                for (v, w) in new_row.iter_mut().zip(self.row) {
                    *v = w.load(Ordering::Relaxed) as i32;
                }
                for (m, w) in copy_mask.iter_mut().zip(self.mask) {
                    *m = w.load(Ordering::Relaxed) != 0;
                }
            }
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) == s1 {
                return Some((head, with_body));
            }
        }
        None
    }

    /// Answers command `id` (the engine side): result and step first, then the id (release).
    pub fn answer(&self, id: u64, result: u64, step: u64) {
        self.head[ACK_RESULT].store(result, Ordering::Relaxed);
        self.head[ACK_STEP].store(step, Ordering::Relaxed);
        self.head[ACK_ID].store(id, PUBLISH);
    }

    /// The last answer (the sidecar side): `ack_id` first (acquire), so that the result and step
    /// belong to it or to a later answer.
    pub fn ack(&self) -> Answer {
        let id = self.head[ACK_ID].load(Ordering::Acquire);
        Answer {
            id,
            result: self.head[ACK_RESULT].load(Ordering::Acquire),
            step: self.head[ACK_STEP].load(Ordering::Acquire),
        }
    }

    /// `ack_id` alone (acquire).
    pub fn ack_id(&self) -> u64 {
        self.head[ACK_ID].load(Ordering::Acquire)
    }
}

/// The engine's publication of an applied command's placement: the layer's `phy2log` row, then
/// its epoch (release). Called after the weights were copied and before the answer, so a reader
/// that acquires the answer or the epoch sees the row (and the weights) of that apply.
pub fn publish_placement(row: &[AtomicU32], epoch: &AtomicU64, new_row: &[i32], new_epoch: u64) {
    for (w, &v) in row.iter().zip(new_row) {
        w.store(v as u32, Ordering::Relaxed);
    }
    epoch.store(new_epoch, PUBLISH);
}

/// A placement row as stored (relaxed loads: pair them with an acquire of the answer or epoch).
pub fn read_row(row: &[AtomicU32], out: &mut [i32]) {
    for (v, w) in out.iter_mut().zip(row) {
        *v = w.load(Ordering::Relaxed) as i32;
    }
}

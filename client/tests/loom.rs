//! The model checker of the C11 memory model (loom) over the core's two protocols, exactly the
//! code the library and the sidecar run (`eplb_client::core`, whose atomics are loom's under
//! `--cfg loom`):
//!
//! * writer vs reader of a ring entry: a read that the seqlock accepts is never torn;
//! * sidecar vs engine over the mailbox: the engine that sees a command sees all of it and the
//!   staged rows written before it (no data race on them);
//! * engine vs sidecar over the answer: a sidecar that sees `applied` sees the placement row, the
//!   epoch and the weights of that apply (no data race on them).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p eplb-client --release --test loom --target-dir
//! target/loom`. With `--cfg loom_weak` as well, the writers' orderings are weakened (the release
//! fence after a sequence word goes odd is left out, and the store that publishes, `sync::PUBLISH`,
//! becomes Relaxed), and every test here must then FAIL with an "ORDERING BUG" assertion (they
//! are `should_panic` there): proof that the checker finds the bugs these orderings prevent.
#![cfg(loom)]

use eplb_client::core::mailbox::{self, CommandHead, Mailbox};
use eplb_client::core::ring::{self, EntryHead};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use loom::sync::Arc;
use loom::thread;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = std::env::var("LOOM_BOUND").ok().and_then(|v| v.parse().ok()).or(Some(3));
    b.check(f);
}

const COUNTS: usize = 2;

#[test]
#[cfg_attr(loom_weak, should_panic(expected = "ORDERING BUG"))]
fn a_ring_entry_the_seqlock_accepts_is_never_torn() {
    model(|| {
        let entry: Arc<Vec<AtomicU64>> = Arc::new((0..ring::HEAD_WORDS + COUNTS).map(|_| AtomicU64::new(0)).collect());
        let w = entry.clone();
        let writer = thread::spawn(move || {
            ring::write(&w, EntryHead { step: 1, phase: 1, tokens: 1, moe_ns: 1 }, &[1; COUNTS]);
        });
        let mut counts = [9u64; COUNTS];
        if let Some(h) = ring::read_tries(&entry, &mut counts, 2) {
            let k = h.step;
            assert!(k <= 1, "step {k}");
            assert_eq!(
                (h.phase, h.tokens, h.moe_ns, counts),
                (k, k, k, [k; COUNTS]),
                "ORDERING BUG: a torn entry was accepted"
            );
        }
        writer.join().unwrap();
    });
}

struct Box_ {
    head: Vec<AtomicU64>,
    row: Vec<AtomicU32>,
    mask: Vec<AtomicU8>,
    placement: Vec<AtomicU32>,
    epoch: AtomicU64,
    /// A staged row and a live row: plain memory, written and read without atomics.
    staging: UnsafeCell<u64>,
    live: UnsafeCell<u64>,
}

// SAFETY: the UnsafeCells are accessed only as the protocol allows; loom reports any race.
unsafe impl Sync for Box_ {}
unsafe impl Send for Box_ {}

impl Box_ {
    fn new() -> Arc<Box_> {
        Arc::new(Box_ {
            head: (0..mailbox::HEAD_WORDS).map(|_| AtomicU64::new(0)).collect(),
            row: (0..2).map(|_| AtomicU32::new(0)).collect(),
            mask: (0..1).map(|_| AtomicU8::new(0)).collect(),
            placement: (0..2).map(|_| AtomicU32::new(0)).collect(),
            epoch: AtomicU64::new(0),
            staging: UnsafeCell::new(0),
            live: UnsafeCell::new(0),
        })
    }

    fn mailbox(&self) -> Mailbox<'_> {
        Mailbox { head: &self.head, row: &self.row, mask: &self.mask }
    }
}

#[test]
#[cfg_attr(loom_weak, should_panic(expected = "ORDERING BUG"))]
fn the_engine_that_sees_a_command_sees_all_of_it_and_its_staged_rows() {
    model(|| {
        let b = Box_::new();
        let s = b.clone();
        let sidecar = thread::spawn(move || {
            // SAFETY: the staging row is the sidecar's until it posts.
            s.staging.with_mut(|p| unsafe { *p = 42 });
            s.mailbox().post(CommandHead { id: 7, layer: 1, apply_step: 3, epoch: 1 }, &[5, 6], &[true]);
        });
        let (mut row, mut mask) = ([0i32; 2], [false; 1]);
        if let Some((h, true)) = b.mailbox().read_tries(2, |h| h.id != 0, &mut row, &mut mask) {
            assert_eq!((h.id, h.layer, h.apply_step, h.epoch), (7, 1, 3, 1), "ORDERING BUG: a torn command head");
            assert_eq!((row, mask), ([5, 6], [true]), "ORDERING BUG: a command seen before its row and mask");
            // SAFETY: posted after the sidecar's write: the protocol makes this read race-free.
            let staged = b.staging.with(|p| unsafe { *p });
            assert_eq!(staged, 42, "ORDERING BUG: a command seen before its staged rows");
        }
        sidecar.join().unwrap();
    });
}

#[test]
#[cfg_attr(loom_weak, should_panic(expected = "ORDERING BUG"))]
fn a_sidecar_that_sees_applied_sees_the_placement_epoch_and_weights_of_that_apply() {
    model(|| {
        let b = Box_::new();
        let e = b.clone();
        let engine = thread::spawn(move || {
            // SAFETY: the engine writes its live weights only inside its boundary.
            e.live.with_mut(|p| unsafe { *p = 42 });
            mailbox::publish_placement(&e.placement, &e.epoch, &[3, 4], 1);
            e.mailbox().answer(7, 1, 5);
        });
        let a = b.mailbox().ack();
        if a.id == 7 {
            assert_eq!((a.result, a.step), (1, 5), "ORDERING BUG: an answer seen before its result and step");
            assert_eq!(b.epoch.load(Ordering::Relaxed), 1, "ORDERING BUG: applied seen before the epoch");
            let mut row = [0i32; 2];
            mailbox::read_row(&b.placement, &mut row);
            assert_eq!(row, [3, 4], "ORDERING BUG: applied seen before the placement");
            // SAFETY: answered after the engine's write: the protocol makes this read race-free.
            let live = b.live.with(|p| unsafe { *p });
            assert_eq!(live, 42, "ORDERING BUG: applied seen before the weights");
        }
        engine.join().unwrap();
    });
}

//! The watchdog: no rank waits for the others longer than `--timeout`.
//!
//! Every wait of a collective, a transfer or a commit goes through [`Watchdog::wait`] (MPI
//! requests) or [`Watchdog::poll_until`] (anything else that can be polled: a CUDA stream, NCCL's
//! asynchronous error), which polls until done or until `timeout` has passed without completion.
//! While it waits, a rank answers the others' pings on a communicator of the watchdog's own. When
//! its deadline passes, the rank pings every other rank and waits a short grace period for the
//! answers: the ranks that did not answer (stopped, killed, stuck outside any wait) are named in
//! the [`MpiError`] it returns ([`MpiError::is_timeout`]). The caller then reports and ends the
//! job (`MPI_Abort`): a rank that timed out never goes on.
//!
//! Attach one to a communicator with [`super::Comm::set_watchdog`]; every [`super::Comm::dup`] of
//! it and every transport on such a duplicate share it.

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void};
use std::time::{Duration, Instant};

use mpi::ffi;

use super::{check, Comm, MpiError};
use crate::guard::{guard, Guard};

/// Default of `--timeout`, in seconds.
pub(crate) const DEFAULT_TIMEOUT_SECONDS: f64 = 120.0;

/// The code of a timeout in [`MpiError::code`] (MPI's own codes are >= 0).
pub(crate) const TIMEOUT_CODE: i32 = -2;

const TAG_PING: c_int = 1;
const TAG_PONG: c_int = 2;

/// Bounds every wait of the ranks on each other (see the module documentation).
pub(crate) struct Watchdog {
    timeout: Duration,
    /// A communicator of the watchdog's own, for pings and their answers.
    comm: Comm,
    /// The receive of the next ping (from any rank), always posted.
    ping_req: Cell<ffi::MPI_Request>,
    ping_buf: Box<[u64; 2]>,
    /// Answers and pings sent, with their buffers, until they complete.
    sent: RefCell<Vec<(ffi::MPI_Request, Box<[u64; 2]>)>>,
}

impl Watchdog {
    /// A watchdog of `timeout` over the ranks of `comm`. Collective over `comm` (it duplicates it).
    pub fn new(comm: &Comm, timeout: Duration) -> Result<Watchdog, MpiError> {
        let w = Watchdog {
            timeout,
            comm: comm.dup_plain()?,
            ping_req: Cell::new(unsafe { ffi::RSMPI_REQUEST_NULL }),
            ping_buf: Box::new([0; 2]),
            sent: RefCell::new(Vec::new()),
        };
        w.post_ping_recv()?;
        Ok(w)
    }

    fn post_ping_recv(&self) -> Result<(), MpiError> {
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `ping_buf` is boxed and lives as long as `self`; the request is cancelled in Drop.
        let rc = unsafe {
            ffi::MPI_Irecv(
                self.ping_buf.as_ptr() as *mut c_void,
                2,
                ffi::RSMPI_UINT64_T,
                ffi::RSMPI_ANY_SOURCE,
                TAG_PING,
                self.comm.raw(),
                &mut req,
            )
        };
        check(rc, "MPI_Irecv")?;
        self.ping_req.set(req);
        Ok(())
    }

    /// Sends `[a, b]` to `peer` with `tag`, without waiting for it.
    fn send(&self, peer: usize, tag: c_int, msg: [u64; 2]) -> Result<(), MpiError> {
        let buf = Box::new(msg);
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: the boxed buffer is kept in `sent` until the request completes.
        let rc = unsafe {
            ffi::MPI_Isend(
                buf.as_ptr() as *const c_void,
                2,
                ffi::RSMPI_UINT64_T,
                peer as c_int,
                tag,
                self.comm.raw(),
                &mut req,
            )
        };
        check(rc, "MPI_Isend")?;
        self.sent.borrow_mut().push((req, buf));
        Ok(())
    }

    /// Answers the pings that arrived, and lets the finished sends go.
    fn serve(&self) -> Result<(), MpiError> {
        loop {
            let mut req = self.ping_req.get();
            let mut done: c_int = 0;
            // SAFETY: a request posted by `post_ping_recv`.
            check(unsafe { ffi::MPI_Test(&mut req, &mut done, ffi::RSMPI_STATUS_IGNORE) }, "MPI_Test")?;
            self.ping_req.set(req);
            if done == 0 {
                break;
            }
            let from = self.ping_buf[0] as usize;
            self.post_ping_recv()?;
            if from < self.comm.size() {
                self.send(from, TAG_PONG, [self.comm.rank() as u64, 0])?;
            }
        }
        self.sent.borrow_mut().retain_mut(|(req, _)| {
            let mut done: c_int = 0;
            // SAFETY: a request of `send`; its buffer is still held here.
            unsafe { ffi::MPI_Test(req, &mut done, ffi::RSMPI_STATUS_IGNORE) };
            done == 0
        });
        Ok(())
    }

    /// Waits for every request of `requests` (from `op`), at most the timeout.
    pub fn wait(&self, requests: &mut [ffi::MPI_Request], op: &'static str) -> Result<(), MpiError> {
        if requests.is_empty() {
            return Ok(());
        }
        let count = super::mpi_count(requests.len(), "MPI_Testall")?;
        self.poll_until(op, || {
            let mut done: c_int = 0;
            // SAFETY: requests returned by MPI; statuses are ignored.
            let rc = unsafe { ffi::MPI_Testall(count, requests.as_mut_ptr(), &mut done, ffi::RSMPI_STATUSES_IGNORE) };
            check(rc, op)?;
            Ok(done != 0)
        })
    }

    /// Calls `poll` until it returns `Ok(true)` (done) or an error, answering pings meanwhile; past
    /// the timeout, names the ranks that do not answer and returns a timeout error of `op`.
    pub(crate) fn poll_until<E: From<MpiError>>(
        &self,
        op: &'static str,
        mut poll: impl FnMut() -> Result<bool, E>,
    ) -> Result<(), E> {
        let start = Instant::now();
        loop {
            if poll()? {
                return Ok(());
            }
            self.serve()?;
            let waited = start.elapsed();
            if waited >= self.timeout {
                return Err(self.timed_out(op).into());
            }
            backoff(waited);
        }
    }

    /// Asks every other rank whether it is there, waits a grace period for the answers, and
    /// builds the error that names the ranks that did not answer.
    fn timed_out(&self, op: &'static str) -> MpiError {
        let (rank, size) = (self.comm.rank(), self.comm.size());
        let grace = (self.timeout / 4).clamp(Duration::from_millis(500), Duration::from_secs(10));
        let mut answered = vec![false; size];
        if let Some(me) = answered.get_mut(rank) {
            *me = true;
        }
        let asked = (0..size).filter(|&r| r != rank).try_for_each(|r| self.send(r, TAG_PING, [rank as u64, 0]));
        let mut buf = Box::new([0u64; 2]);
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        let post = |req: &mut ffi::MPI_Request, buf: &mut [u64; 2]| unsafe {
            // SAFETY: `buf` outlives the request: it is waited for or cancelled below.
            ffi::MPI_Irecv(
                buf.as_mut_ptr() as *mut c_void,
                2,
                ffi::RSMPI_UINT64_T,
                ffi::RSMPI_ANY_SOURCE,
                TAG_PONG,
                self.comm.raw(),
                req,
            )
        };
        let start = Instant::now();
        if asked.is_ok() && post(&mut req, &mut buf) == 0 {
            while answered.iter().any(|a| !a) && start.elapsed() < grace {
                let mut done: c_int = 0;
                // SAFETY: the request posted above.
                if unsafe { ffi::MPI_Test(&mut req, &mut done, ffi::RSMPI_STATUS_IGNORE) } != 0 {
                    break;
                }
                if done != 0 {
                    if let Some(a) = answered.get_mut(buf[0] as usize) {
                        *a = true;
                    }
                    if post(&mut req, &mut buf) != 0 {
                        break;
                    }
                }
                let _ = self.serve();
                backoff(start.elapsed());
            }
            // SAFETY: cancel the last receive and wait for the cancellation, so `buf` may go.
            unsafe {
                ffi::MPI_Cancel(&mut req);
                ffi::MPI_Wait(&mut req, ffi::RSMPI_STATUS_IGNORE);
            }
        }
        // This rank gives up on its peers: whatever it waits for from now on is bounded.
        crate::failure::arm_end_guard(rank);
        let silent: Vec<usize> = (0..size).filter(|&r| !answered[r]).collect();
        let who = if silent.is_empty() {
            "every rank answered a ping, so they are all waiting: a collective call was posted in a different \
             order on some rank"
                .to_string()
        } else {
            format!("rank(s) {} did not answer (stopped, killed, or stuck outside any wait)", list(&silent))
        };
        MpiError {
            op,
            code: TIMEOUT_CODE,
            message: format!(
                "rank {rank} waited {:.0} s (--timeout) without completion; {who}",
                self.timeout.as_secs_f64()
            ),
        }
    }
}

impl Watchdog {
    /// A [`Guard`] of `op` with this watchdog's timeout.
    pub(crate) fn guard(&self, op: &'static str) -> Guard {
        guard(op, self.comm.rank(), self.timeout)
    }
}

/// `1, 3, 4`.
pub fn list(ranks: &[usize]) -> String {
    ranks.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
}

/// Waiting without hogging a core that other ranks may share: spin (yielding) for the first
/// 20 ms, so that short waits cost no latency and MPI keeps progressing transfers, then sleep a
/// little between polls.
fn backoff(waited: Duration) {
    if waited < Duration::from_millis(20) {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(if waited < Duration::from_secs(1) { 100 } else { 1000 }));
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // SAFETY: the ping receive is cancelled and completed before its buffer goes; sends not
        // yet complete are freed (MPI finishes them) and their buffers leaked on purpose.
        unsafe {
            let mut req = self.ping_req.get();
            ffi::MPI_Cancel(&mut req);
            ffi::MPI_Wait(&mut req, ffi::RSMPI_STATUS_IGNORE);
            for (mut req, buf) in self.sent.borrow_mut().drain(..) {
                let mut done: c_int = 0;
                ffi::MPI_Test(&mut req, &mut done, ffi::RSMPI_STATUS_IGNORE);
                if done == 0 {
                    ffi::MPI_Request_free(&mut req);
                    Box::leak(buf);
                }
            }
        }
    }
}

impl MpiError {
    /// Whether this is the watchdog's timeout (see [`Watchdog`]).
    pub(crate) fn is_timeout(&self) -> bool {
        self.code == TIMEOUT_CODE
    }
}

//! Collectives between the ranks: MPI all-reduces of loads and decisions, plan agreement, and the
//! transports that move expert bytes ([`host`]).
//!
//! Every call goes through `mpi::ffi` on a communicator whose error handler is
//! `MPI_ERRORS_RETURN`, so that a failing call returns its code, which [`MpiError`] prints with
//! `MPI_Error_string` (rsmpi's safe wrappers ignore return codes).

pub mod host;
pub mod settings;
pub mod watchdog;

use std::ffi::{c_int, c_void};
use std::rc::Rc;

use mpi::ffi;
use thiserror::Error;

pub(crate) use watchdog::Watchdog;

/// An MPI call that failed, with the code MPI returned and its `MPI_Error_string`.
#[derive(Debug, Error)]
#[error("{}", self.describe())]
pub struct MpiError {
    /// The MPI function, e.g. `MPI_Allreduce`.
    pub op: &'static str,
    pub code: i32,
    pub message: String,
}

impl MpiError {
    fn describe(&self) -> String {
        if self.is_timeout() {
            format!("{} timed out: {}", self.op, self.message)
        } else {
            format!("MPI error {} in {}: {}", self.code, self.op, self.message)
        }
    }

    /// An error that MPI did not return (a count too large for an `int`, MPI already started, ...).
    pub(crate) fn usage(op: &'static str, message: impl Into<String>) -> Self {
        MpiError { op, code: -1, message: message.into() }
    }
}

/// `MPI_Error_string` of `code`.
pub(crate) fn error_string(code: c_int) -> String {
    let mut buf = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: the buffer holds MPI_MAX_ERROR_STRING bytes, as the standard requires.
    let rc = unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return format!("(unknown MPI error code {code})");
    }
    buf.truncate(len.clamp(0, buf.len() as c_int) as usize);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Turns an MPI return code into a `Result`.
pub fn check(code: c_int, op: &'static str) -> Result<(), MpiError> {
    if code == 0 {
        Ok(())
    } else {
        Err(MpiError { op, code, message: error_string(code) })
    }
}

/// A count that MPI takes as an `int`.
pub(crate) fn mpi_count(n: usize, op: &'static str) -> Result<c_int, MpiError> {
    c_int::try_from(n).map_err(|_| MpiError::usage(op, format!("count {n} does not fit an MPI int")))
}

/// MPI started for the life of this value (`MPI_Init` ... `MPI_Finalize`). Drop every [`Comm`]
/// before it.
pub struct MpiRuntime {
    _universe: mpi::environment::Universe,
}

impl MpiRuntime {
    /// Starts MPI (`MPI_Init`); works under `mpirun`, `srun --mpi=pmix`, or alone as one rank.
    pub fn init() -> Result<MpiRuntime, MpiError> {
        mpi::initialize()
            .map(|u| MpiRuntime { _universe: u })
            .ok_or_else(|| MpiError::usage("MPI_Init", "MPI was already initialised in this process"))
    }
}

/// `(rank, timeout)` of the guards of blocking collective calls, once a run set its timeout.
static BLOCKING_TIMEOUT: std::sync::Mutex<Option<(usize, std::time::Duration)>> = std::sync::Mutex::new(None);

/// Bounds every later blocking collective call of this process (`MPI_Comm_dup`,
/// `MPI_Comm_split_type`) by `timeout` (see [`crate::guard::Guard`]).
pub(crate) fn set_blocking_timeout(rank: usize, timeout: std::time::Duration) {
    *BLOCKING_TIMEOUT.lock().unwrap_or_else(|e| e.into_inner()) = Some((rank, timeout));
}

fn blocking_guard(op: &'static str) -> Option<crate::guard::Guard> {
    let armed = *BLOCKING_TIMEOUT.lock().unwrap_or_else(|e| e.into_inner());
    armed.map(|(rank, timeout)| crate::guard::guard(op, rank, timeout))
}

/// The reduction of an all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Min,
    Max,
}

/// A communicator with `MPI_ERRORS_RETURN`, freed on drop. With a [`Watchdog`] attached
/// ([`Comm::set_watchdog`]), no wait on it lasts longer than the watchdog's timeout.
pub struct Comm {
    raw: ffi::MPI_Comm,
    rank: usize,
    size: usize,
    watchdog: Option<Rc<Watchdog>>,
}

impl Comm {
    /// A duplicate of `MPI_COMM_WORLD` whose errors return codes instead of aborting.
    pub fn world() -> Result<Comm, MpiError> {
        // SAFETY: MPI is initialised (an MpiRuntime exists); RSMPI_COMM_WORLD is a valid handle.
        Comm::adopt_dup(unsafe { ffi::RSMPI_COMM_WORLD })
    }

    /// A duplicate of this communicator (its own tag space), also with `MPI_ERRORS_RETURN`, and
    /// the same watchdog.
    pub fn dup(&self) -> Result<Comm, MpiError> {
        let mut c = Comm::adopt_dup(self.raw)?;
        c.watchdog = self.watchdog.clone();
        Ok(c)
    }

    /// A duplicate without the watchdog.
    fn dup_plain(&self) -> Result<Comm, MpiError> {
        Comm::adopt_dup(self.raw)
    }

    /// Bounds every wait on this communicator (and its later duplicates) by `watchdog`.
    pub(crate) fn set_watchdog(&mut self, watchdog: Rc<Watchdog>) {
        self.watchdog = Some(watchdog);
    }

    /// The watchdog attached, if any.
    pub(crate) fn watchdog(&self) -> Option<&Rc<Watchdog>> {
        self.watchdog.as_ref()
    }

    /// Waits for `requests` of `op`: through the watchdog when one is attached (a timeout error
    /// past its timeout), else `MPI_Waitall`.
    pub(crate) fn wait_all(&self, requests: &mut [ffi::MPI_Request], op: &'static str) -> Result<(), MpiError> {
        if requests.is_empty() {
            return Ok(());
        }
        if let Some(w) = &self.watchdog {
            return w.wait(requests, op);
        }
        let count = mpi_count(requests.len(), "MPI_Waitall")?;
        // SAFETY: every request was returned by MPI; statuses are ignored.
        check(unsafe { ffi::MPI_Waitall(count, requests.as_mut_ptr(), ffi::RSMPI_STATUSES_IGNORE) }, op)
    }

    /// Waits for one request of `op` (see [`Comm::wait_all`]).
    fn wait_one(&self, rc: c_int, req: ffi::MPI_Request, op: &'static str) -> Result<(), MpiError> {
        check(rc, op)?;
        self.wait_all(&mut [req], op)
    }

    fn adopt_dup(parent: ffi::MPI_Comm) -> Result<Comm, MpiError> {
        let mut raw: ffi::MPI_Comm = unsafe { ffi::RSMPI_COMM_NULL };
        // MPI_Comm_dup is collective and blocking: bounded by the process-wide guard, if armed.
        let _guard = blocking_guard("MPI_Comm_dup");
        // SAFETY: `parent` is a valid communicator and `raw` a valid out-pointer.
        check(unsafe { ffi::MPI_Comm_dup(parent, &mut raw) }, "MPI_Comm_dup")?;
        Comm::adopt(raw)
    }

    /// Takes ownership of a new communicator: sets `MPI_ERRORS_RETURN` and reads rank and size.
    fn adopt(raw: ffi::MPI_Comm) -> Result<Comm, MpiError> {
        let mut comm = Comm { raw, rank: 0, size: 0, watchdog: None };
        // SAFETY: `raw` is a valid communicator that we own.
        unsafe {
            check(ffi::MPI_Comm_set_errhandler(raw, ffi::RSMPI_ERRORS_RETURN), "MPI_Comm_set_errhandler")?;
            let (mut rank, mut size): (c_int, c_int) = (0, 0);
            check(ffi::MPI_Comm_rank(raw, &mut rank), "MPI_Comm_rank")?;
            check(ffi::MPI_Comm_size(raw, &mut size), "MPI_Comm_size")?;
            comm.rank = rank as usize;
            comm.size = size as usize;
        }
        Ok(comm)
    }

    /// The ranks that share memory with this one (one node): `MPI_Comm_split_type(SHARED)`.
    pub(crate) fn split_shared(&self) -> Result<Comm, MpiError> {
        let mut raw: ffi::MPI_Comm = unsafe { ffi::RSMPI_COMM_NULL };
        let _guard = blocking_guard("MPI_Comm_split_type");
        // SAFETY: valid communicator, key = world rank keeps the order, valid out-pointer.
        check(
            unsafe {
                ffi::MPI_Comm_split_type(
                    self.raw,
                    ffi::RSMPI_COMM_TYPE_SHARED,
                    self.rank as c_int,
                    ffi::RSMPI_INFO_NULL,
                    &mut raw,
                )
            },
            "MPI_Comm_split_type",
        )?;
        let mut c = Comm::adopt(raw)?;
        c.watchdog = self.watchdog.clone();
        Ok(c)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The raw handle, for transports that post their own requests.
    pub(crate) fn raw(&self) -> ffi::MPI_Comm {
        self.raw
    }

    /// All-reduce of `send` with `op`; every rank gets the result.
    pub fn allreduce_u64(&self, send: &[u64], op: ReduceOp) -> Result<Vec<u64>, MpiError> {
        let mut recv = vec![0u64; send.len()];
        let count = mpi_count(send.len(), "MPI_Allreduce")?;
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: both buffers hold `count` u64 values and outlive the request (waited for
        // below); the handles are valid.
        let rc = unsafe {
            let op = match op {
                ReduceOp::Sum => ffi::RSMPI_SUM,
                ReduceOp::Min => ffi::RSMPI_MIN,
                ReduceOp::Max => ffi::RSMPI_MAX,
            };
            ffi::MPI_Iallreduce(
                send.as_ptr().cast::<c_void>(),
                recv.as_mut_ptr().cast::<c_void>(),
                count,
                ffi::RSMPI_UINT64_T,
                op,
                self.raw,
                &mut req,
            )
        };
        self.wait_one(rc, req, "MPI_Allreduce")?;
        Ok(recv)
    }

    /// Gathers `mine` (the same length on every rank) from every rank, in rank order.
    pub(crate) fn allgather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, MpiError> {
        let n = mine.len();
        let mut all = vec![0u8; n * self.size];
        let count = mpi_count(n, "MPI_Allgather")?;
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `all` holds size * n bytes; both buffers outlive the request (waited for below).
        let rc = unsafe {
            ffi::MPI_Iallgather(
                mine.as_ptr().cast::<c_void>(),
                count,
                ffi::RSMPI_UINT8_T,
                all.as_mut_ptr().cast::<c_void>(),
                count,
                ffi::RSMPI_UINT8_T,
                self.raw,
                &mut req,
            )
        };
        self.wait_one(rc, req, "MPI_Allgather")?;
        Ok(all.chunks(n.max(1)).take(self.size).map(<[u8]>::to_vec).collect())
    }

    /// Gathers `mine` (the same length on every rank) from every rank, in rank order.
    pub(crate) fn allgather_u64(&self, mine: &[u64]) -> Result<Vec<Vec<u64>>, MpiError> {
        let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(self.allgather_bytes(&bytes)?.iter().map(|r| le_words(r)).collect())
    }

    /// The ranks that set `flag`, in rank order (every rank learns them: one all-gather).
    pub(crate) fn ranks_where(&self, flag: bool) -> Result<Vec<usize>, MpiError> {
        Ok(self
            .allgather_u64(&[u64::from(flag)])?
            .iter()
            .enumerate()
            .filter(|(_, f)| f[0] != 0)
            .map(|(r, _)| r)
            .collect())
    }

    /// Every rank's exit code of a local step (0: it succeeded), one all-gather: the ranks that
    /// failed, in rank order, and the largest code (0 when none failed). The set-up agreements
    /// (`run`'s and the executor factory's) share it, so that no rank goes on into a collective
    /// call that a failed rank will never make.
    pub(crate) fn failed_ranks(&self, code: u64) -> Result<(Vec<usize>, u64), MpiError> {
        let codes: Vec<u64> = self.allgather_u64(&[code])?.iter().map(|c| c[0]).collect();
        let failed = (0..codes.len()).filter(|&r| codes[r] != 0).collect();
        Ok((failed, codes.iter().copied().max().unwrap_or(0)))
    }

    /// Gathers one text from every rank, in rank order, each cut to `max_bytes` (at a character
    /// boundary). Collective: one all-gather of `max_bytes` a rank.
    pub(crate) fn allgather_text(&self, text: &str, max_bytes: usize) -> Result<Vec<String>, MpiError> {
        let mut end = text.len().min(max_bytes);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut mine = vec![0u8; max_bytes];
        mine[..end].copy_from_slice(&text.as_bytes()[..end]);
        Ok(self
            .allgather_bytes(&mine)?
            .iter()
            .map(|raw| {
                let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                String::from_utf8_lossy(&raw[..len]).into_owned()
            })
            .collect())
    }

    /// `MPI_Barrier`.
    pub fn barrier(&self) -> Result<(), MpiError> {
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: valid communicator.
        let rc = unsafe { ffi::MPI_Ibarrier(self.raw, &mut req) };
        self.wait_one(rc, req, "MPI_Barrier")
    }

    /// Ends every rank of the job (`MPI_Abort`): for a failure that the other ranks cannot see and
    /// would wait on forever. It ends the whole job, whichever communicator it is called on
    /// ([`crate::failure::abort_job`]).
    pub(crate) fn abort(&self, code: i32) -> ! {
        crate::failure::abort_job(code)
    }

    /// The load all-reduce, with the decision bits piggybacked: one `MPI_Allreduce` (sum) of
    /// `loads` followed by one word per flag. A flag is set on the result when any rank set it.
    pub fn allreduce_loads(&self, loads: &[u64], flags: &[bool]) -> Result<(Vec<u64>, Vec<bool>), MpiError> {
        let mut send = Vec::with_capacity(loads.len() + flags.len());
        send.extend_from_slice(loads);
        send.extend(flags.iter().map(|&f| u64::from(f)));
        let mut sum = self.allreduce_u64(&send, ReduceOp::Sum)?;
        let flags = sum.split_off(loads.len()).into_iter().map(|c| c > 0).collect();
        Ok((sum, flags))
    }

    /// Plan agreement: the minimum and maximum over ranks of `hash`, in one all-reduce (max of
    /// `hash` and of `!hash`).
    pub(crate) fn agree_hash(&self, hash: u64) -> Result<HashAgreement, MpiError> {
        let r = self.allreduce_u64(&[hash, !hash], ReduceOp::Max)?;
        Ok(HashAgreement { min: !r[1], max: r[0] })
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: we own the communicator; it is freed once. Errors are ignored on drop.
        unsafe {
            ffi::MPI_Comm_free(&mut self.raw);
        }
    }
}

/// The little-endian u64 words of `bytes` (a trailing partial word is dropped).
pub(crate) fn le_words(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("chunks of 8 bytes"))).collect()
}

/// The minimum and maximum of a hash over all ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HashAgreement {
    pub min: u64,
    pub max: u64,
}

impl HashAgreement {
    /// Every rank computed the same hash.
    pub fn agreed(&self) -> bool {
        self.min == self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_agreement() {
        assert!(HashAgreement { min: 3, max: 3 }.agreed());
        assert!(!HashAgreement { min: 2, max: 3 }.agreed());
        assert_eq!(le_words(&[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 1, 9]), vec![1, 2 | 1 << 56]);
    }
}

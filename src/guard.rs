//! A bound on one blocking call that cannot be polled: a [`Guard`] ends the process if it is not
//! dropped in time. Below both the watchdog (`crate::collective::watchdog`, which arms guards around
//! MPI and NCCL calls) and the panic hook (`crate::failure`, which bounds `MPI_Abort` and the end of
//! a rank that timed out), so that neither imports the other.

use std::time::Duration;

/// Bounds one blocking call that cannot be polled (`ncclCommInitRank`, `MPI_Comm_dup`): while it
/// lives, a thread waits for it to be dropped; past the timeout, it prints which call on which rank
/// did not return and ends the process with exit code 1 (the launcher then ends the job).
pub(crate) struct Guard {
    state: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A [`Guard`] of `op` on `rank`, which ends the process after `timeout`.
pub(crate) fn guard(op: &'static str, rank: usize, timeout: Duration) -> Guard {
    Guard::new(
        format!(
            "eplb-worker run: rank {rank}: error: {op} did not return within {:.0} s (--timeout): a peer is stopped, \
             killed or stuck; ending the job",
            timeout.as_secs_f64()
        ),
        timeout,
    )
}

impl Guard {
    /// A guard that, unless dropped within `timeout`, prints `message` and ends the process with
    /// exit code 1 (the launcher then ends the other ranks).
    pub fn new(message: String, timeout: Duration) -> Guard {
        let state = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            let (lock, cv) = &*shared;
            let done = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (done, _) = cv.wait_timeout_while(done, timeout, |d| !*d).unwrap_or_else(|e| e.into_inner());
            if !*done {
                eprintln!("{message}");
                // SAFETY: ends the process at once; the launcher ends the other ranks.
                unsafe { libc::_exit(1) }
            }
        });
        Guard { state, thread: Some(thread) }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

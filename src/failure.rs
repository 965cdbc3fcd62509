//! The last line of defence: a panic never exits 101. [`install_panic_hook`] prints the rank and
//! the panic, then ends the process with exit code 1, aborting the MPI job when MPI is running
//! (so that no peer waits forever for a rank that is gone).

use std::sync::atomic::{AtomicUsize, Ordering};

use mpi::ffi;

/// This process's rank once MPI has started (`usize::MAX` before).
static RANK: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Records this process's MPI rank, for the panic message.
pub(crate) fn set_rank(rank: usize) {
    RANK.store(rank, Ordering::Relaxed);
}

/// This process's rank: the one recorded, else the launcher's environment (`mpirun`, Slurm).
pub fn rank() -> Option<usize> {
    match RANK.load(Ordering::Relaxed) {
        usize::MAX => ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse().ok()),
        r => Some(r),
    }
}

/// Whether MPI is running (initialised and not finalised).
pub(crate) fn mpi_running() -> bool {
    let (mut init, mut fini) = (0, 0);
    // SAFETY: both may be called at any time, before MPI_Init and after MPI_Finalize.
    unsafe {
        ffi::MPI_Initialized(&mut init);
        ffi::MPI_Finalized(&mut fini);
    }
    init != 0 && fini == 0
}

/// Installs the hook: `eplb-worker: rank R: internal error: <panic>`, then exit code 1
/// (`MPI_Abort` of the whole job when MPI runs, so that no peer waits).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let who = rank().map_or_else(String::new, |r| format!("rank {r}: "));
        eprintln!("eplb-worker: {who}internal error: {info}; this is a bug, please report it with the command line");
        if mpi_running() {
            abort_job(1);
        }
        std::process::exit(1);
    }));
}

/// How long a rank that timed out waiting for a peer may take to end (print, report, abort)
/// before it ends itself.
pub(crate) const END_GRACE: std::time::Duration = std::time::Duration::from_secs(15);

/// Bounds the end of a process that gave up on a peer (the watchdog's timeout): from now on, the
/// process ends within [`END_GRACE`], whatever it waits for. Tearing down a communicator or GPU
/// memory (`ncclCommDestroy`, `cuMemFree`) can wait for the stopped peer forever, as can
/// `MPI_Abort`; past the grace the process prints why and ends with `_exit(1)`, and the launcher
/// ends the others. Armed once; never disarmed.
pub(crate) fn arm_end_guard(rank: usize) {
    static ARMED: std::sync::Once = std::sync::Once::new();
    ARMED.call_once(|| {
        // Dropping the guard would disarm it: it is leaked, and ends the process after the grace.
        std::mem::forget(crate::guard::Guard::new(
            format!(
                "eplb-worker run: rank {rank}: error: the job did not end within {} s of this rank's timeout (a \
                 tear-down or MPI_Abort waits for the unresponsive peer); ending this process",
                END_GRACE.as_secs()
            ),
            END_GRACE,
        ));
    });
}

/// How long `MPI_Abort` may take to end this process before it ends itself.
pub(crate) const ABORT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Ends every rank of the job: `MPI_Abort` on `MPI_COMM_WORLD`, bounded by a guard that ends this
/// process with `_exit(1)` if `MPI_Abort` has not within [`ABORT_GRACE`] (the launcher then ends
/// the others: `mpirun` on a rank that exits without `MPI_Finalize`, Slurm with
/// `--kill-on-bad-exit`). MPI must be running.
pub(crate) fn abort_job(code: i32) -> ! {
    let rank = rank().unwrap_or(0);
    log::debug!("rank {rank}: MPI_Abort({code})");
    // The guard lives until the process ends: MPI_Abort does not return.
    let guard = crate::guard::guard("MPI_Abort", rank, ABORT_GRACE);
    // SAFETY: MPI runs; MPI_Abort ends every rank of the job and does not return on success.
    unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code) };
    drop(guard);
    std::process::exit(code)
}

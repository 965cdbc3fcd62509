//! The last line of defence: a panic never exits 101. [`install_panic_hook`] prints the rank and
//! the panic, then ends the process with exit code 1, aborting the MPI job when MPI is running
//! (so that no peer waits forever for a rank that is gone).

use std::sync::atomic::{AtomicUsize, Ordering};

use mpi::ffi;

/// This process's rank once MPI has started (`usize::MAX` before).
static RANK: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Records this process's MPI rank, for the panic message.
pub fn set_rank(rank: usize) {
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
pub fn mpi_running() -> bool {
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
            // SAFETY: MPI runs; MPI_Abort ends every rank of the job and does not return.
            unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, 1) };
        }
        std::process::exit(1);
    }));
}

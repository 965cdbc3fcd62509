//! Collectives between the ranks: MPI all-reduces of loads and decisions, plan agreement, and the
//! transports that move expert bytes.

use thiserror::Error;

/// An MPI call that failed, with the code MPI returned and its `MPI_Error_string`.
#[derive(Debug, Error)]
#[error("MPI error {code} in {op}: {message}")]
pub struct MpiError {
    /// The MPI function, e.g. `MPI_Allreduce`.
    pub op: &'static str,
    pub code: i32,
    pub message: String,
}

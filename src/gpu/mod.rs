//! The GPU path: expert weights in device memory, moved GPU to GPU with NCCL.
//!
//! Everything goes through `cudarc` with dynamic loading, and nothing here touches CUDA before
//! [`check_cuda`] has confirmed that libcuda and libnccl can be loaded: cudarc panics when a
//! library is missing, and the binary must run its CPU path on machines without CUDA.
//!
//! * [`device`]: device choice, the context, a dedicated non-blocking stream, the kernels;
//! * [`nccl`]: the communicator (unique id broadcast through MPI) and grouped send/recv;
//! * [`store`]: [`store::DeviceExpertStore`], the [`crate::executor::ExpertStore`] in GPU memory;
//! * [`ipc`]: an engine's GPU memory opened from its CUDA IPC handles (contract weights_kind 1).

pub mod device;
pub mod ipc;
pub mod nccl;
pub mod store;

use crate::exit::{ExitKind, Failure};
use thiserror::Error;

use crate::executor::ExecError;

/// The kernels (`kernels.cu`), compiled to PTX by `cargo run --example gen_ptx`; the driver
/// JIT-compiles them at start-up.
pub(crate) const KERNELS_PTX: &str = include_str!("kernels.ptx");

/// The source the PTX was generated from, to check that the two agree.
#[cfg(test)]
const KERNELS_CU: &str = include_str!("kernels.cu");

/// FNV-1a 64 of a text: `kernels.ptx` records the hash of the `kernels.cu` it came from.
pub fn source_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Errors of the GPU path.
#[derive(Debug, Error)]
pub enum GpuError {
    #[error("no CUDA driver: {0} could not be loaded; use --transport host on machines without NVIDIA GPUs")]
    NoDriver(&'static str),
    #[error("no NCCL: libnccl.so could not be loaded; install NCCL or use --transport host")]
    NoNccl,
    #[error("no GPU for local rank {local_rank}: {visible} GPU(s) visible on this node")]
    NoGpu { local_rank: usize, visible: usize },
    #[error("CUDA error in {op}: {message}")]
    Cuda { op: &'static str, message: String },
    #[error("NCCL error {code} in {op}: {message}")]
    Nccl { op: &'static str, code: i32, message: String },
    #[error("{0}")]
    Mpi(String),
    /// The request does not fit the GPU (bad input: exit 2).
    #[error("{0}")]
    TooBig(String),
    /// A wait past `--timeout` (the watchdog's error, naming the ranks that did not answer).
    #[error(transparent)]
    Watchdog(#[from] crate::collective::MpiError),
}

/// Bad input when the machine lacks what was asked for (no driver, NCCL or GPU), else a failure.
impl Failure for GpuError {
    fn kind(&self) -> ExitKind {
        match self {
            GpuError::NoDriver(_) | GpuError::NoNccl | GpuError::NoGpu { .. } | GpuError::TooBig(_) => {
                ExitKind::BadInput
            }
            _ => ExitKind::Runtime,
        }
    }
}

impl From<GpuError> for ExecError {
    fn from(e: GpuError) -> Self {
        match e {
            GpuError::Cuda { op, message } => ExecError::Cuda { op, message },
            GpuError::Nccl { op, code, message } => ExecError::Nccl { op, code, message },
            GpuError::Watchdog(e) => ExecError::Mpi(e),
            other => ExecError::Other(other.to_string()),
        }
    }
}

/// Formats a CUDA driver error with its name and description.
pub(crate) fn cuda_err(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> GpuError {
    move |e| {
        let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        GpuError::Cuda { op, message: format!("{name} ({}): {text}", e.0 as i32) }
    }
}

/// Whether the CUDA driver and NCCL libraries can be loaded. Call before any other GPU function.
pub(crate) fn check_cuda() -> Result<(), GpuError> {
    // SAFETY: these only try to dlopen the libraries; they never call into them.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(GpuError::NoDriver("libcuda.so"));
    }
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(GpuError::NoNccl);
    }
    Ok(())
}

/// Whether this rank could use a GPU: the libraries load and its local rank has a device.
/// Opens no context.
pub(crate) fn gpu_usable(local_rank: usize) -> bool {
    check_cuda().is_ok() && device::select_device(local_rank).is_ok()
}

/// This rank's GPU, opened: the libraries are checked first, then the device is chosen by local
/// rank (or the only one visible).
pub(crate) fn open_local_gpu(local_rank: usize) -> Result<device::Gpu, GpuError> {
    check_cuda()?;
    device::Gpu::open(device::select_device(local_rank)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_ptx_was_generated_from_kernels_cu() {
        let want = format!("source hash {:016x}", source_hash(KERNELS_CU));
        let first = KERNELS_PTX.lines().next().unwrap_or("");
        assert!(first.contains(&want), "kernels.ptx is stale: run `cargo run --example gen_ptx` ({first} vs {want})");
        for kernel in ["fill_pattern", "count_wrong", "checksum"] {
            assert!(KERNELS_PTX.contains(&format!(".entry {kernel}")), "{kernel} missing from the PTX");
        }
    }

    #[test]
    fn check_cuda_never_panics() {
        // On a machine without CUDA this is an error, on a GPU machine Ok; never a panic.
        let _ = check_cuda();
    }
}

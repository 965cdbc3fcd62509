//! The NCCL communicator of the ranks, bootstrapped through MPI, and grouped send/recv.

use std::cell::Cell;
use std::ffi::CStr;
use std::rc::Rc;

use cudarc::driver::sys as cu;
use cudarc::nccl::{result, sys};

use super::device::Gpu;
use super::GpuError;
use crate::collective::{Comm, Watchdog};

/// Most point-to-point operations one rank may post in one NCCL group: groups with thousands of
/// operations have hung in NCCL (pytorch #174288). The executor cuts a layer's global transfer
/// list into rounds small enough that no rank exceeds it, the same cut on every rank, so that the
/// groups of every pair of ranks match (asymmetric op lists hang too, nccl #2130).
pub(crate) const MAX_OPS_PER_GROUP: usize = 1024;

/// Formats an NCCL failure: its code, `ncclGetErrorString`, and `ncclGetLastError` when a
/// communicator exists.
fn nccl_err(op: &'static str, comm: Option<sys::ncclComm_t>) -> impl FnOnce(result::NcclError) -> GpuError {
    move |e| {
        let code = e.0 as i32;
        // SAFETY: NCCL returns static NUL-terminated strings.
        let mut message = unsafe { CStr::from_ptr(sys::ncclGetErrorString(e.0)) }.to_string_lossy().into_owned();
        if let Some(comm) = comm {
            // SAFETY: as above; `comm` is a live communicator.
            let last = unsafe { CStr::from_ptr(sys::ncclGetLastError(comm)) }.to_string_lossy().into_owned();
            if !last.is_empty() {
                message = format!("{message}: {last}");
            }
        }
        GpuError::Nccl { op, code, message }
    }
}

/// One point-to-point operation of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum P2p {
    Send { peer: usize, ptr: cu::CUdeviceptr, bytes: usize },
    Recv { peer: usize, ptr: cu::CUdeviceptr, bytes: usize },
}

/// An NCCL communicator over all ranks of the MPI world, one GPU per rank.
pub(crate) struct NcclComm {
    comm: sys::ncclComm_t,
    pub rank: usize,
    pub size: usize,
    /// Buffers registered with `ncclCommRegister`, deregistered before the communicator goes.
    registered: Vec<*mut std::ffi::c_void>,
    /// The watchdog of the MPI communicator it was bootstrapped on: bounds [`NcclComm::synchronize`].
    watchdog: Option<Rc<Watchdog>>,
    /// Set once `ncclCommAbort` ran: the communicator is gone.
    aborted: Cell<bool>,
}

impl NcclComm {
    /// Rank 0 creates the unique id, which reaches every rank through MPI; every rank then
    /// joins. Collective over `comm`. The calling thread must have the rank's GPU context current.
    pub(crate) fn bootstrap(comm: &Comm) -> Result<NcclComm, GpuError> {
        let (rank, size) = (comm.rank(), comm.size());
        let comm_watchdog = comm.watchdog().cloned();
        let mut id = [0u8; 128];
        // Rank 0's id; a failure there still joins the exchange, with zeros, and every rank sees it.
        let created =
            if rank == 0 { Some(result::get_uniqueid().map_err(nccl_err("ncclGetUniqueId", None))) } else { None };
        if let Some(Ok(uid)) = &created {
            for (d, s) in id.iter_mut().zip(uid.internal.iter()) {
                *d = *s as u8;
            }
        }
        let all = comm.allgather_bytes(&id).map_err(|e| GpuError::Mpi(e.to_string()))?;
        if let Some(Err(e)) = created {
            return Err(e);
        }
        if all[0].iter().all(|&b| b == 0) {
            return Err(GpuError::Nccl {
                op: "ncclGetUniqueId",
                code: -1,
                message: "rank 0 could not create the NCCL id".into(),
            });
        }
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(all[0].iter()) {
            *d = *s as _;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; every rank calls this with the same id.
        // A blocking call that cannot be polled: the watchdog's guard bounds it.
        let guard = comm_watchdog.as_ref().map(|w| w.guard("ncclCommInitRank"));
        unsafe { result::comm_init_rank(&mut comm, size as i32, uid, rank as i32) }
            .map_err(nccl_err("ncclCommInitRank", None))?;
        drop(guard);
        Ok(NcclComm { comm, rank, size, registered: Vec::new(), watchdog: comm_watchdog, aborted: Cell::new(false) })
    }

    /// Registers a device buffer with the communicator (`ncclCommRegister`), so that NCCL moves
    /// data straight between the ranks' buffers on NVLink instead of through its own FIFOs.
    /// Every rank must register the buffers it passes to send/recv, or none.
    pub(crate) fn register(&mut self, ptr: cu::CUdeviceptr, bytes: usize) -> Result<(), GpuError> {
        let mut handle: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: `ptr..ptr+bytes` is a live device allocation of this rank's GPU; the handle is
        // kept until `deregister_all`, which runs before the buffer is freed.
        let rc = unsafe { sys::ncclCommRegister(self.comm, ptr as *mut _, bytes, &mut handle) };
        rc.result().map_err(nccl_err("ncclCommRegister", Some(self.comm)))?;
        self.registered.push(handle);
        Ok(())
    }

    /// Deregisters every buffer registered so far (before they are freed).
    pub(crate) fn deregister_all(&mut self) {
        for handle in self.registered.drain(..) {
            // SAFETY: a handle from ncclCommRegister on this communicator, deregistered once.
            let _ = unsafe { sys::ncclCommDeregister(self.comm, handle) };
        }
    }

    /// Waits for everything queued on `gpu`'s stream (NCCL groups included), polling the stream
    /// and NCCL's asynchronous error, at most the watchdog's timeout. On an NCCL error or a
    /// timeout the communicator is aborted (`ncclCommAbort`), so that no kernel waits forever
    /// for a peer, and the error (with its code, or the ranks that did not answer) is returned.
    pub(crate) fn synchronize(&self, gpu: &Gpu) -> Result<(), GpuError> {
        let stream = gpu.stream();
        let poll = || -> Result<bool, GpuError> {
            // SAFETY: a valid stream of the current context.
            match unsafe { cu::cuStreamQuery(stream) } {
                cu::CUresult::CUDA_SUCCESS => return Ok(true),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(super::cuda_err("cuStreamQuery")(cudarc::driver::DriverError(e))),
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out-pointer.
            let rc = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            for r in [rc, state] {
                if r != sys::ncclResult_t::ncclSuccess && r != sys::ncclResult_t::ncclInProgress {
                    return Err(nccl_err("ncclCommGetAsyncError", Some(self.comm))(result::NcclError(r)));
                }
            }
            Ok(false)
        };
        let waited = match &self.watchdog {
            Some(w) => w.poll_until("NCCL send/recv (stream)", poll),
            None => gpu.synchronize(),
        };
        if waited.is_err() {
            self.abort();
        }
        waited
    }

    /// `ncclCommAbort`: ends every operation of the communicator, once.
    pub(crate) fn abort(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: a live communicator; it is not used afterwards (Drop checks `aborted`).
            unsafe {
                let _ = result::comm_abort(self.comm);
            }
        }
    }

    /// Posts `ops` as one NCCL group on `stream`; returns once they are queued (not completed).
    pub fn group(&self, ops: &[P2p], stream: cu::CUstream) -> Result<(), GpuError> {
        if ops.is_empty() {
            return Ok(());
        }
        let stream = stream as sys::cudaStream_t;
        result::group_start().map_err(nccl_err("ncclGroupStart", Some(self.comm)))?;
        let mut posted = Ok(());
        for op in ops {
            // SAFETY: the pointers are inside live device allocations of this rank's GPU, and
            // they stay valid until the stream is synchronised.
            let r = unsafe {
                match *op {
                    P2p::Send { peer, ptr, bytes } => result::send(
                        ptr as *const _,
                        bytes,
                        sys::ncclDataType_t::ncclUint8,
                        peer as i32,
                        self.comm,
                        stream,
                    )
                    .map_err(nccl_err("ncclSend", Some(self.comm))),
                    P2p::Recv { peer, ptr, bytes } => result::recv(
                        ptr as *mut _,
                        bytes,
                        sys::ncclDataType_t::ncclUint8,
                        peer as i32,
                        self.comm,
                        stream,
                    )
                    .map_err(nccl_err("ncclRecv", Some(self.comm))),
                }
            };
            if r.is_err() {
                posted = r.map(|_| ());
                break;
            }
        }
        // The group must be closed even after a failed call.
        let ended = result::group_end().map_err(nccl_err("ncclGroupEnd", Some(self.comm)));
        posted?;
        ended.map(|_| ())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.aborted.get() {
            return;
        }
        self.deregister_all();
        // SAFETY: created by ncclCommInitRank, destroyed once, after the stream was drained.
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}

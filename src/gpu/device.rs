//! One rank's GPU: device choice, context, a dedicated non-blocking stream, buffers and kernels.
//!
//! Raw driver calls (`cudarc::driver::result`) on one stream, with no per-call event records:
//! the executor synchronises the stream itself where the data must be complete.

use std::ffi::{c_void, CString};
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::{cuda_err, GpuError, KERNELS_PTX};

/// Threads per block of the pattern kernels.
const BLOCK: u32 = 256;
/// Upper bound on blocks of the grid-stride pattern kernels (enough to fill an H100/H200).
const MAX_BLOCKS: u64 = 132 * 16;

/// The GPU a rank uses: its local rank's, or the only one visible (e.g. `CUDA_VISIBLE_DEVICES`
/// set per task by Slurm).
pub(crate) fn select_device(local_rank: usize) -> Result<usize, GpuError> {
    let visible = CudaContext::device_count().map_err(cuda_err("cuDeviceGetCount"))?.max(0) as usize;
    match visible {
        0 => Err(GpuError::NoGpu { local_rank, visible }),
        1 => Ok(0),
        n if local_rank < n => Ok(local_rank),
        n => Err(GpuError::NoGpu { local_rank, visible: n }),
    }
}

/// A device allocation, freed on drop.
#[derive(Debug)]
pub(crate) struct DeviceBuffer {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

impl DeviceBuffer {
    /// Byte `offset` into the buffer as a device pointer.
    pub fn at(&self, offset: usize) -> sys::CUdeviceptr {
        debug_assert!(offset <= self.bytes);
        self.ptr + offset as u64
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.bytes > 0 {
            // SAFETY: allocated by `malloc_sync` in this process, freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// A rank's GPU with its stream and kernels.
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    pub ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: sys::CUmodule,
    fill: sys::CUfunction,
    count_wrong: sys::CUfunction,
    checksum: sys::CUfunction,
}

impl Gpu {
    /// Opens device `ordinal`: its primary context, a new non-blocking stream, and the kernels
    /// (the embedded PTX, JIT-compiled by the driver).
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("cuCtxCreate"))?;
        // SAFETY: this crate synchronises its one stream itself; no CudaSlice is shared.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(cuda_err("cuDeviceGetName"))?;
        let stream = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
        let ptx =
            CString::new(KERNELS_PTX).map_err(|_| GpuError::Cuda { op: "load PTX", message: "NUL in PTX".into() })?;
        // SAFETY: a NUL-terminated PTX image; the context is current (new_stream bound it).
        let module = unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) }
            .map_err(cuda_err("cuModuleLoadData"))?;
        let get = |name: &str| {
            let c = CString::new(name).expect("kernel names have no NUL");
            // SAFETY: `module` was just loaded and stays loaded while `Gpu` lives.
            unsafe { result::module::get_function(module, c) }.map_err(cuda_err("cuModuleGetFunction"))
        };
        let fill = get("fill_pattern")?;
        let count_wrong = get("count_wrong")?;
        let checksum = get("checksum")?;
        Ok(Gpu { ordinal, name, ctx, stream, module, fill, count_wrong, checksum })
    }

    /// The dedicated stream's raw handle.
    pub(crate) fn stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    /// Makes this GPU's context current on the calling thread.
    pub fn bind(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(cuda_err("cuCtxSetCurrent"))
    }

    /// Allocates `bytes` of device memory.
    pub(crate) fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, GpuError> {
        self.bind()?;
        if bytes == 0 {
            return Ok(DeviceBuffer { ptr: 0, bytes: 0 });
        }
        // SAFETY: the context is current.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(cuda_err("cuMemAlloc"))?;
        Ok(DeviceBuffer { ptr, bytes })
    }

    /// Waits for everything queued on the stream.
    pub(crate) fn synchronize(&self) -> Result<(), GpuError> {
        // SAFETY: a valid stream of this context.
        unsafe { result::stream::synchronize(self.stream()) }.map_err(cuda_err("cuStreamSynchronize"))
    }

    /// Queues a device-to-device copy of `bytes` on the stream.
    pub fn copy(&self, dst: sys::CUdeviceptr, src: sys::CUdeviceptr, bytes: usize) -> Result<(), GpuError> {
        // SAFETY: the caller passes pointers inside live allocations of this context.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream()) }.map_err(cuda_err("cuMemcpyDtoDAsync"))
    }

    fn launch(&self, f: sys::CUfunction, words: u64, params: &mut [*mut c_void]) -> Result<(), GpuError> {
        let blocks = words.div_ceil(BLOCK as u64).clamp(1, MAX_BLOCKS) as u32;
        // SAFETY: `params` point at values that match the kernel's signature and outlive the call
        // (cuLaunchKernel copies them before returning).
        unsafe { result::launch_kernel(f, (blocks, 1, 1), (BLOCK, 1, 1), 0, self.stream(), params) }
            .map_err(cuda_err("cuLaunchKernel"))
    }

    /// Queues: `dst[0..bytes)` = the pattern of (layer, expert). `bytes` is a multiple of 8.
    pub(crate) fn fill_pattern(
        &self,
        dst: sys::CUdeviceptr,
        bytes: usize,
        layer: usize,
        expert: usize,
    ) -> Result<(), GpuError> {
        let (mut dst, mut words, mut layer, mut expert) = (dst, (bytes / 8) as u64, layer as u64, expert as u64);
        let mut params = [
            &mut dst as *mut _ as *mut c_void,
            &mut words as *mut _ as *mut c_void,
            &mut layer as *mut _ as *mut c_void,
            &mut expert as *mut _ as *mut c_void,
        ];
        self.launch(self.fill, words, &mut params)
    }

    /// Queues: `*counter += bytes of src[0..bytes) that differ from the pattern of (layer, expert)`.
    pub(crate) fn count_wrong(
        &self,
        src: sys::CUdeviceptr,
        bytes: usize,
        layer: usize,
        expert: usize,
        counter: sys::CUdeviceptr,
    ) -> Result<(), GpuError> {
        let (mut src, mut words, mut layer, mut expert, mut counter) =
            (src, (bytes / 8) as u64, layer as u64, expert as u64, counter);
        let mut params = [
            &mut src as *mut _ as *mut c_void,
            &mut words as *mut _ as *mut c_void,
            &mut layer as *mut _ as *mut c_void,
            &mut expert as *mut _ as *mut c_void,
            &mut counter as *mut _ as *mut c_void,
        ];
        self.launch(self.count_wrong, words, &mut params)
    }

    /// Queues: `*sum += checksum of src[0..bytes)` (the `checksum` kernel: an order-independent
    /// sum of mixed words, so sender and receiver agree whatever the launch shape).
    pub fn checksum(&self, src: sys::CUdeviceptr, bytes: usize, sum: sys::CUdeviceptr) -> Result<(), GpuError> {
        let (mut src, mut words, mut sum) = (src, (bytes / 8) as u64, sum);
        let mut params =
            [&mut src as *mut _ as *mut c_void, &mut words as *mut _ as *mut c_void, &mut sum as *mut _ as *mut c_void];
        self.launch(self.checksum, words, &mut params)
    }

    /// Queues `bytes` zero bytes at `dst`.
    pub fn zero(&self, dst: sys::CUdeviceptr, bytes: usize) -> Result<(), GpuError> {
        // SAFETY: `dst` points at `bytes` of this context's memory.
        unsafe { result::memset_d8_async(dst, 0, bytes, self.stream()) }.map_err(cuda_err("cuMemsetD8Async"))
    }

    /// Reads `out.len()` device u64s at `src` (waits for the stream first).
    pub(crate) fn read_u64s(&self, src: sys::CUdeviceptr, out: &mut [u64]) -> Result<(), GpuError> {
        if out.is_empty() {
            return Ok(());
        }
        // SAFETY: `src` points at `out.len()` u64s of this context's memory; the stream is
        // drained before `out` is read.
        unsafe {
            result::memcpy_dtoh_async(out, src, self.stream()).map_err(cuda_err("cuMemcpyDtoHAsync"))?;
        }
        self.synchronize()
    }

    /// Queues `counter = 0`.
    pub(crate) fn zero_u64(&self, counter: sys::CUdeviceptr) -> Result<(), GpuError> {
        // SAFETY: `counter` points at 8 bytes of this context's memory.
        unsafe { result::memset_d8_async(counter, 0, 8, self.stream()) }.map_err(cuda_err("cuMemsetD8Async"))
    }

    /// Reads a device u64 (waits for the stream first).
    pub(crate) fn read_u64(&self, src: sys::CUdeviceptr) -> Result<u64, GpuError> {
        let mut out = [0u64; 1];
        // SAFETY: `src` points at 8 bytes of this context's memory; the copy is synchronous
        // after the stream has drained.
        unsafe {
            result::memcpy_dtoh_async(&mut out[..], src, self.stream()).map_err(cuda_err("cuMemcpyDtoHAsync"))?;
        }
        self.synchronize()?;
        Ok(out[0])
    }

    /// Free and total device memory in bytes.
    pub(crate) fn mem_info(&self) -> Result<(usize, usize), GpuError> {
        self.bind()?;
        result::mem_get_info().map_err(cuda_err("cuMemGetInfo"))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.synchronize();
        // SAFETY: loaded in `open`, unloaded once; no kernel of it is queued any more.
        let _ = unsafe { result::module::unload(self.module) };
    }
}

//! The engine's GPU memory, opened from its CUDA IPC handles (contract weights_kind 1).
//!
//! * The GPU is chosen by the PCI bus id the engine wrote (`cuDeviceGetByPCIBusId`) and checked
//!   against its UUID, never by index: the engine and the sidecar may see different
//!   `CUDA_VISIBLE_DEVICES`, and index 0 of one is not index 0 of the other.
//! * Each handle is opened once with `cuIpcOpenMemHandle(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)`
//!   and closed with `cuIpcCloseMemHandle` when the [`IpcMapping`] drops, after the store has
//!   drained its stream (no stream sync inside a deleter, which hung SGLang, PR #17870).
//! * Legacy IPC handles only name plain `cudaMalloc` memory. PyTorch's
//!   `expandable_segments:True` allocates with the VMM API (`cuMemCreate`), which needs
//!   `cuMemExportToShareableHandle` plus `pidfd_getfd` (ptrace rights, often refused in
//!   containers, pytorch #165685); the Python client refuses it, and an open that fails here says
//!   so.
//! * The importer reserves about 9/8 of each allocation's size in virtual addresses (pytorch
//!   #186213); with a few packed handles that is a few hundred GiB of the 128 TiB address space.

use std::ffi::CString;

use cudarc::driver::{result, sys};

use super::GpuError;
use crate::engine::shm::region::{IpcHandle, IpcWeights};

/// The ordinal (in this process's view) of the GPU with PCI bus id `bus_id`, checked against
/// `uuid` (all zeros: not checked).
pub fn device_by_pci(bus_id: &str, uuid: &[u8; 16]) -> Result<usize, GpuError> {
    result::init().map_err(super::cuda_err("cuInit"))?;
    let c = CString::new(bus_id).map_err(|_| GpuError::Cuda { op: "pci bus id", message: "NUL in the id".into() })?;
    let mut dev: sys::CUdevice = 0;
    // SAFETY: a NUL-terminated string and an out pointer to a CUdevice.
    let r = unsafe { sys::cuDeviceGetByPCIBusId(&mut dev, c.as_ptr()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "(unset)".into());
        return Err(GpuError::Cuda {
            op: "cuDeviceGetByPCIBusId",
            message: format!(
                "the engine's GPU {bus_id} is not visible to this sidecar rank ({r:?}; CUDA_VISIBLE_DEVICES={visible}): \
                 run the sidecar where it sees the engine's GPUs (unset CUDA_VISIBLE_DEVICES or list the same GPUs)"
            ),
        });
    }
    if uuid.iter().any(|&b| b != 0) {
        let mut got = sys::CUuuid { bytes: [0; 16] };
        // SAFETY: an out pointer to a CUuuid and a device from the driver.
        let r = unsafe { sys::cuDeviceGetUuid_v2(&mut got, dev) };
        let got: Vec<u8> = got.bytes.iter().map(|&b| b as u8).collect();
        if r == sys::CUresult::CUDA_SUCCESS && got != uuid {
            return Err(GpuError::Cuda {
                op: "cuDeviceGetUuid",
                message: format!(
                    "the GPU at {bus_id} has UUID {}, the engine wrote {}: the region comes from another host or GPU",
                    hex(&got),
                    hex(uuid)
                ),
            });
        }
    }
    Ok(dev as usize)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One opened handle: the base of the engine's allocation in this process, closed on drop.
#[derive(Debug)]
pub struct IpcMapping {
    pub base: sys::CUdeviceptr,
    /// The allocation's size as the driver reports it here.
    pub size: usize,
}

impl IpcMapping {
    /// Opens `h` in the current context (the engine's GPU) and checks that the tensor behind it
    /// (`offset`, `bytes`) lies inside the allocation.
    pub fn open(h: &IpcHandle, index: usize) -> Result<IpcMapping, GpuError> {
        let mut raw = sys::CUipcMemHandle { reserved: [0; 64] };
        for (d, s) in raw.reserved.iter_mut().zip(h.handle.iter()) {
            *d = *s as _;
        }
        let mut base: sys::CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: an out pointer and a handle by value; the context is current.
        let r = unsafe { sys::cuIpcOpenMemHandle_v2(&mut base, raw, flags) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(GpuError::Cuda {
                op: "cuIpcOpenMemHandle",
                message: format!(
                    "IPC handle {index} could not be opened ({r:?}). Causes: the engine allocated with \
                     PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (VMM memory has no legacy IPC handle: unset it \
                     in the engine); the engine died and freed the memory; the sidecar runs in another container or \
                     without the engine's GPU; or the handle comes from this very process"
                ),
            });
        }
        let mut mapping = IpcMapping { base, size: 0 };
        let mut got_base: sys::CUdeviceptr = 0;
        // SAFETY: out pointers; `base` is a live mapping of this context.
        let r = unsafe { sys::cuMemGetAddressRange_v2(&mut got_base, &mut mapping.size, base) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(GpuError::Cuda { op: "cuMemGetAddressRange", message: format!("IPC handle {index}: {r:?}") });
        }
        let end = h.offset.saturating_add(h.bytes);
        if end > mapping.size as u64 {
            return Err(GpuError::Cuda {
                op: "cuIpcOpenMemHandle",
                message: format!(
                    "IPC handle {index}: the tensor ends at byte {end} of an allocation of {} bytes: the region's IPC table is wrong",
                    mapping.size
                ),
            });
        }
        Ok(mapping)
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        // SAFETY: opened by `cuIpcOpenMemHandle` in this process, closed once; the owner drains
        // its stream first.
        let _ = unsafe { sys::cuIpcCloseMemHandle(self.base) };
    }
}

/// Every handle of `w` opened: the device pointers of each layer's live slots and of staging.
pub struct IpcMemory {
    /// `live[layer]`: `slots_per_rank * expert_bytes` bytes.
    pub live: Vec<sys::CUdeviceptr>,
    pub staging: sys::CUdeviceptr,
    pub mappings: Vec<IpcMapping>,
}

impl IpcMemory {
    /// Opens every handle (the engine's GPU context must be current).
    pub fn open(w: &IpcWeights, num_layers: usize, layer_bytes: u64) -> Result<IpcMemory, GpuError> {
        let mappings =
            w.handles.iter().enumerate().map(|(i, h)| IpcMapping::open(h, i)).collect::<Result<Vec<_>, _>>()?;
        let at = |(i, off): (usize, u64)| mappings[i].base + off;
        let missing = |what: String| GpuError::Cuda { op: "IPC table", message: format!("{what} has no IPC handle") };
        let live = (0..num_layers)
            .map(|l| w.live(l, layer_bytes).map(at).ok_or_else(|| missing(format!("layer {l}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let staging = w.staging().map(at).ok_or_else(|| missing("the staging area".into()))?;
        Ok(IpcMemory { live, staging, mappings })
    }
}

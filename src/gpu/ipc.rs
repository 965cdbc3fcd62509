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
use crate::engine::shm::apply::expert_rows;
use crate::engine::shm::region::{IpcHandle, Layout};
use crate::executor::memory::ExpertRows;

/// The ordinal (in this process's view) of the GPU with PCI bus id `bus_id`, checked against
/// `uuid` (all zeros: not checked).
pub(crate) fn device_by_pci(bus_id: &str, uuid: &[u8; 16]) -> Result<usize, GpuError> {
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
    /// Opens `h` in the current context (the engine's GPU) and checks that the allocation is at
    /// least as large as the engine said (the table's extents were checked against that size).
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
        if h.bytes > mapping.size as u64 {
            return Err(GpuError::TooBig(format!(
                "IPC handle {index}: the engine says its allocation has {} bytes, but the driver maps {}: the region's IPC table is wrong; nothing was moved",
                h.bytes, mapping.size
            )));
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

/// The rows of one global tensor (never written; hashed to prove it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalRows {
    pub ptr: sys::CUdeviceptr,
    pub row_stride: u64,
    pub row_bytes: usize,
    pub rows: usize,
}

/// Every distinct handle of a region opened once: the device addresses of every per-expert
/// tensor's rows (live layers and staging) and of the global tensors.
pub struct IpcMemory {
    /// Device addresses of the per-expert rows.
    pub rows: ExpertRows,
    pub globals: Vec<GlobalRows>,
    pub mappings: Vec<IpcMapping>,
}

impl IpcMemory {
    /// Opens every distinct handle of `layout`'s IPC section once (the engine's GPU context must
    /// be current): handles with the same bytes are one allocation, opened once (a second
    /// `cuIpcOpenMemHandle` of one allocation in one context fails).
    pub fn open(layout: &Layout) -> Result<IpcMemory, GpuError> {
        let w = layout.ipc.as_ref().ok_or(GpuError::Cuda { op: "IPC table", message: "no IPC section".into() })?;
        let mut mappings: Vec<IpcMapping> = Vec::new();
        let mut first: std::collections::HashMap<[u8; 64], usize> = std::collections::HashMap::new();
        let mut which = Vec::with_capacity(w.handles.len());
        for (i, h) in w.handles.iter().enumerate() {
            let m = match first.get(&h.handle) {
                Some(&m) => m,
                None => {
                    // A handle that cannot be opened is bad input (exit 2), named by the first
                    // table entry that lives in it.
                    let mapping = IpcMapping::open(h, i).map_err(|e| {
                        let user = (0..layout.tensors.len())
                            .find(|&j| layout.tensors[j].rows > 0 && layout.tensors[j].handle as usize == i)
                            .map_or("no table entry".to_string(), |j| layout.entry_name(j));
                        GpuError::TooBig(format!("tensor table: {user}: field handle {i}: {e}; nothing was moved"))
                    })?;
                    mappings.push(mapping);
                    first.insert(h.handle, mappings.len() - 1);
                    mappings.len() - 1
                }
            };
            which.push(m);
        }
        let base = |handle: u16| mappings[which[handle as usize]].base;
        let mut rows = expert_rows(layout);
        let tensors = layout.expert_tensors();
        for (l, spans) in rows.spans.iter_mut().enumerate() {
            for (span, &t) in spans.iter_mut().zip(&tensors) {
                span.at += base(layout.entry(l, t).handle);
            }
        }
        let globals = layout
            .global_tensors()
            .into_iter()
            .flat_map(|t| (0..layout.num_layers).map(move |l| (l, t)))
            .map(|(l, t)| {
                let e = layout.entry(l, t);
                GlobalRows {
                    ptr: base(e.handle) + e.offset,
                    row_stride: e.row_stride,
                    row_bytes: e.row_bytes as usize,
                    rows: e.rows as usize,
                }
            })
            .collect();
        Ok(IpcMemory { rows, globals, mappings })
    }
}

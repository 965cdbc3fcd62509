"""CUDA IPC handles of an engine's expert weights, for the contract's weights_kind 1.

The engine keeps its live expert slots and one staging area in its own GPU memory and exports a
few *packed* handles (one per allocation; vLLM's PR #176 measured ~19.5k cudaIpcOpenMemHandle
calls for a 30B MoE with a handle per tensor, 12-13.5 s, and ~5.3 s once packed). Through the
driver API (``libcuda.so.1`` with ctypes, no CUDA toolkit and no torch needed here):

* ``cuIpcGetMemHandle`` names the whole allocation holding a pointer; ``cuMemGetAddressRange``
  gives the pointer's offset inside it (a caching allocator's tensor need not start it);
* ``cuDeviceGetPCIBusId`` / ``cuDeviceGetUuid`` name the GPU, so that a sidecar with another
  ``CUDA_VISIBLE_DEVICES`` opens the same one.

Known traps, refused with a message that says what to do:

* ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (or ``PYTORCH_ALLOC_CONF``) makes PyTorch
  allocate with the VMM API (``cuMemCreate``): legacy IPC handles cannot name that memory, and
  PyTorch's own VMM sharing needs ``pidfd_getfd`` with ptrace rights, often refused in
  containers (pytorch #165685). Allocate the expert weights with it off (it is a per-process
  setting), or with ``torch.cuda.MemPool`` of a plain allocator.
* The importer reserves about 9/8 of each allocation's size in virtual addresses (pytorch
  #186213): export few large allocations, not many.
* The memory must stay allocated while a sidecar has it open: ``EngineRegion.finish`` marks the
  engine finished; ``finish(wait_detach_s=...)`` waits until the sidecar has closed its
  mappings, then the engine may free the tensors.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional, Tuple

from .region import IPC_ROLE_LIVE, IPC_ROLE_STAGING, ContractError, IpcHandle, IpcWeights

_CUDA: Optional[ctypes.CDLL] = None


def _cuda() -> ctypes.CDLL:
    global _CUDA
    if _CUDA is None:
        try:
            _CUDA = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise ContractError(f"libcuda.so.1 cannot be loaded ({e}): CUDA IPC weights need an NVIDIA driver") from e
        _check(_CUDA.cuInit(0), "cuInit")
    return _CUDA


def _check(rc: int, op: str) -> None:
    if rc != 0:
        name = ctypes.c_char_p()
        try:
            _CUDA.cuGetErrorName(rc, ctypes.byref(name))  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the name is only for the message
            pass
        raise ContractError(f"{op} failed: CUDA error {rc} ({(name.value or b'?').decode()})")


def check_alloc_conf() -> None:
    """Refuses ``expandable_segments:True``: legacy CUDA IPC handles cannot name VMM memory."""
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        conf = os.environ.get(var, "").replace(" ", "").lower()
        if "expandable_segments:true" in conf:
            raise ContractError(
                f"{var}={os.environ[var]}: expandable segments allocate VMM memory, which legacy CUDA IPC handles "
                "cannot share (and PyTorch's VMM sharing needs pidfd_getfd with ptrace rights, pytorch #165685); "
                "start the engine without expandable_segments:True")


def export(ptr: int, nbytes: int) -> Tuple[bytes, int]:
    """(the 64-byte IPC handle of the allocation holding ``ptr``, ``ptr``'s offset inside it).
    The calling thread must have the GPU's context current (any CUDA call of torch on it does)."""
    cuda = _cuda()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    _check(cuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)),
           "cuMemGetAddressRange")
    offset = ptr - base.value
    if offset + nbytes > size.value:
        raise ContractError(f"the tensor ({nbytes} bytes at offset {offset}) is not inside one allocation of {size.value} bytes")
    handle = (ctypes.c_char * 64)()
    rc = cuda.cuIpcGetMemHandle(handle, ctypes.c_uint64(ptr))
    if rc != 0:
        check_alloc_conf()
        _check(rc, "cuIpcGetMemHandle (is the memory from cudaMalloc? VMM / expandable-segment memory has no legacy "
                   "IPC handle)")
    return bytes(handle), offset


def device_ids() -> Tuple[str, bytes]:
    """(PCI bus id, 16-byte UUID) of the device of the calling thread's current context (the one
    torch made current), whatever ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` say."""
    cuda = _cuda()
    dev = ctypes.c_int()
    _check(cuda.cuCtxGetDevice(ctypes.byref(dev)), "cuCtxGetDevice (no current CUDA context: allocate on the GPU first)")
    bus = ctypes.create_string_buffer(32)
    _check(cuda.cuDeviceGetPCIBusId(bus, 32, dev), "cuDeviceGetPCIBusId")
    uuid = (ctypes.c_char * 16)()
    _check(cuda.cuDeviceGetUuid_v2(uuid, dev), "cuDeviceGetUuid")
    return bus.value.decode(), bytes(uuid)


def export_weights(live_ptr: int, live_bytes: int, staging_ptr: int, staging_bytes: int) -> IpcWeights:
    """The IPC section for live slots ``[layers][slots][expert_bytes]`` (one contiguous tensor at
    ``live_ptr``) and the staging area (``[slots][expert_bytes]`` at ``staging_ptr``): two handles.
    Call on the thread whose current context is the weights' GPU."""
    check_alloc_conf()
    bus, uuid = device_ids()
    h_live, off_live = export(live_ptr, live_bytes)
    h_stage, off_stage = export(staging_ptr, staging_bytes)
    return IpcWeights(bus, uuid, [IpcHandle(h_live, IPC_ROLE_LIVE, 0, off_live, live_bytes),
                                  IpcHandle(h_stage, IPC_ROLE_STAGING, 0, off_stage, staging_bytes)])

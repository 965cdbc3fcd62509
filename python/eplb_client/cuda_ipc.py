"""CUDA IPC handles of an engine's expert tensors, for contract 2's ``weights_kind`` 1.

The engine keeps every tensor of every MoE layer, and its one-layer staging, in its own GPU
memory, each a separate PyTorch allocation or a piece of one caching-allocator segment. The
client exports **one handle per distinct allocation** (vLLM's PR #176 measured ~19.5k
cudaIpcOpenMemHandle calls for a 30B MoE with a handle per tensor, 12-13.5 s, and ~5.3 s once
packed): for each tensor, ``cuMemGetAddressRange`` gives the base and size of the allocation that
holds it; tensors with the same base share one handle, each with its own byte offset. Through the
driver API (``libcuda.so.1`` with ctypes, no CUDA toolkit and no torch needed here):

* ``cuMemGetAddressRange`` (allocation base and size), ``cuIpcGetMemHandle`` (of the base);
* ``cuPointerGetAttribute`` (the device of a pointer, whether legacy IPC can name it);
* ``cuDeviceGetPCIBusId`` / ``cuDeviceGetUuid`` name the GPU, so that a sidecar with another
  ``CUDA_VISIBLE_DEVICES`` opens the same one.

Known traps, refused with a message that says what to do:

* ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (or ``PYTORCH_ALLOC_CONF``) makes PyTorch
  allocate with the VMM API (``cuMemCreate``): legacy IPC handles cannot name that memory, and
  PyTorch's own VMM sharing needs ``pidfd_getfd`` with ptrace rights, often refused in
  containers (pytorch #165685). Allocate the expert weights with it off (it is a per-process
  setting), or with ``torch.cuda.MemPool`` of a plain allocator.
* The importer reserves about 9/8 of each allocation's size in virtual addresses (pytorch
  #186213): a caching-allocator segment is exported whole, even if one small tensor lives in it.
* The memory must stay allocated, at the same addresses, while a sidecar has it open. The region
  keeps every tensor's ``data_ptr()`` and checks them at every boundary with a pending command (a
  re-allocation, say by ``process_weights_after_loading`` replacing a parameter, sets
  ``table_fault``). ``EngineRegion.finish(wait_detach_s=...)`` waits until the sidecar has closed
  its mappings, then the engine may free the tensors.
* The calling thread needs the GPU's context current (any CUDA call of torch on that thread
  makes it so).
"""

from __future__ import annotations

import builtins
import ctypes
import os
import struct
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .region import IPC_ENTRY_BYTES, IPC_HEAD_BYTES, ContractError

_CUDA: Optional[Any] = None

CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10


class Allocation(NamedTuple):
    """One exported allocation: its base address, its size (``cuMemGetAddressRange``) and the
    64-byte ``cudaIpcMemHandle_t`` of the whole allocation."""

    base: int
    bytes: int
    handle: builtins.bytes  # (``bytes`` is the field above in this class body)


class Export(NamedTuple):
    """The IPC section's content: the GPU (PCI bus id, 16-byte UUID), the distinct allocations
    (handle index = position) and, for every exported tensor in the order given, its
    (handle index, byte offset inside that allocation)."""

    pci_bus_id: str
    uuid: bytes
    allocations: List[Allocation]
    places: List[Tuple[int, int]]


def _cuda() -> Any:
    global _CUDA
    if _CUDA is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise ContractError(f"libcuda.so.1 cannot be loaded ({e}): CUDA IPC weights need an NVIDIA driver") from e
        rc = lib.cuInit(0)
        _CUDA = lib
        _check(rc, "cuInit")
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


def address_range(ptr: int) -> Tuple[int, int]:
    """(base, size) of the allocation that holds device pointer ``ptr``."""
    cuda = _cuda()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    _check(cuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)),
           f"cuMemGetAddressRange({ptr:#x}) (a CUDA pointer of the current context? make the weights' GPU current "
           f"on this thread)")
    return int(base.value), int(size.value)


def ipc_capable(ptr: int) -> Optional[bool]:
    """Whether legacy IPC can name the allocation of ``ptr`` (False for VMM / expandable-segment
    memory); None when the driver cannot say."""
    cuda = _cuda()
    out = ctypes.c_uint64(0)  # the driver writes a bool or an int: a zeroed wider buffer reads either
    rc = cuda.cuPointerGetAttribute(ctypes.byref(out), ctypes.c_int(CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE),
                                    ctypes.c_uint64(ptr))
    return None if rc != 0 else bool(out.value & 0xFFFFFFFF)


def ipc_handle(base: int) -> bytes:
    """The 64-byte ``cudaIpcMemHandle_t`` of the allocation starting at ``base``."""
    cuda = _cuda()
    handle = (ctypes.c_char * 64)()
    rc = cuda.cuIpcGetMemHandle(handle, ctypes.c_uint64(base))
    if rc != 0:
        check_alloc_conf()
        _check(rc, "cuIpcGetMemHandle (is the memory from cudaMalloc? VMM / expandable-segment memory has no legacy "
                   "IPC handle)")
    return bytes(handle)


def device_ids(ptr: Optional[int] = None) -> Tuple[str, bytes]:
    """(PCI bus id, 16-byte UUID) of the device holding ``ptr`` (or of the current context's
    device), whatever ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` say."""
    cuda = _cuda()
    dev = ctypes.c_int()
    ordinal = ctypes.c_uint64(0)
    if ptr is not None and cuda.cuPointerGetAttribute(ctypes.byref(ordinal), ctypes.c_int(CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL),
                                                      ctypes.c_uint64(ptr)) == 0:
        _check(cuda.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(int(ordinal.value & 0xFFFFFFFF))), "cuDeviceGet")
    else:
        _check(cuda.cuCtxGetDevice(ctypes.byref(dev)), "cuCtxGetDevice (no current CUDA context: allocate on the GPU first)")
    bus = ctypes.create_string_buffer(32)
    _check(cuda.cuDeviceGetPCIBusId(bus, 32, dev), "cuDeviceGetPCIBusId")
    uuid = (ctypes.c_char * 16)()
    _check(cuda.cuDeviceGetUuid_v2(uuid, dev), "cuDeviceGetUuid")
    return bus.value.decode(), bytes(uuid)


def export_tensors(items: Sequence[Tuple[str, int, int]]) -> Export:
    """Exports ``items`` = (what, data_ptr, bytes from data_ptr that must be inside the allocation)
    for every tensor of the table: one handle per distinct allocation base, in first-seen order.
    Raises ContractError naming the tensor when one is not inside one legacy-IPC allocation."""
    check_alloc_conf()
    if not items:
        raise ContractError("no CUDA tensors to export")
    bases: Dict[int, int] = {}
    allocations: List[Tuple[int, int]] = []
    places: List[Tuple[int, int]] = []
    for what, ptr, nbytes in items:
        if ptr == 0:
            raise ContractError(f"{what}: field data: data_ptr() is 0 (an empty tensor?)")
        base, size = address_range(ptr)
        offset = ptr - base
        if not 0 <= offset or offset + nbytes > size:
            raise ContractError(f"{what}: field offset: its {nbytes} bytes at offset {offset} are not inside one "
                                f"allocation ({size} bytes at {base:#x})")
        if base not in bases:
            if ipc_capable(base) is False:
                check_alloc_conf()
                raise ContractError(f"{what}: field handle: the allocation at {base:#x} cannot be shared with a legacy "
                                    f"CUDA IPC handle (VMM memory: PyTorch's expandable_segments or cuMemCreate); "
                                    f"allocate the expert weights with cudaMalloc (expandable_segments:False)")
            bases[base] = len(allocations)
            allocations.append((base, size))
        places.append((bases[base], offset))
    bus, uuid = device_ids(items[0][1])
    return Export(bus, uuid, [Allocation(b, s, ipc_handle(b)) for b, s in allocations], places)


def ipc_section(export: Export) -> bytes:
    """The IPC section's bytes (at ``ipc_offset``): ``pci_bus_id[16]``, ``uuid[16]``, 32 reserved,
    then one 128-byte entry per allocation: ``handle[64]``, ``bytes: u64``, 56 reserved."""
    bus = export.pci_bus_id.encode()
    if not 0 < len(bus) < 16 or any(c not in b"0123456789abcdefABCDEF:." for c in bus):
        raise ContractError(f"pci_bus_id {export.pci_bus_id!r} is not a PCI bus id like 0000:19:00.0")
    if len(export.uuid) != 16:
        raise ContractError("the GPU uuid must be 16 bytes")
    out = bytearray(struct.pack("<16s16s32x", bus, bytes(export.uuid)))
    assert len(out) == IPC_HEAD_BYTES
    for i, a in enumerate(export.allocations):
        if len(a.handle) != 64:
            raise ContractError(f"IPC handle {i}: {len(a.handle)} bytes, want 64 (a legacy cudaIpcMemHandle_t)")
        out += struct.pack("<64sQ56x", a.handle, a.bytes)
    assert len(out) == IPC_HEAD_BYTES + IPC_ENTRY_BYTES * len(export.allocations)
    return bytes(out)


def _runs(slots: Any) -> List[Tuple[int, int]]:
    """``slots`` (ascending) as half-open runs of consecutive slots: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs: List[Tuple[int, int]] = []
    for s in (int(x) for x in slots):
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], s + 1)
        else:
            runs.append((s, s + 1))
    return runs


def torch_apply(live: Sequence[Sequence[Any]], staging: Sequence[Optional[Any]],
                per_expert: Sequence[int]) -> Callable[[int, Any], None]:
    """The default GPU apply: ``apply(layer, slots)`` copies row ``s`` of every per-expert staging
    tensor into row ``s`` of ``live[layer]``'s tensor, for every ``s`` in ``slots``, on the
    current stream of the tensors' device, and returns once the copies completed (the sidecar may
    write the staging rows again as soon as the command is answered). Rows only: dim 0 beyond
    the routed slots (shared-expert rows) and the padding between rows are never written; dtypes
    are copied as raw integers of the same size (fp8/fp4 types have no index kernels)."""
    import torch  # the engine handed CUDA tensors: torch is there

    raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    first = staging[per_expert[0]]
    assert first is not None  # per-expert tensors have staging
    device = first.device

    def as_raw(t: Any) -> Any:
        return t.view(raw[t.element_size()]) if t.dim() else t

    live_raw = [[as_raw(row[t]) for t in per_expert] for row in live]
    stage_raw = [as_raw(staging[t]) for t in per_expert]

    def apply(layer: int, slots: Any) -> None:
        if len(slots) == 0:
            return
        with torch.no_grad():  # parameters may require grad: an in-place copy is not part of any graph
            # One device copy per run of consecutive slots and tensor, straight from staging into
            # the live rows: no gather into a temporary (which doubled the bytes read and written).
            for a, b in _runs(slots):
                for dst, src in zip(live_raw[layer], stage_raw):
                    dst[a:b].copy_(src[a:b])
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

    return apply

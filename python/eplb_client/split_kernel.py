"""The exact split (issue 22) as one CUDA kernel: every layer of a step in one launch, one thread
block a layer, the quotas identical to Rust's ``eplb::split``, numpy's :func:`split.split_layer`
and PyTorch's :func:`split.split_layers` (the same algorithm, integers and tie-breaks).

* :func:`split_layers_kernel`: launches ``split_kernel.ptx`` (``split_kernel.cu`` compiled by
  ``scripts/gen_split_ptx.py``) on torch's current stream through the CUDA driver API (ctypes on
  ``libcuda.so.1``; no CUDA toolkit, no host sync): ``(quotas [L, P] int64, max_load [L] int64,
  ok [L] bool)``. Capturable in a CUDA graph once the module is loaded (call it once before the
  capture).
* :func:`split_layers_cuda`: the wrapper to use: one host sync to read ``ok``, layers not ok (bad
  input, which then raises :class:`split.SplitError`, or more than ``max_rounds`` rounds) redone
  by :func:`split.split_layers`.
* :func:`split_layers_cpu`: the same source compiled for the CPU through ``split_kernel_cpu.h``
  (a C compiler, ``cc``), one thread a block: the tests prove the kernel's logic with it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from typing import Any, Dict, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "split_kernel.cu")
SHIM = os.path.join(HERE, "split_kernel_cpu.h")
PTX = os.path.join(HERE, "split_kernel.ptx")
KERNEL = b"split_layers_kernel"
#: Threads a block: one GPU or one flexible expert a thread in the search.
THREADS = 256
#: Rounds (augmentations plus raises of the bound) a layer may take before it is flagged not ok.
MAX_ROUNDS = 1 << 22
#: Dynamic shared memory a block may use without opting in (every GPU since Volta).
SHARED_LIMIT = 48 * 1024


class KernelError(RuntimeError):
    """The kernel could not be loaded or launched (a driver call failed)."""


def ws_bytes(num_logical: int, num_physical: int, slots_per_rank: int) -> int:
    """Bytes of one layer's state (``split_ws_bytes`` of split_kernel.cu, the same formula)."""
    e, p, g = num_logical, num_physical, num_physical // slots_per_rank
    b = 8 * (p + e + g) + 4 * (6 * e + 3 * p + 3 * g + 2)
    return (b + 15) // 16 * 16


def source_hash(text: bytes) -> int:
    """FNV-1a 64 (Rust's ``eplb::gpu::source_hash``): the PTX's header records it of the source."""
    h = 0xCBF29CE484222325
    for b in text:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def ptx_header(source: bytes) -> str:
    return f"// Generated from split_kernel.cu by scripts/gen_split_ptx.py; source hash {source_hash(source):016x}\n"


# ---- the CPU build of the same source ---------------------------------------------------------

_CPU_LIB: Dict[str, Any] = {}


def cpu_library(threaded: bool = False) -> Any:
    """The kernel compiled for the CPU (``cc -O2 -shared -fPIC -x c``; ``$CC`` if set), cached per
    source. ``threaded``: with ``-pthread -DSPLIT_CPU_THREADS``, which adds
    ``split_layers_cpu_threads`` (a block as that many POSIX threads meeting at a barrier)."""
    src = open(SOURCE, "rb").read() + open(SHIM, "rb").read()
    key = hashlib.sha256(src + (b"threads" if threaded else b"")).hexdigest()[:16]
    if key in _CPU_LIB:
        return _CPU_LIB[key]
    out = os.path.join(tempfile.gettempdir(), f"eplb_split_kernel_{key}_{os.getuid()}.so")
    if not os.path.exists(out):
        tmp = f"{out}.{os.getpid()}.tmp"
        extra = ["-pthread", "-DSPLIT_CPU_THREADS"] if threaded else []
        cmd = [os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", "-Wall", *extra, "-x", "c", SOURCE, "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise KernelError(f"{' '.join(cmd)} failed:\n{r.stderr}")
        os.replace(tmp, out)
    lib = ctypes.CDLL(out)
    i64p = ctypes.POINTER(ctypes.c_int64)
    lib.split_layers_cpu.argtypes = [i64p, i64p, i64p, i64p, i64p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                     ctypes.c_int64]
    lib.split_layers_cpu.restype = ctypes.c_int
    lib.split_layers_cpu_params.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    lib.split_layers_cpu_params.restype = ctypes.c_int
    if threaded:
        lib.split_layers_cpu_threads.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        lib.split_layers_cpu_threads.restype = ctypes.c_int
    lib.split_ws_bytes_cpu.argtypes = [ctypes.c_int] * 3
    lib.split_ws_bytes_cpu.restype = ctypes.c_int64
    _CPU_LIB[key] = lib
    return lib


def split_layers_cpu(counts: Any, phy2log: Any, slots_per_rank: int, tokens: Any = None, use_shared: bool = True,
                     scratch_bytes: Optional[int] = None,
                     max_rounds: int = MAX_ROUNDS) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel on the CPU (numpy in and out): ``(quotas [L, P], max_load [L], ok [L] bool)``.
    ``use_shared=False`` runs the global-scratch path with ``scratch_bytes`` a layer (default:
    exactly what it needs)."""
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    phy2log = np.ascontiguousarray(phy2log, dtype=np.int64)
    L, E = counts.shape
    P = phy2log.shape[1]
    if phy2log.shape[0] != L:
        raise ValueError("counts and phy2log must have the same layers")
    tok = counts.sum(1) if tokens is None else np.ascontiguousarray(tokens, dtype=np.int64)
    quotas = np.empty((L, P), dtype=np.int64)
    max_load = np.empty(L, dtype=np.int64)
    ok = np.empty(L, dtype=np.int32)
    if scratch_bytes is None:
        scratch_bytes = ws_bytes(E, P, slots_per_rank) if slots_per_rank > 0 and P % slots_per_rank == 0 else 0
    i64p = ctypes.POINTER(ctypes.c_int64)
    lib = cpu_library()
    rc = lib.split_layers_cpu(counts.ctypes.data_as(i64p), phy2log.ctypes.data_as(i64p), tok.ctypes.data_as(i64p),
                              quotas.ctypes.data_as(i64p), max_load.ctypes.data_as(i64p),
                              ok.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), L, E, P, int(slots_per_rank),
                              int(use_shared), int(scratch_bytes), int(max_rounds))
    if rc != 0:
        raise MemoryError("split_layers_cpu could not allocate its scratch")
    return quotas, max_load, ok.astype(bool)


# ---- the GPU launch (driver API through ctypes) -----------------------------------------------

_LOCK = threading.Lock()
_CUDA: Optional[Any] = None
_MODULES: Dict[Tuple[int, int], Any] = {}  # (device index, context handle) -> CUfunction


def _driver() -> Any:
    global _CUDA
    if _CUDA is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise KernelError(f"libcuda.so.1 cannot be loaded ({e}): the split kernel needs an NVIDIA driver") from e
        _check(lib, lib.cuInit(0), "cuInit")
        _CUDA = lib
    return _CUDA


def _check(lib: Any, rc: int, op: str) -> None:
    if rc != 0:
        name = ctypes.c_char_p()
        try:
            lib.cuGetErrorName(rc, ctypes.byref(name))
        except Exception:  # noqa: BLE001 - the name is only for the message
            pass
        raise KernelError(f"{op} failed: CUDA error {rc} ({(name.value or b'?').decode()})")


def read_ptx() -> bytes:
    """split_kernel.ptx, refused when it was not generated from this split_kernel.cu."""
    ptx = open(PTX, "rb").read()
    want = ptx_header(open(SOURCE, "rb").read()).encode()
    if not ptx.startswith(want):
        raise KernelError("split_kernel.ptx is stale (its source hash is not split_kernel.cu's): run "
                          "scripts/gen_split_ptx.py")
    return ptx


def _function(device_index: int) -> Any:
    """The kernel's CUfunction in the current context (loaded once per device and context)."""
    cuda = _driver()
    ctx = ctypes.c_void_p()
    _check(cuda, cuda.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        raise KernelError("no current CUDA context on this thread: run a torch CUDA operation on the device first")
    key = (device_index, int(ctx.value))
    with _LOCK:
        fn = _MODULES.get(key)
        if fn is None:
            ptx = read_ptx()
            module = ctypes.c_void_p()
            buf = ctypes.create_string_buffer(ptx)  # NUL-terminated, as cuModuleLoadData wants PTX
            _check(cuda, cuda.cuModuleLoadData(ctypes.byref(module), buf), "cuModuleLoadData(split_kernel.ptx)")
            f = ctypes.c_void_p()
            _check(cuda, cuda.cuModuleGetFunction(ctypes.byref(f), module, KERNEL), "cuModuleGetFunction")
            fn = f
            _MODULES[key] = fn
    return fn


def kernel_params(counts: int, phy2log: int, tokens: int, quotas: int, max_load: int, ok: int, scratch: int,
                  scratch_bytes: int, num_logical: int, num_physical: int, slots_per_rank: int, use_shared: bool,
                  max_rounds: int) -> Tuple[list, Any]:
    """``cuLaunchKernel``'s ``kernelParams`` for ``split_layers_kernel``: an array of pointers,
    each to one argument's value in the kernel's parameter order and types (device pointers as
    64-bit integers). Returns ``(values, params)``: keep ``values`` alive until the launch returned
    (the driver copies the values at the call). The CPU build's ``split_layers_cpu_params`` reads
    the same array, so the tests check this packing without a GPU."""
    ptr = ctypes.c_uint64
    values = [ptr(counts), ptr(phy2log), ptr(tokens), ptr(quotas), ptr(max_load), ptr(ok), ptr(scratch),
              ctypes.c_int64(scratch_bytes), ctypes.c_int32(num_logical), ctypes.c_int32(num_physical),
              ctypes.c_int32(slots_per_rank), ctypes.c_int32(1 if use_shared else 0), ctypes.c_int64(max_rounds)]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    return values, params


def split_layers_kernel(counts: Any, phy2log: Any, slots_per_rank: int, tokens: Any = None,
                        threads: int = THREADS, max_rounds: int = MAX_ROUNDS) -> Tuple[Any, Any, Any]:
    """The kernel on CUDA tensors, on torch's current stream, no host sync.

    ``counts [L, E]``, ``phy2log [L, P]`` (integer tensors on one CUDA device), ``tokens [L]``
    (default: the counts' sums). Returns ``(quotas [L, P] int64, max_load [L] int64, ok [L]
    bool)``: where ``ok`` the quotas are exactly :func:`split.split_layers`'s; elsewhere 0 (bad
    input, or more than ``max_rounds`` rounds): use :func:`split_layers_cuda`, which falls back.
    """
    import torch

    dev = counts.device
    if dev.type != "cuda":
        raise KernelError(f"split_layers_kernel needs CUDA tensors (got {dev}); use split.split_layers")
    counts = counts.to(torch.int64).contiguous()
    phy2log = phy2log.to(device=dev, dtype=torch.int64).contiguous()
    L, E = counts.shape
    P = int(phy2log.shape[1])
    S = int(slots_per_rank)
    if phy2log.shape[0] != L:
        raise ValueError(f"counts has {L} layers, phy2log {phy2log.shape[0]}")
    tok = counts.sum(1) if tokens is None else torch.as_tensor(tokens, device=dev, dtype=torch.int64).contiguous()
    quotas = torch.empty((L, P), dtype=torch.int64, device=dev)
    max_load = torch.empty(L, dtype=torch.int64, device=dev)
    ok = torch.empty(L, dtype=torch.int32, device=dev)
    if L == 0:
        return quotas, max_load, ok.bool()
    shape_ok = S > 0 and P > 0 and P % S == 0 and E > 0
    need = ws_bytes(E, P, S) if shape_ok else 0
    use_shared = shape_ok and need <= SHARED_LIMIT
    scratch = None
    scratch_bytes = 0
    if shape_ok and not use_shared:
        scratch_bytes = need
        scratch = torch.empty(L * need, dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        fn = _function(dev.index if dev.index is not None else torch.cuda.current_device())
        stream = torch.cuda.current_stream(dev).cuda_stream
        values, params = kernel_params(counts.data_ptr(), phy2log.data_ptr(), tok.data_ptr(), quotas.data_ptr(),
                                       max_load.data_ptr(), ok.data_ptr(),
                                       scratch.data_ptr() if scratch is not None else 0, scratch_bytes, E, P, S,
                                       use_shared, max_rounds)
        cuda = _driver()
        _check(cuda, cuda.cuLaunchKernel(fn, ctypes.c_uint(L), ctypes.c_uint(1), ctypes.c_uint(1),
                                         ctypes.c_uint(int(threads)), ctypes.c_uint(1), ctypes.c_uint(1),
                                         ctypes.c_uint(need if use_shared else 0), ctypes.c_void_p(stream), params,
                                         None),
               f"cuLaunchKernel(split_layers_kernel, grid ({L},1,1), block ({threads},1,1), "
               f"{need if use_shared else 0} shared bytes)")
        del values  # the driver copied the argument values at the call
    # the scratch is freed by the caching allocator on this stream, after the kernel
    return quotas, max_load, ok.bool()


def split_layers_cuda(counts: Any, phy2log: Any, slots_per_rank: int, tokens: Any = None) -> Tuple[Any, Any]:
    """:func:`split.split_layers`, the same quotas, through the kernel on CUDA tensors (one host
    sync to read ``ok``; layers not ok redone by :func:`split.split_layers`, which raises
    :class:`split.SplitError` on bad input). Other devices: :func:`split.split_layers`."""
    import torch

    from . import split

    if counts.device.type != "cuda":
        return split.split_layers(counts, phy2log, slots_per_rank, tokens)
    q, t, ok = split_layers_kernel(counts, phy2log, slots_per_rank, tokens)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:, 0]
        tk = None if tokens is None else torch.as_tensor(tokens, device=counts.device)[bad]
        qb, tb = split.split_layers(counts[bad], phy2log.to(counts.device)[bad], slots_per_rank, tk)
        q[bad], t[bad] = qb, tb
    return q, t

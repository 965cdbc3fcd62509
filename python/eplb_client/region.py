"""The engine side of the eplb engine contract, version 2 (docs/engine-contract.md).

One shared-memory region per engine rank, ``/dev/shm/eplb-NAME-RANK``. The engine creates it with
its expert tensors, publishes it, and then at every step:

* ``at_step_boundary(step, agree)`` before the forward pass: reads the mailbox, agrees with the
  other engine ranks (``agree`` is the engine's own collective), applies a command in place or
  answers it, and returns the placement the router needs;
* ``record(step, counts, phase)`` after the forward pass: one load-ring entry under a sequence lock.

Or, after the first boundary, one call a step: ``end = region.step_end(counts, agree)`` binds the
engine's counts buffer, and ``end(step, phase, tokens, moe_ns)`` after each forward pass records
``step`` and runs the boundary before ``step + 1`` (through ``eplb_client._fast`` on the compiled
core: what an engine pays a step with nothing pending; see :meth:`EngineRegion.step_end`).

Only the engine writes the live weights, ``phy2log``, the epochs and ``table_fault``, and only
inside ``at_step_boundary``; the sidecar writes the staging rows and the mailbox.

**Tensors (contract 2).** Each MoE layer is a list of :class:`LayerTensor`, the way vLLM
(``model.expert_weights[layer]``) and SGLang (``routed_experts_weights_of_layer[layer]``) hold
them: per-expert tensors (dim 0 = the local slots, moved row by row with their expert) and global
tensors (never moved, listed so that a checker can prove them untouched). The region's tensor
table describes every tensor of every layer and of the staging layer (row ``offset``,
``row_stride``, ``row_bytes``, ``rows``, ``kind``, IPC ``handle``).

* Host weights (``weights_kind`` 0; numpy arrays or CPU torch tensors): the client copies every
  tensor into the region, keeping its shape, its row stride and its whole dim 0 (rows beyond
  ``rows``, such as SGLang's fused shared-expert rows, are copied but never listed, so never
  moved), allocates the staging layer there, and from then on the engine uses the region's views
  (:meth:`EngineRegion.tensor`, :meth:`EngineRegion.staging_tensor`). Apply copies row ``s`` of
  every per-expert staging tensor into row ``s`` of the layer's tensor (numpy, bytes of the row
  only: never the padding between rows, never a global).
* GPU weights (``weights_kind`` 1; CUDA torch tensors): the tensors stay in the engine's memory.
  The client finds each tensor's allocation (``cuMemGetAddressRange``), exports one CUDA IPC handle
  per distinct allocation (:mod:`eplb_client.cuda_ipc`), keeps every tensor's ``data_ptr()`` and,
  at every boundary where a command is pending, checks that none changed: a re-allocated tensor
  sets ``table_fault = 1 + entry`` and every command is rejected from then on. ``staging`` is the
  engine's one-layer staging (per-expert tensors only, same names), ``apply(layer, slots)`` the
  engine's device copy (default: :func:`eplb_client.cuda_ipc.torch_apply`).

Choices where CONTRACT2 is silent (documented here, the reader relies on none of them):

* numpy has no bfloat16 or fp8: a ``uint16`` array is taken as ``bf16`` bits and a ``uint8``
  array as ``u8``; :class:`LayerTensor` takes an optional ``dtype=`` (a contract dtype name of
  the same item size) to say ``f8e4m3``, ``e8m0`` or ``fp4x2`` for raw bytes. Types with no
  contract name (bool, uint32, uint64, complex) are refused.
* A tensor with one row (or a 0-d global) gets ``row_stride = row_bytes``: its stride is never used.
* Host staging tensors are packed (``row_stride = row_bytes``), shape ``[slots_per_rank, *row]``.
* Host weights with an ``apply`` callable: the client copies the rows, then calls
  ``apply(layer, slots)`` as a notification (for instance to refresh a dequantised cache).
* ``tensor()``/``staging_tensor()`` of GPU weights return the engine's own tensors.
* Names: ``[A-Za-z0-9_.-]``, 1 to 200 characters, not starting with ``.`` (the worker's rule);
  tensor names 1 to 24 UTF-8 bytes without NUL.
* GPU weights: every tensor's address is checked when a command is first seen (that tells the
  sidecar early), and right before an apply the tensors it copies (its layer's and the staging
  ones) are checked again (not at every boundary it stays pending, and not the whole table: an
  apply happens only at its own boundary and copies only those tensors, so that is where a
  re-allocation matters, and each ``data_ptr()`` costs about a microsecond of the apply stall).
  The IPC section's ``uuid`` holds the GPU's real UUID (the contract allows zeros: not checked).
* An ``apply`` that raises leaves this rank's weights possibly torn: nothing is answered,
  ``engine_state`` becomes failed and the region refuses every later step.
* ``record`` takes counts of exactly ``[num_layers, count_cols]`` exact non-negative integers
  below ``MAX_COUNT`` (2^40: one step's pairs of one slot; the bound keeps the sidecar's u64 sums
  over ranks and steps from wrapping); integral floats are accepted, nothing else.

Thread safety: ``at_step_boundary``, ``record``, ``finish``, ``fail`` and ``close`` hold one lock
of the region, so calls from several threads are serialised: a command is decided once (a second
``at_step_boundary`` for the same step finds it answered and returns the live placement with
``applied == []``). The engine should still call them from one thread, in step order.

Layout constants below are the contract's byte offsets; integers are little-endian. Atomic fields
are aligned ``u64`` written with single 8-byte stores: on x86-64 these keep store order, as the
contract's seqlocks need. On other machines plain stores have no release order, so the client
refuses to create a region there (``EPLB_CLIENT_ALLOW_ANY_ARCH=1`` overrides, for tests only).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import logging
import mmap
import operator
import os
import platform
import re
import stat
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, TypeVar

import numpy as np

from . import _native

try:  # the step in one call (python/setup.py builds it where a C compiler and Python's headers are)
    from . import _fast
except ImportError:
    _fast = None  # type: ignore[assignment]
from .errors import ContractError

log = logging.getLogger("eplb_client")

MAGIC = 0x314D4853424C5045  # the bytes "EPLBSHM1"
VERSION = 2
MINOR_VERSION = 0
WEIGHTS_HOST, WEIGHTS_CUDA_IPC = 0, 1
COUNTS_LOCAL, COUNTS_PHYSICAL = 0, 1
COUNTS_KINDS = {"local": COUNTS_LOCAL, "physical": COUNTS_PHYSICAL}
KIND_EXPERT, KIND_GLOBAL = 1, 2
KINDS = {"expert": KIND_EXPERT, "global": KIND_GLOBAL}
HEADER_BYTES = 4096
TENSOR_ENTRY_BYTES = 64
MAX_TENSORS = 64
IPC_HEAD_BYTES = 64
IPC_ENTRY_BYTES = 128
IPC_MAX_HANDLES = 4096
MIN_RING_LEN = 16
MAX_NAME_LEN = 200  # the worker's bound (src/run/args.rs); keeps every file name under NAME_MAX
MAX_COUNT = 1 << 40  # a count of one slot in one step is below this (see the module docstring)
SHM_DIR = "/dev/shm"
ARCH_OVERRIDE_ENV = "EPLB_CLIENT_ALLOW_ANY_ARCH"

# Header u64 word indices (byte offset / 8).
_W_ENGINE_PID = 120 // 8
_W_ENGINE_STEP = 128 // 8
_W_ENGINE_HEARTBEAT = 136 // 8
_W_ENGINE_STATE = 144 // 8
_W_SIDECAR_PID = 152 // 8
_W_SIDECAR_HEARTBEAT = 160 // 8
_W_SIDECAR_STATE = 168 // 8
_W_TABLE_FAULT = 192 // 8
_W_CMD_SEQ = 256 // 8
_W_CMD_ID = 264 // 8
_W_CMD_LAYER = 272 // 8
_W_CMD_APPLY_STEP = 280 // 8
_W_CMD_EPOCH = 288 // 8
_W_ACK_ID = 320 // 8
_W_ACK_RESULT = 328 // 8
_W_ACK_STEP = 336 // 8

# The header's fixed part, offsets 0..127 (magic .. engine_pid).
_HEADER_FMT = "<QIIIIIIIIQIIQQQQQQQQQ"
# A tensor table entry: name, dtype, offset, row_stride, row_bytes, rows, kind, reserved, handle.
_ENTRY_FMT = "<24s8sQQQIBBH"
assert struct.calcsize(_ENTRY_FMT) == TENSOR_ENTRY_BYTES

# engine_state / sidecar_state values.
ENGINE_STARTING, ENGINE_RUNNING, ENGINE_FINISHED, ENGINE_FAILED = 0, 1, 2, 3
SIDECAR_NONE, SIDECAR_ATTACHED, SIDECAR_EXITED_OK, SIDECAR_FAILED = 0, 1, 2, 3
# ack_result values.
ACK_APPLIED, ACK_CANCELLED, ACK_MISSED, ACK_REJECTED = 1, 2, 3, 4
# Ring entry phase values.
PHASES = {"prefill": 1, "decode": 2, "mixed": 3}

# Contract dtype names -> (item size, the numpy dtype of a host view of raw torch data).
DTYPES: Dict[str, Tuple[int, np.dtype]] = {
    "f64": (8, np.dtype("<f8")),
    "f32": (4, np.dtype("<f4")),
    "f16": (2, np.dtype("<f2")),
    "bf16": (2, np.dtype("<u2")),
    "i64": (8, np.dtype("<i8")),
    "i32": (4, np.dtype("<i4")),
    "i16": (2, np.dtype("<i2")),
    "i8": (1, np.dtype("i1")),
    "u8": (1, np.dtype("u1")),
    "f8e4m3": (1, np.dtype("u1")),
    "f8e5m2": (1, np.dtype("u1")),
    "e8m0": (1, np.dtype("u1")),
    "fp4x2": (1, np.dtype("u1")),
}
# numpy dtype (str of np.dtype) -> contract name. uint16 is bf16's bits (numpy has no bfloat16).
_NUMPY_DTYPES = {
    "float64": "f64", "float32": "f32", "float16": "f16", "int64": "i64", "int32": "i32", "int16": "i16",
    "int8": "i8", "uint8": "u8", "uint16": "bf16",
    # ml_dtypes' types, if an engine uses them
    "bfloat16": "bf16", "float8_e4m3fn": "f8e4m3", "float8_e5m2": "f8e5m2", "float8_e8m0fnu": "e8m0",
}
# torch dtype (str(torch.dtype)) -> contract name.
_TORCH_DTYPES = {
    "torch.float64": "f64", "torch.float32": "f32", "torch.float16": "f16", "torch.bfloat16": "bf16",
    "torch.int64": "i64", "torch.int32": "i32", "torch.int16": "i16", "torch.int8": "i8", "torch.uint8": "u8",
    "torch.uint16": "bf16", "torch.float8_e4m3fn": "f8e4m3", "torch.float8_e4m3fnuz": "f8e4m3",
    "torch.float8_e5m2": "f8e5m2", "torch.float8_e5m2fnuz": "f8e5m2", "torch.float8_e8m0fnu": "e8m0",
    "torch.float4_e2m1fn_x2": "fp4x2",
}

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class LayerTensor:
    """One tensor of one MoE layer, as the engine holds it.

    name:  the engine's parameter name (``w13_weight_scale_inv``), 1 to 24 UTF-8 bytes.
    data:  a numpy array or a torch tensor (CPU: host weights; CUDA: GPU weights); dim 0 = rows.
           Each row must be contiguous in itself; ``row_stride = stride(0)`` in bytes (may exceed
           ``row_bytes``); ``row_bytes = prod(shape[1:]) * itemsize``; a 0-d global is one row.
    kind:  ``"expert"`` (moves with its expert) or ``"global"`` (never moved).
    rows:  per-expert: the routed slots (default and only allowed value: ``slots_per_rank``);
           ``data.shape[0]`` may be larger (fused shared-expert rows after the routed ones: never
           listed, never moved). Global: the tensor's rows (default: all of dim 0).
    dtype: optional contract dtype name for the table (``f8e4m3`` for an fp8 tensor held as
           uint8); default from the data's dtype. Informational: bytes are moved as they are.
    """

    name: str
    data: Any
    kind: str = "expert"
    rows: Optional[int] = None
    dtype: Optional[str] = None


class TensorSpec(NamedTuple):
    """Contract 1's packed-expert description. Not accepted by contract 2's ``create`` (pass
    :class:`LayerTensor` lists); kept only so that code importing it still loads."""

    name: str
    dtype: str
    shape: Tuple[int, ...]


class TableEntry(NamedTuple):
    """One 64-byte tensor table entry as stored (``layer == num_layers``: the staging layer)."""

    layer: int
    index: int  # type: ignore[assignment]  # the field shadows tuple.index (a method), as the contract names it
    name: str
    dtype: str
    offset: int
    row_stride: int
    row_bytes: int
    rows: int
    kind: int
    handle: int

    @property
    def extent(self) -> int:
        """Bytes from ``offset`` to the end of the last listed row (0 for no rows)."""
        return (self.rows - 1) * self.row_stride + self.row_bytes if self.rows else 0


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def check_name(name: str) -> None:
    """Refuses a region name the worker would refuse (``[A-Za-z0-9_.-]``, 1 to 200 characters,
    not starting with ``.``), with a message instead of a raw OSError later."""
    if not isinstance(name, str) or not name or not _NAME_RE.fullmatch(name) or not name.isascii():
        raise ContractError(f"region name {name!r}: use only letters, digits, '_', '-' and '.'")
    if name.startswith("."):
        raise ContractError(f"region name {name!r}: must not start with '.'")
    if len(name) > MAX_NAME_LEN:
        raise ContractError(f"region name of {len(name)} characters: at most {MAX_NAME_LEN} (the file name "
                            f"eplb-NAME-RANK must stay under the file system's 255 bytes)")


def region_path(name: str, rank: int) -> str:
    """``/dev/shm/eplb-NAME-RANK``."""
    check_name(name)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ContractError(f"rank {rank!r}: a non-negative integer")
    return os.path.join(SHM_DIR, f"eplb-{name}-{int(rank)}")


def check_arch(why_not_native: str = "") -> None:
    """The pure-Python writer relies on x86-64's store order (plain aligned stores are releases
    there); elsewhere the seqlocks could be seen torn. ``EPLB_CLIENT_ALLOW_ANY_ARCH=1`` overrides
    (tests only)."""
    machine = platform.machine()
    if machine in ("x86_64", "AMD64") or os.environ.get(ARCH_OVERRIDE_ENV) == "1":
        return
    raise ContractError(
        f"this machine is {machine!r}: the Python client's plain stores have release order only on x86-64, "
        f"so a sidecar could read a torn ring entry or command here; use the compiled client (libeplb_client: "
        f"backend='native', ${_native.LIB_ENV}){why_not_native} (set {ARCH_OVERRIDE_ENV}=1 only to test)")


def _choose_backend(backend: Optional[str]) -> Tuple[str, Optional[_native.Library], str]:
    """(the choice: auto | native | python, the library if it may be used, why it may not)."""
    choice = backend if backend is not None else (os.environ.get(_native.BACKEND_ENV) or "auto")
    if choice not in _native.BACKENDS:
        raise ContractError(f"backend {choice!r}: one of {', '.join(_native.BACKENDS)} (argument or "
                            f"${_native.BACKEND_ENV})")
    if choice == "python":
        return choice, None, "the Python backend was chosen"
    lib, why = _native.load(VERSION)
    if lib is None and choice == "auto" and platform.machine() not in ("x86_64", "AMD64"):
        # The pure-Python writer is correct on x86-64 only: say why the library did not load.
        check_arch(f" (and the compiled client, which is, did not load: {why})")
    return choice, lib, why


@contextlib.contextmanager
def _env(values: Dict[str, str]) -> Any:
    """``os.environ`` updated with ``values`` for the duration (restored after)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Placement:
    """The placement the router needs, derived from the one live ``phy2log``.

    phy2log  [num_layers, num_physical] i32: logical expert of each physical slot (read-only view
             of the region; slot s of rank r is physical slot r * slots_per_rank + s).
    log2phy  [num_layers, num_logical, max_replicas] i32: physical slots of each logical expert in
             ascending order, -1 padded.
    logcnt   [num_layers, num_logical] i32: replicas of each logical expert.
    epoch    [num_layers] u64: applied changes of each layer (read-only view).
    applied  layers switched at the boundary that returned this placement.
    """

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    epoch: np.ndarray
    applied: List[int] = field(default_factory=list)

    def replica_slot(self, layer: int, expert: np.ndarray, token_index: np.ndarray) -> np.ndarray:
        """The physical slot each (token, expert) pair goes to: the contract's replica rule,
        replica ``(token_index + layer) % logcnt`` of ``log2phy``, the same on every rank."""
        cnt = self.logcnt[layer, expert]
        rep = (token_index + layer) % cnt
        return self.log2phy[layer, expert, rep]


def derive_log2phy(phy2log: np.ndarray, num_logical: int, max_replicas: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(log2phy [L, E, R], logcnt [L, E]) from phy2log [L, P]; replicas in ascending slot order."""
    num_layers, num_physical = phy2log.shape
    logcnt = np.zeros((num_layers, num_logical), dtype=np.int32)
    for layer in range(num_layers):
        logcnt[layer] = np.bincount(phy2log[layer], minlength=num_logical)[:num_logical]
    width = max_replicas if max_replicas is not None else max(1, int(logcnt.max(initial=1)))
    log2phy = np.full((num_layers, num_logical, width), -1, dtype=np.int32)
    for layer in range(num_layers):
        _fill_log2phy_layer(phy2log[layer], log2phy[layer])
    return log2phy, logcnt


def _fill_log2phy_layer(row: np.ndarray, out: np.ndarray) -> None:
    out.fill(-1)
    order = np.argsort(row, kind="stable")  # by expert, then by slot
    experts = row[order]
    starts = np.searchsorted(experts, experts, side="left")
    rep = np.arange(len(order)) - starts
    out[experts, rep] = order


def check_phy2log(row: np.ndarray, num_logical: int) -> Optional[str]:
    """Why a phy2log row is not a placement (every expert in [0, E) and held at least once), or None."""
    if row.min(initial=0) < 0 or row.max(initial=0) >= num_logical:
        return f"expert ids outside [0, {num_logical})"
    missing = np.flatnonzero(np.bincount(row, minlength=num_logical) == 0)
    if len(missing):
        return f"experts {missing[:8].tolist()} have no slot"
    return None


# ---- tensors: what the engine hands over ----------------------------------------------------


def _is_torch(x: Any) -> bool:
    """A torch tensor (duck-typed, so that torch is imported only when the engine uses it)."""
    return hasattr(x, "data_ptr") and hasattr(x, "element_size") and hasattr(x, "stride") and not isinstance(x, np.ndarray)


@dataclass
class _Desc:
    """One handed-over tensor, checked: what the table and the copy need."""

    where: str  # "layer 3, tensor 'w2_weight'" for messages
    name: str
    dtype: str
    kind: int
    shape: Tuple[int, ...]
    itemsize: int
    row_stride: int
    row_bytes: int
    rows: int
    data: Any
    cuda: bool
    device: str
    view_dtype: np.dtype  # the host view's numpy dtype

    @property
    def dim0(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def full_extent(self) -> int:
        """Bytes of the whole tensor from its first row (every row of dim 0, listed or not)."""
        return (self.dim0 - 1) * self.row_stride + self.row_bytes


def _where(layer: Optional[int], name: Any) -> str:
    return f"{'staging' if layer is None else f'layer {layer}'}, tensor {name!r}"


def _describe(t: Any, layer: Optional[int], slots_per_rank: int) -> _Desc:
    """Checks one LayerTensor and describes it; ContractError names layer, tensor and field."""
    if not isinstance(t, LayerTensor):
        raise ContractError(f"{_where(layer, getattr(t, 'name', t))}: not a LayerTensor (contract 2 takes "
                            f"LayerTensor(name, data, kind, rows) lists, one per layer)")
    where = _where(layer, t.name)
    if not isinstance(t.name, str):
        raise ContractError(f"{where}: field name: a str")
    raw_name = t.name.encode()
    if not 1 <= len(raw_name) <= 24 or b"\0" in raw_name:
        raise ContractError(f"{where}: field name: 1 to 24 UTF-8 bytes without NUL")
    if t.kind not in KINDS:
        raise ContractError(f"{where}: field kind: {t.kind!r} is not 'expert' or 'global'")
    kind = KINDS[t.kind]
    data = t.data
    if isinstance(data, np.generic):  # a numpy scalar: a 0-d array
        data = np.asarray(data)
    if _is_torch(data):
        shape = tuple(int(d) for d in data.shape)
        itemsize = int(data.element_size())
        strides = tuple(int(s) * itemsize for s in data.stride())
        dname = _TORCH_DTYPES.get(str(data.dtype))
        cuda = bool(getattr(data, "is_cuda", False))
        device = str(getattr(data, "device", "cpu"))
        if not cuda and device != "cpu":
            raise ContractError(f"{where}: field data: a tensor on {device}: host weights are CPU tensors, GPU "
                                f"weights CUDA tensors")
    elif isinstance(data, np.ndarray):
        shape, itemsize, strides = tuple(data.shape), data.dtype.itemsize, tuple(data.strides)
        dname = _NUMPY_DTYPES.get(str(data.dtype))
        cuda, device = False, "cpu"
    else:
        raise ContractError(f"{where}: field data: {type(data).__name__} is not a numpy array or torch tensor")
    if t.dtype is not None:
        if t.dtype not in DTYPES:
            raise ContractError(f"{where}: field dtype: {t.dtype!r} is not one of {sorted(DTYPES)}")
        if DTYPES[t.dtype][0] != itemsize:
            raise ContractError(f"{where}: field dtype: {t.dtype} has {DTYPES[t.dtype][0]}-byte items, the data "
                                f"{itemsize}-byte ones")
        dname = t.dtype
    if dname is None:
        raise ContractError(f"{where}: field dtype: {data.dtype} has no contract dtype name (one of "
                            f"{sorted(DTYPES)}); pass dtype= for raw bytes of another type")
    view_dtype = data.dtype if isinstance(data, np.ndarray) else DTYPES[dname][1]
    if any(d == 0 for d in shape[1:]):
        raise ContractError(f"{where}: field row_bytes: 0 (shape {shape}): a row must have at least one byte")
    # Each row contiguous in itself (C order over dims 1..; dims of size 1 have any stride).
    expect = itemsize
    for d in range(len(shape) - 1, 0, -1):
        if shape[d] != 1 and strides[d] != expect:
            raise ContractError(f"{where}: field row_stride: the rows are not contiguous in themselves (shape "
                                f"{shape}, byte strides {strides}); make each row contiguous")
        expect *= shape[d]
    row_bytes = expect if shape else itemsize
    if row_bytes < 1:
        raise ContractError(f"{where}: field row_bytes: 0 (shape {shape}): a row must have at least one byte")
    if not shape:
        if kind == KIND_EXPERT:
            raise ContractError(f"{where}: field rows: a 0-d tensor cannot be per-expert (dim 0 = the slots)")
        dim0, row_stride = 1, row_bytes
    else:
        dim0 = shape[0]
        row_stride = strides[0] if dim0 > 1 else row_bytes
    if row_stride < row_bytes:
        raise ContractError(f"{where}: field row_stride: {row_stride} < row_bytes {row_bytes} (rows overlap)")
    if t.rows is not None and (isinstance(t.rows, bool) or not isinstance(t.rows, (int, np.integer))):
        raise ContractError(f"{where}: field rows: {t.rows!r} is not an integer")
    if kind == KIND_EXPERT:
        rows = slots_per_rank if t.rows is None else int(t.rows)
        if rows != slots_per_rank:
            raise ContractError(f"{where}: field rows: {rows}, but a per-expert tensor lists slots_per_rank "
                                f"= {slots_per_rank} rows")
    else:
        rows = dim0 if t.rows is None else int(t.rows)
        if rows < 1:
            raise ContractError(f"{where}: field rows: {rows}: a global tensor lists at least one row")
    if dim0 < rows:
        raise ContractError(f"{where}: field rows: {rows} rows listed, but dim 0 holds {dim0}")
    return _Desc(where, t.name, dname, kind, shape, itemsize, row_stride, row_bytes, rows, data, cuda, device,
                 np.dtype(view_dtype))


def check_table(entries: Sequence[TableEntry], num_layers: int, num_tensors: int, slots_per_rank: int,
                weights_kind: int, lo: int = 0, hi: int = 0, handle_bytes: Sequence[int] = ()) -> int:
    """Every rule of the contract's tensor table (what the sidecar checks at attach); returns
    ``expert_bytes``. ``lo, hi``: host extents lie in ``[lo, hi)``; ``handle_bytes``: the size of
    each IPC allocation. Raises ContractError naming layer, tensor and field."""
    by = {(e.layer, e.index): e for e in entries}
    expert_bytes = 0
    for layer in range(num_layers + 1):
        seen = set()
        for t in range(num_tensors):
            e, ref = by[(layer, t)], by[(0, t)]
            where = _where(None if layer == num_layers else layer, e.name)
            if e.name in seen:
                raise ContractError(f"{where}: field name: used twice in the layer")
            seen.add(e.name)
            for f in ("name", "dtype", "kind", "row_bytes"):
                if getattr(e, f) != getattr(ref, f):
                    raise ContractError(f"{where}: field {f}: {getattr(e, f)!r}, but layer 0's tensor {t} has "
                                        f"{getattr(ref, f)!r} (the same in every layer)")
            if e.kind not in (KIND_EXPERT, KIND_GLOBAL):
                raise ContractError(f"{where}: field kind: {e.kind}")
            if e.dtype not in DTYPES:
                raise ContractError(f"{where}: field dtype: {e.dtype!r}")
            if e.row_bytes < 1:
                raise ContractError(f"{where}: field row_bytes: 0")
            if layer == num_layers and e.kind == KIND_GLOBAL:
                if e.offset or e.row_stride or e.rows:
                    raise ContractError(f"{where}: field offset: a global's staging entry has offset = row_stride "
                                        f"= rows = 0")
                continue
            if e.row_stride < e.row_bytes:
                raise ContractError(f"{where}: field row_stride: {e.row_stride} < row_bytes {e.row_bytes}")
            if e.kind == KIND_EXPERT and e.rows != slots_per_rank:
                raise ContractError(f"{where}: field rows: {e.rows}, want slots_per_rank {slots_per_rank}")
            if e.kind == KIND_GLOBAL and e.rows < 1:
                raise ContractError(f"{where}: field rows: 0")
            if weights_kind == WEIGHTS_HOST:
                if e.handle:
                    raise ContractError(f"{where}: field handle: {e.handle} with host weights")
                if e.offset < lo or e.offset + e.extent > hi:
                    raise ContractError(f"{where}: field offset: [{e.offset}, {e.offset + e.extent}) is not inside "
                                        f"[{lo}, {hi})")
            else:
                if e.handle >= len(handle_bytes):
                    raise ContractError(f"{where}: field handle: {e.handle} >= num_handles {len(handle_bytes)}")
                if e.offset + e.extent > handle_bytes[e.handle]:
                    raise ContractError(f"{where}: field offset: [{e.offset}, {e.offset + e.extent}) is not inside "
                                        f"allocation {e.handle} of {handle_bytes[e.handle]} bytes")
        if layer == 0:
            expert_bytes = sum(by[(0, t)].row_bytes for t in range(num_tensors) if by[(0, t)].kind == KIND_EXPERT)
            if not any(by[(0, t)].kind == KIND_EXPERT for t in range(num_tensors)):
                raise ContractError("layer 0: field kind: at least one per-expert tensor")
    # No two extents overlap (host: in the region; IPC: inside one allocation).
    spans = sorted(((e.handle, e.offset, e.offset + e.extent, e) for e in entries if e.extent > 0),
                   key=lambda x: x[:3])
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            ea, eb = a[3], b[3]
            raise ContractError(
                f"{_where(None if eb.layer == num_layers else eb.layer, eb.name)}: field offset: its rows "
                f"[{b[1]}, {b[2]}) overlap those of {_where(None if ea.layer == num_layers else ea.layer, ea.name)} "
                f"[{a[1]}, {a[2]})" + (f" in allocation {a[0]}" if weights_kind else ""))
    return expert_bytes


# ---- the region ---------------------------------------------------------------------------


class EngineRegion:
    """One engine rank's shared-memory region (engine side). See the module docstring."""

    # ---- creation --------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        rank: int,
        world_size: int,
        num_layers: int,
        slots_per_rank: int,
        num_logical: int,
        layers: Sequence[Sequence[LayerTensor]],
        phy2log: np.ndarray,
        ring_len: int = 64,
        counts: str = "local",
        staging: Optional[Sequence[LayerTensor]] = None,
        apply: Optional[Callable[[int, np.ndarray], None]] = None,
        backend: Optional[str] = None,
    ) -> "EngineRegion":
        """Checks everything, then creates the region under a temporary name: header, placement
        (``phy2log [num_layers, world_size * slots_per_rank]``), tensor table and (host) a copy of
        every tensor. :meth:`publish` (or the first boundary) renames it into place.

        ``layers``: one list of :class:`LayerTensor` per layer, the same names, kinds, dtypes and
        row sizes in every layer. ``counts``: ``"local"`` (record counts ``[num_layers,
        slots_per_rank]`` per local slot) or ``"physical"`` (``[num_layers, num_physical]``, this
        rank's view of every physical slot, as vLLM's ``expert_load_pass``).

        GPU weights (CUDA tensors): ``staging`` is the engine's one-layer staging (a LayerTensor
        per per-expert tensor, same names, ``rows = slots_per_rank``); ``apply(layer, slots)``
        copies row s of every per-expert staging tensor into ``layer``'s for every s in ``slots``
        and returns once the copy completed (default :func:`eplb_client.cuda_ipc.torch_apply`).
        The tensors must stay allocated, at the same addresses, until :meth:`finish` returns.

        ``backend``: ``"native"`` (the compiled core, libeplb_client: see :mod:`eplb_client._native`),
        ``"python"`` (this module's writer; x86-64 only) or ``"auto"`` (native if the library loads
        and can lay out these tensors, else Python); default ``$EPLB_CLIENT_BACKEND`` or auto.
        The region's bytes are the same either way (the cross-language golden test checks it)."""
        check_name(name)
        for what, v in (("rank", rank), ("world_size", world_size), ("num_layers", num_layers),
                        ("slots_per_rank", slots_per_rank), ("num_logical", num_logical), ("ring_len", ring_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ContractError(f"{what} {v!r} is not an integer")
        rank, world_size, num_layers = int(rank), int(world_size), int(num_layers)
        slots_per_rank, num_logical, ring_len = int(slots_per_rank), int(num_logical), int(ring_len)
        path = region_path(name, rank)
        if not (0 <= rank < world_size):
            raise ContractError(f"rank {rank} is outside world_size {world_size}")
        if num_layers < 1 or slots_per_rank < 1 or num_logical < 1:
            raise ContractError("num_layers, slots_per_rank and num_logical must be >= 1")
        if max(num_layers, slots_per_rank, num_logical, world_size, ring_len) >= 1 << 31:
            raise ContractError("num_layers, slots_per_rank, num_logical, world_size and ring_len must be < 2^31")
        if ring_len < MIN_RING_LEN:
            raise ContractError(f"ring_len {ring_len} < {MIN_RING_LEN}")
        if counts not in COUNTS_KINDS:
            raise ContractError(f"counts {counts!r}: 'local' (per local slot) or 'physical' (per physical slot)")
        choice, lib, why_not = _choose_backend(backend)
        num_physical = world_size * slots_per_rank
        phy2log = np.asarray(phy2log)
        if phy2log.shape != (num_layers, num_physical):
            raise ContractError(f"phy2log has shape {phy2log.shape}, want ({num_layers}, {num_physical})")
        if phy2log.dtype.kind not in "iu":
            raise ContractError(f"phy2log has dtype {phy2log.dtype}: integer expert ids")
        for layer in range(num_layers):
            why = check_phy2log(phy2log[layer], num_logical)
            if why:
                raise ContractError(f"phy2log layer {layer}: {why}")

        # -- the tensors: describe and check every one before anything is written --
        descs = _describe_layers(layers, num_layers, slots_per_rank)
        T = len(descs[0])
        cuda = descs[0][0].cuda
        for row in descs:
            for d in row:
                if d.cuda != cuda:
                    raise ContractError(f"{d.where}: field data: {'a CUDA' if d.cuda else 'a host'} tensor among "
                                        f"{'CUDA' if cuda else 'host'} ones: all tensors live on one side")
                if cuda and d.device != descs[0][0].device:
                    raise ContractError(f"{d.where}: field data: on {d.device}, the others on {descs[0][0].device}")
        per_expert = [t for t in range(T) if descs[0][t].kind == KIND_EXPERT]
        if cuda:
            if staging is None:
                raise ContractError("GPU weights need staging: the engine's one-layer staging tensors (one per "
                                    "per-expert tensor, same names, rows = slots_per_rank)")
            stage = _describe_staging(staging, descs[0], slots_per_rank)
        else:
            if staging is not None:
                raise ContractError("host weights: the client allocates the staging layer in the region; pass "
                                    "staging only with CUDA tensors")
            stage = None

        counts_kind = COUNTS_KINDS[counts]
        count_cols = slots_per_rank if counts_kind == COUNTS_LOCAL else num_physical
        ring_entry_bytes = 64 + _round_up(8 * num_layers * count_cols, 64)
        ring_offset = HEADER_BYTES
        placement_offset = ring_offset + ring_len * ring_entry_bytes
        epochs_offset = _round_up(placement_offset + 4 * num_layers * num_physical, 64)
        command_offset = _round_up(epochs_offset + 8 * num_layers, 64)
        mask_offset = command_offset + _round_up(4 * num_physical, 64)
        table_offset = _round_up(mask_offset + slots_per_rank, 64)
        num_entries = (num_layers + 1) * T
        table_end = table_offset + num_entries * TENSOR_ENTRY_BYTES

        entries: List[TableEntry] = []
        places: List[List[int]] = []  # host: offset of every handed-over tensor in the region
        staging_places: List[int] = []
        ipc_section = b""
        handle_bytes: List[int] = []
        if not cuda:
            weights_kind, ipc_offset = WEIGHTS_HOST, 0
            off = _round_up(table_end, 64)
            for layer in range(num_layers):
                row_places: List[int] = []
                for t, d in enumerate(descs[layer]):
                    row_places.append(off)
                    entries.append(TableEntry(layer, t, d.name, d.dtype, off, d.row_stride, d.row_bytes, d.rows,
                                              d.kind, 0))
                    off = _round_up(off + d.full_extent, 64)
                places.append(row_places)
            for t, d in enumerate(descs[0]):
                if d.kind == KIND_EXPERT:
                    staging_places.append(off)
                    entries.append(TableEntry(num_layers, t, d.name, d.dtype, off, d.row_bytes, d.row_bytes,
                                              slots_per_rank, d.kind, 0))
                    off = _round_up(off + slots_per_rank * d.row_bytes, 64)
                else:
                    staging_places.append(0)
                    entries.append(TableEntry(num_layers, t, d.name, d.dtype, 0, 0, d.row_bytes, 0, d.kind, 0))
            total_bytes = _round_up(off, 4096)
        else:
            from . import cuda_ipc  # CUDA only: the driver calls

            weights_kind = WEIGHTS_CUDA_IPC
            assert stage is not None  # cuda: described above
            cuda_ipc.check_alloc_conf()
            ipc_offset = _round_up(table_end, 64)
            flat = [d for row in descs for d in row] + [d for d in stage if d is not None]
            export = cuda_ipc.export_tensors([(d.where, int(d.data.data_ptr()), d.full_extent) for d in flat])
            handle_bytes = [a.bytes for a in export.allocations]
            if not 1 <= len(handle_bytes) <= IPC_MAX_HANDLES:
                raise ContractError(f"{len(handle_bytes)} distinct allocations: the IPC table holds 1 to "
                                    f"{IPC_MAX_HANDLES}")
            where_of = iter(export.places)
            for layer in range(num_layers):
                for t, d in enumerate(descs[layer]):
                    h, off = next(where_of)
                    entries.append(TableEntry(layer, t, d.name, d.dtype, off, d.row_stride, d.row_bytes, d.rows,
                                              d.kind, h))
            for t, sd in enumerate(stage):
                ref = descs[0][t]
                if sd is None:
                    entries.append(TableEntry(num_layers, t, ref.name, ref.dtype, 0, 0, ref.row_bytes, 0, ref.kind, 0))
                else:
                    h, off = next(where_of)
                    entries.append(TableEntry(num_layers, t, sd.name, sd.dtype, off, sd.row_stride, sd.row_bytes,
                                              sd.rows, sd.kind, h))
            ipc_section = cuda_ipc.ipc_section(export)
            total_bytes = _round_up(ipc_offset + len(ipc_section), 4096)
        expert_bytes = check_table(entries, num_layers, T, slots_per_rank, weights_kind, lo=mask_offset + slots_per_rank,
                                   hi=total_bytes, handle_bytes=handle_bytes)
        if apply is not None and not callable(apply):
            raise ContractError(f"apply {apply!r} is not callable")
        if cuda and apply is None:
            from . import cuda_ipc

            assert stage is not None
            apply = cuda_ipc.torch_apply([[d.data for d in row] for row in descs], [d.data if d else None for d in stage],
                                         per_expert)

        if choice == "auto" and lib is not None and cuda:
            # The library's CUDA IPC path (handles, bus id, the apply callback) has passed its CPU
            # tests but has not yet run on a GPU: "auto" keeps CUDA weights on the Python writer,
            # which has (BENCHMARKS.md); backend="native" opts in.
            why_not = "CUDA weights: 'auto' keeps them on the Python writer until the native path has run on a GPU"
            lib = None
        if choice != "python" and lib is not None and not cuda:
            whole = [d.name for row in descs for d in row if d.dim0 != d.rows]
            if whole:
                # The library lists exactly the rows it lays out: rows of dim 0 beyond `rows` (fused
                # shared-expert rows) would have no room in its region.
                why_not = (f"tensor {whole[0]!r} has rows beyond the listed ones (dim 0 > rows), which the "
                           f"library does not lay out")
                lib = None
        if choice == "native" and lib is None:
            raise ContractError(f"backend 'native': {why_not}")
        if lib is not None:
            # The same refusals, with the same messages, as the Python writer (the library checks
            # again): no room, or a file at the path that is not a dead engine's region.
            _check_free_space(path, total_bytes)
            _check_existing(path)
            return cls._create_native(lib, name, rank, world_size, num_layers, slots_per_rank, num_logical, ring_len,
                                      counts_kind, descs, stage, entries, places, staging_places, phy2log, apply,
                                      weights_kind, total_bytes, ipc_section, cuda, path)
        check_arch()

        # -- the file: only now is anything written --
        _check_free_space(path, total_bytes)
        _check_existing(path)
        tmp = os.path.join(SHM_DIR, f".eplb-{name}-{rank}.{os.getpid()}.tmp")
        fd = _create_exclusive(tmp)
        try:
            os.ftruncate(fd, total_bytes)
            mm = mmap.mmap(fd, total_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        try:
            header = struct.pack(
                _HEADER_FMT,
                MAGIC, VERSION, HEADER_BYTES, num_layers, slots_per_rank, num_logical, world_size, rank,
                ring_len, expert_bytes, T, weights_kind, total_bytes, ring_offset, ring_entry_bytes,
                placement_offset, epochs_offset, command_offset, table_offset, ipc_offset, os.getpid(),
            )
            mm[0 : len(header)] = header
            struct.pack_into("<IIII", mm, 176, MINOR_VERSION, counts_kind, len(handle_bytes), 0)
            for i, e in enumerate(entries):
                struct.pack_into(_ENTRY_FMT, mm, table_offset + i * TENSOR_ENTRY_BYTES, e.name.encode(),
                                 e.dtype.encode(), e.offset, e.row_stride, e.row_bytes, e.rows, e.kind, 0, e.handle)
            if ipc_section:
                mm[ipc_offset : ipc_offset + len(ipc_section)] = ipc_section
            region = cls(mm, path, tmp, owner=True)
        except BaseException:
            mm.close()
            os.unlink(tmp)
            raise
        region._gpu_apply = apply
        _LIVE_REGIONS.add(region)
        region._bind_views(mm, cuda, descs, stage, entries, places, staging_places, slots_per_rank)
        region._phy2log[:] = phy2log
        region._derive_all()
        region._heartbeat()
        return region

    @classmethod
    def _create_native(cls, lib: "_native.Library", name: str, rank: int, world_size: int, num_layers: int,
                       slots_per_rank: int, num_logical: int, ring_len: int, counts_kind: int,
                       descs: List[List[_Desc]], stage: Optional[List[Optional[_Desc]]], entries: List[TableEntry],
                       places: List[List[int]], staging_places: List[int], phy2log: np.ndarray,
                       apply: Optional[Callable[[int, np.ndarray], None]], weights_kind: int, total_bytes: int,
                       ipc_section: bytes, cuda: bool, path: str) -> "EngineRegion":
        """``create`` through libeplb_client: the library checks and writes the region (the layout
        computed above, byte for byte: checked here), this process maps the same file for its
        views, and every later write of the contract goes through the library."""
        T = len(descs[0])
        keep: List[Any] = []

        def desc(d: _Desc, handle: Optional[bytes], offset: int) -> "_native.TensorDesc":
            nm, dt = d.name.encode(), d.dtype.encode()
            keep.extend((nm, dt))
            hp = None
            if handle is not None:
                hb = ctypes.create_string_buffer(handle, len(handle))
                keep.append(hb)
                hp = ctypes.addressof(hb)
            return _native.TensorDesc(nm, dt, d.kind, d.rows, d.row_bytes, d.row_stride, hp, offset)

        handles: List[bytes] = []
        if cuda:
            # The IPC section Python built (cuda_ipc.ipc_section): handle i at 64 + 128 i.
            handles = [ipc_section[IPC_HEAD_BYTES + IPC_ENTRY_BYTES * i: IPC_HEAD_BYTES + IPC_ENTRY_BYTES * i + 64]
                       for i in range((len(ipc_section) - IPC_HEAD_BYTES) // IPC_ENTRY_BYTES)]
        flat = (_native.TensorDesc * (num_layers * T))()
        for layer in range(num_layers):
            for t, d in enumerate(descs[layer]):
                e = entries[layer * T + t]
                flat[layer * T + t] = desc(d, handles[e.handle] if cuda else None, e.offset if cuda else 0)
        st = (_native.TensorDesc * T)()
        if cuda:
            assert stage is not None
            for t, sd in enumerate(stage):
                e = entries[num_layers * T + t]
                st[t] = desc(sd if sd is not None else descs[0][t], handles[e.handle], e.offset)
        p2l = np.ascontiguousarray(phy2log, dtype=np.int32)
        keep.extend((flat, st, p2l))
        cfg = _native.Config(rank, world_size, num_layers, slots_per_rank, num_logical, ring_len, weights_kind,
                             counts_kind, T, flat, st if cuda else None,
                             p2l.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
        cols = slots_per_rank if counts_kind == COUNTS_LOCAL else world_size * slots_per_rank
        bus = {}
        if cuda:
            # The C API takes the GPU's PCI bus id from $EPLB_PCI_BUS_ID or the current context;
            # Python found it from the tensors' device already (cuda_ipc.device_ids): hand it over.
            bus = {"EPLB_PCI_BUS_ID": ipc_section[:16].rstrip(b"\0").decode()}
        with _env(bus):
            nat = _native.NativeRegion(lib, name, cfg, keep, apply, num_layers * cols)
        try:
            tmp = os.path.join(SHM_DIR, f".eplb-{name}-{rank}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_size != total_bytes:
                    raise ContractError(f"{tmp}: the library made {os.fstat(fd).st_size} bytes, this client laid out "
                                        f"{total_bytes}: library and client of different releases?")
                mm = mmap.mmap(fd, total_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            hdr = struct.unpack_from(_HEADER_FMT, mm, 0)
            if hdr[20] != os.getpid():
                raise ContractError(f"{tmp} is not this process's region (engine_pid {hdr[20]})")
            if cuda:
                # What the C API cannot know (its description has no allocation sizes and takes the
                # GPU's UUID from the driver): the driver's sizes and the UUID Python found.
                ipc_off = hdr[19]
                mm[ipc_off: ipc_off + len(ipc_section)] = ipc_section
            table_offset = hdr[18]
            got = _read_table(mm, table_offset, num_layers, T)
            for a, b in zip(got, entries):
                if a != b:
                    raise ContractError(f"the library's tensor table differs from this client's at layer {a.layer}, "
                                        f"tensor {a.index}: {a} != {b} (library and client of different releases?)")
            region = cls(mm, path, tmp, owner=True)
        except BaseException:
            nat.close()
            raise
        region._native = nat
        region.backend = "native"
        region._gpu_apply = apply
        _LIVE_REGIONS.add(region)
        region._bind_views(mm, cuda, descs, stage, entries, places, staging_places, slots_per_rank)
        region._count_buf = np.zeros((num_layers, cols), np.uint64)
        region._count_at = region._count_buf.ctypes.data
        region._derive_all()
        return region

    def __init__(self, mm: mmap.mmap, path: str, tmp_path: Optional[str], owner: bool):
        self._mm = mm
        self.path = path
        self._tmp_path = tmp_path
        self._owner = owner
        self._closed = False
        self._lock = threading.RLock()
        if len(mm) < HEADER_BYTES:
            raise ContractError(f"{path}: {len(mm)} bytes, shorter than the 4096-byte header")
        hdr = struct.unpack_from(_HEADER_FMT, mm, 0)
        (magic, version, _hb, self.num_layers, self.slots_per_rank, self.num_logical, self.world_size,
         self.rank, self.ring_len, self.expert_bytes, num_tensors, self.weights_kind, total, ring_offset,
         self.ring_entry_bytes, placement_offset, epochs_offset, command_offset, table_offset,
         ipc_offset, _pid) = hdr
        if magic != MAGIC:
            raise ContractError(f"{path}: not an eplb region (magic {magic:#x})")
        if version != VERSION:
            raise ContractError(f"{path}: contract version {version}, but this client speaks version {VERSION}: "
                                f"engine, client and eplb-worker must speak the same version")
        _minor, counts_kind, num_handles, _r = struct.unpack_from("<IIII", mm, 176)
        if counts_kind not in (COUNTS_LOCAL, COUNTS_PHYSICAL):
            raise ContractError(f"{path}: counts_kind {counts_kind} is not 0 or 1")
        if total > len(mm):
            raise ContractError(f"{path}: total_bytes {total} but the file has {len(mm)}")
        self.counts_kind = counts_kind
        self._ipc_offset = ipc_offset
        self._command_end = command_offset + _round_up(4 * self.world_size * self.slots_per_rank, 64) + self.slots_per_rank
        self.num_tensors = num_tensors
        self.num_handles = num_handles
        self.num_physical = self.world_size * self.slots_per_rank
        L, S, P, E = self.num_layers, self.slots_per_rank, self.num_physical, self.num_logical
        self.count_cols = S if counts_kind == COUNTS_LOCAL else P
        self.table = _read_table(mm, table_offset, L, num_tensors)
        self.tensor_names = [e.name for e in self.table[:num_tensors]]
        # Header and ring words through a memoryview: a plain C load or store of 8 bytes per access,
        # with far less code on the path than numpy scalar indexing (it matters when the engine's
        # forward pass has just flushed the caches: see BENCHMARKS.md).
        self._mv = memoryview(mm)
        self._h = self._mv.cast("Q")  # the whole region as u64 words; the header is words 0..511
        self._ring_word = ring_offset // 8
        self._entry_words = self.ring_entry_bytes // 8
        self._ring = np.frombuffer(mm, dtype="<u8", count=self.ring_len * self.ring_entry_bytes // 8,
                                   offset=ring_offset).reshape(self.ring_len, self.ring_entry_bytes // 8)
        C = self.count_cols
        self._ring_counts = self._ring[:, 8 : 8 + L * C].reshape(self.ring_len, L, C)
        self._phy2log = np.frombuffer(mm, dtype="<i4", count=L * P, offset=placement_offset).reshape(L, P)
        self._epoch = np.frombuffer(mm, dtype="<u8", count=L, offset=epochs_offset)
        self._cmd_row = np.frombuffer(mm, dtype="<i4", count=P, offset=command_offset)
        self._cmd_mask = np.frombuffer(mm, dtype="u1", count=S, offset=command_offset + _round_up(4 * P, 64))
        self._gpu_apply: Optional[Callable[[int, np.ndarray], None]] = None
        self._views: Optional[List[Dict[str, Any]]] = None  # the creator's tensors, as handed over
        self._staging_views: Optional[Dict[str, Any]] = None
        self._ptrs: List[Tuple[int, TableEntry, Any, int]] = []  # GPU: (entry index, entry, tensor, data_ptr)
        self._ptrs_seen = 0  # the last command id whose arrival checked the addresses
        self._ptrs_by_layer: Dict[int, List[Tuple[int, TableEntry, Any, int]]] = {}
        self._broken: Optional[str] = None  # why the weights may be torn (an apply that raised)
        # Host: u8 [rows, row_bytes] views of every listed entry (what the sidecar reads and writes).
        self._rows: Optional[List[List[Optional[np.ndarray]]]] = None
        if self.weights_kind == WEIGHTS_HOST:
            self._rows = [[None] * num_tensors for _ in range(L + 1)]
            for e in self.table:
                if e.rows and e.offset + e.extent <= len(mm):
                    self._rows[e.layer][e.index] = np.ndarray((e.rows, e.row_bytes), np.uint8, buffer=mm,
                                                              offset=e.offset, strides=(e.row_stride, 1))
        self._per_expert = [t for t in range(num_tensors) if self.table[t].kind == KIND_EXPERT]
        self._log2phy = np.full((L, E, max(1, P - E + 1)), -1, dtype=np.int32)
        self._logcnt = np.zeros((L, E), dtype=np.int32)
        self._published = False
        self._hb_thread: Optional[threading.Thread] = None
        self._hb_stop = threading.Event()
        self._ro_phy2log = self._phy2log.view()
        self._ro_phy2log.flags.writeable = False
        self._ro_epoch = self._epoch.view()
        self._ro_epoch.flags.writeable = False
        # The compiled core (backend "native"): every contract write goes through it.
        self._native: Optional[_native.NativeRegion] = None
        self.backend = "python"
        self._count_buf: Optional[np.ndarray] = None  # native: the counts handed to eplb_record
        self._count_at = 0

    def _host_view(self, offset: int, d: _Desc) -> np.ndarray:
        """The region's view of a handed-over tensor: same shape, dtype, row stride."""
        inner = []
        acc = d.itemsize
        for n in reversed(d.shape[1:]):
            inner.append(acc)
            acc *= n
        strides = (d.row_stride,) + tuple(reversed(inner)) if d.shape else ()
        return np.ndarray(d.shape, d.view_dtype, buffer=self._mm, offset=offset, strides=strides)

    def _bind_views(self, mm: mmap.mmap, cuda: bool, descs: List[List[_Desc]], stage: Optional[List[Optional[_Desc]]],
                    entries: Sequence[TableEntry], places: List[List[int]], staging_places: List[int],
                    slots_per_rank: int) -> None:
        """The engine's views of its tensors, either backend: CUDA weights are the engine's own
        tensors (and their pointers, checked at boundaries); host weights are views into the
        region, filled with the engine's initial tensors."""
        if cuda:
            assert stage is not None
            self._views = [{d.name: d.data for d in row} for row in descs]
            self._staging_views = {d.name: d.data for d in stage if d is not None}
            all_descs: List[Optional[_Desc]] = [d for row in descs for d in row]
            self._ptrs = [(i, e, d.data, int(d.data.data_ptr())) for i, (e, d) in
                          enumerate(zip(entries, all_descs + list(stage))) if d is not None]
            for p in self._ptrs:
                self._ptrs_by_layer.setdefault(p[1].layer, []).append(p)
            return
        self._views = [{d.name: self._host_view(places[layer][t], d) for t, d in enumerate(row)}
                       for layer, row in enumerate(descs)]
        for layer, row in enumerate(descs):
            for d in row:
                _copy_into(self._views[layer][d.name], d)
        self._staging_views = {}
        for t, d in enumerate(descs[0]):
            if d.kind == KIND_EXPERT:
                self._staging_views[d.name] = np.ndarray(
                    (slots_per_rank,) + d.shape[1:], d.view_dtype, buffer=mm, offset=staging_places[t])

    @classmethod
    def attach(cls, name: str, rank: int) -> "EngineRegion":
        """Maps an existing region (for tools and tests: a sidecar's view). Never unlinks it.
        Refuses anything that is not a regular file (a FIFO would block an open)."""
        path = region_path(name, rank)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ContractError(f"{path} is not a regular file")
            if st.st_size < HEADER_BYTES:
                raise ContractError(f"{path}: {st.st_size} bytes, shorter than the 4096-byte header")
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        region = cls(mm, path, None, owner=False)
        region._derive_all()
        return region

    def publish(self) -> None:
        """Renames the filled region into place (``engine_state = 1``): a sidecar may attach now."""
        if self._published:
            return
        if self._native is not None:
            self._native.publish()  # engine_state = 1, the heartbeat, the rename
            self._tmp_path = None
            self._published = True
            return
        self._h[_W_ENGINE_STATE] = ENGINE_RUNNING
        self._heartbeat()
        assert self._tmp_path is not None  # set by create until the region is published
        os.rename(self._tmp_path, self.path)
        self._tmp_path = None
        self._published = True

    # ---- tensors ---------------------------------------------------------------------------

    def tensor(self, layer: int, name: str) -> Any:
        """Tensor ``name`` of ``layer``. Host weights: the numpy view in the region, with the shape,
        dtype (torch bf16/fp8: raw uint16/uint8) and row stride handed over; the engine uses it from
        now on. GPU weights: the engine's own tensor. A region attached by a tool: the u8
        ``[rows, row_bytes]`` view of the listed rows."""
        if not 0 <= layer < self.num_layers:
            raise ContractError(f"layer {layer} is outside [0, {self.num_layers})")
        if self._views is not None:
            try:
                return self._views[layer][name]
            except KeyError:
                raise ContractError(f"layer {layer} has no tensor {name!r} (tensors: {self.tensor_names})") from None
        return self.rows(layer, name)

    def staging_tensor(self, name: str) -> Any:
        """Staging tensor ``name`` (per-expert tensors only): host, the region's
        ``[slots_per_rank, *row]`` view (the sidecar writes it); GPU, the engine's tensor."""
        if self._staging_views is not None:
            try:
                return self._staging_views[name]
            except KeyError:
                raise ContractError(f"no per-expert tensor {name!r} has staging (tensors: {self.tensor_names})") from None
        return self.rows(self.num_layers, name)

    def weights(self, layer: int) -> Dict[str, Any]:
        """``name -> tensor`` of ``layer`` (as :meth:`tensor`)."""
        return {n: self.tensor(layer, n) for n in self.tensor_names}

    def rows(self, layer: int, name: str) -> np.ndarray:
        """Host weights: the u8 ``[rows, row_bytes]`` view of an entry's listed rows, as the table
        says (``layer == num_layers``: the staging layer). What a sidecar reads and writes."""
        if self._rows is None:
            raise ContractError("this region's weights are on the engine's GPU (weights_kind 1)")
        if name not in self.tensor_names:
            raise ContractError(f"no tensor {name!r} (tensors: {self.tensor_names})")
        v = self._rows[layer][self.tensor_names.index(name)]
        if v is None:
            raise ContractError(f"tensor {name!r} has no rows in {'staging' if layer == self.num_layers else f'layer {layer}'}")
        return v

    def read_expert(self, layer: int, slot: int) -> bytes:
        """An expert's bytes (host): row ``slot`` of every per-expert tensor of ``layer``, in table
        order (``layer == num_layers``: the staging layer). What the checksums cover."""
        rows = self._rows
        if rows is None:
            raise ContractError("this region's weights are on the engine's GPU (weights_kind 1)")
        return b"".join(_some(rows[layer][t])[slot].tobytes() for t in self._per_expert)

    def write_expert(self, layer: int, slot: int, data: bytes) -> None:
        """Writes an expert's bytes into row ``slot`` of every per-expert tensor (a sidecar's
        staging write: ``layer == num_layers``; tools and tests only)."""
        rows = self._rows
        if rows is None:
            raise ContractError("this region's weights are on the engine's GPU (weights_kind 1)")
        if len(data) > self.expert_bytes:
            raise ContractError(f"{len(data)} bytes > expert_bytes {self.expert_bytes}")
        buf = np.frombuffer(bytes(data), np.uint8)
        at = 0
        for t in self._per_expert:
            v = _some(rows[layer][t])[slot]
            n = min(len(v), len(buf) - at)
            if n <= 0:
                break
            v[:n] = buf[at : at + n]
            at += n

    def check_table(self) -> int:
        """The tensor table as stored, checked by every rule of the contract (what a sidecar
        checks at attach); returns ``expert_bytes``. For tools and tests."""
        hb = [struct.unpack_from("<Q", self._mm, self._ipc_offset + IPC_HEAD_BYTES + IPC_ENTRY_BYTES * i + 64)[0]
              for i in range(self.num_handles)] if self.weights_kind == WEIGHTS_CUDA_IPC else []
        eb = check_table(self.table, self.num_layers, self.num_tensors, self.slots_per_rank, self.weights_kind,
                         lo=self._command_end, hi=len(self._mm), handle_bytes=hb)
        if eb != self.expert_bytes:
            raise ContractError(f"expert_bytes {self.expert_bytes}, but the table's per-expert rows are {eb} bytes")
        return eb

    @property
    def table_fault(self) -> int:
        """0: the table is valid; ``1 + i``: entry ``i``'s tensor was re-allocated (GPU weights)."""
        return int(self._h[_W_TABLE_FAULT])

    # ---- the step loop ---------------------------------------------------------------------

    @property
    def engine_step(self) -> int:
        return int(self._h[_W_ENGINE_STEP])

    def placement(self) -> Placement:
        """The live placement (no mailbox access)."""
        return Placement(self._ro_phy2log, self._log2phy, self._logcnt, self._ro_epoch)

    def at_step_boundary(self, step: int, agree: Optional[Callable[[int], Tuple[int, int]]] = None) -> Placement:
        """The boundary before running ``step`` (== ``engine_step``): reads the mailbox, agrees,
        applies in place or answers, and returns the placement to route ``step`` with.

        ``agree(have) -> (min, max)`` of ``have`` over every engine rank: the engine's own
        collective, called at every boundary on every rank (the reference engine: one
        MPI_Allreduce). It may be None only when ``world_size == 1``. Holds the region's lock.
        """
        with self._lock:
            if self._closed or self._broken:
                raise ContractError(f"at_step_boundary: the region is {self._broken or 'closed'}")
            if not self._published:
                self.publish()
            if agree is None and self.world_size != 1:
                raise ContractError("agree is required with more than one engine rank")
            step = _plain_int(step)
            if self._native is not None:
                if type(step) is not int or not 0 <= step < 1 << 64:
                    raise ContractError(f"at_step_boundary({step!r}) but engine_step is {self.engine_step}")
                return self._native_boundary(step, agree)  # the library checks the step
            if step != int(self._h[_W_ENGINE_STEP]):
                raise ContractError(f"at_step_boundary({step}) but engine_step is {int(self._h[_W_ENGINE_STEP])}")
            self._heartbeat()
            if self._ptrs and not int(self._h[_W_TABLE_FAULT]):
                # GPU weights: the addresses are checked when a command is first seen (so that the
                # sidecar learns of a re-allocation early) and again at its boundary (_invalid).
                cmd_id = int(self._h[_W_CMD_ID])
                if cmd_id != self._ptrs_seen and cmd_id != int(self._h[_W_ACK_ID]):
                    self._ptrs_seen = cmd_id
                    self._check_pointers()
            have, reject = self._pending_for(step)
            lo, hi = (have, have) if agree is None else _agreed(agree(have))
            placement = self.placement()
            if have and lo == hi == have:
                # The layer as _apply read it: once answered, the mailbox may already hold the
                # sidecar's next command.
                placement.applied.append(self._apply(step))
            elif reject is not None:
                log.warning("rank %d step %d: command %d rejected: %s", self.rank, step, reject[0], reject[1])
                self._answer(reject[0], ACK_REJECTED, step)
            elif have:
                self._answer(have, ACK_CANCELLED, step)
            return placement

    def step_end(self, counts: Any, agree: Optional[Callable[[int], Tuple[int, int]]] = None,
                 compiled: Optional[bool] = None) -> Callable[..., int]:
        """The end of a step in one call: ``end = region.step_end(counts, agree)``, then after the
        forward pass of each step ``end(step, phase="decode", tokens=0, moe_ns=0)`` records
        ``step`` from ``counts`` and runs the boundary before ``step + 1`` with ``agree``
        (``record`` then ``at_step_boundary(step + 1, agree)``); it returns the layer applied at
        that boundary, or -1 (:meth:`placement` has the live placement). The first boundary
        (step 0) is the engine's own ``at_step_boundary(0, agree)``.

        ``counts``: the engine's buffer of the step's counts, written in place each step and read
        at each call: a C-contiguous ``int64`` or ``uint64`` numpy array (or CPU torch tensor) of
        shape ``[num_layers, slots_per_rank]`` (counts ``"local"``) or ``[num_layers,
        num_physical]``; it is held until the region is closed.

        ``compiled``: None (default) takes the compiled step (``eplb_client._fast`` on the
        native backend) when it is there, True requires it (ContractError if not), False never
        takes it. The compiled step does record + boundary in C with one call from Python when no
        command is posted (nearly every step) and hands every other case to the same Python code
        as ``record`` and ``at_step_boundary`` (commands, GPU address checks, every error and its
        message), so both behave alike; it holds no Python-side lock: call it from the engine's
        step thread, in step order."""
        if agree is None and self.world_size != 1:
            raise ContractError("agree is required with more than one engine rank")
        buf = counts
        if _is_torch(buf):
            if buf.device.type != "cpu":
                raise ContractError(f"step_end: counts is on {buf.device}: bind a CPU buffer the engine copies into")
            buf = buf.numpy()
        want = (self.num_layers, self.count_cols)
        if type(buf) is not np.ndarray or buf.shape != want or buf.dtype not in (np.int64, np.uint64) \
                or not buf.flags.c_contiguous:
            raise ContractError(
                f"step_end: counts must be a C-contiguous int64 or uint64 array of shape {want}, got "
                f"{getattr(buf, 'dtype', type(buf).__name__)} {getattr(buf, 'shape', '')} (for other types call "
                f"record() and at_step_boundary())")

        def slow(step: int, phase: str = "decode", tokens: int = 0, moe_ns: int = 0) -> int:
            self.record(step, buf, phase, tokens, moe_ns)
            return boundary(step + 1)

        def boundary(step: int) -> int:
            applied = self.at_step_boundary(step, agree).applied
            return applied[0] if applied else -1

        nat = self._native
        why = ("the region is on the pure-Python backend" if nat is None else
               "eplb_client._fast is not built (python/setup.py needs a C compiler and Python's headers)"
               if _fast is None else "")
        with self._lock:
            if self._closed or self._broken:
                raise ContractError(f"step_end: the region is {self._broken or 'closed'}")
            if compiled is False or (compiled is None and why):
                return slow
            if why:
                raise ContractError(f"step_end(compiled=True): {why}")
            assert nat is not None and _fast is not None and nat.ptr is not None
            if not self._published:
                self.publish()
            end = _fast.StepEnd(nat.lib.path, nat.ptr, buf, agree, slow, boundary, _agreed)
            nat.adopt(end)
        return end

    def _native_record(self, step: int, counts: Any, phase: str, tokens: int, moe_ns: int) -> None:
        """``record`` through the compiled core: the library checks the step, the phase and every
        count (each below ``MAX_COUNT``) before it touches the entry; Python checks only what
        ctypes would otherwise convert silently (a bool, a negative or a too large integer)."""
        nat = self._native
        assert nat is not None
        if type(tokens) is not int or not 0 <= tokens < 1 << 64:
            tokens = _u64(tokens, "tokens")
        if type(moe_ns) is not int or not 0 <= moe_ns < 1 << 64:
            moe_ns = _u64(moe_ns, "moe_ns")
        step = _plain_int(step)  # as the pure-Python backend takes it
        if type(step) is not int or not 0 <= step < 1 << 64:
            raise ContractError(f"record({step!r}) but engine_step is {self.engine_step}")
        code = PHASES.get(phase) if type(phase) is str else None
        if code is None:
            raise ContractError(f"phase {phase!r} is not one of {sorted(PHASES)}")
        buf = self._count_buf
        with self._lock:
            if self._closed or self._broken:
                raise ContractError(f"record: the region is {self._broken or 'closed'}")
            if type(counts) is not np.ndarray or counts.shape != buf.shape or counts.dtype.kind not in "iu":  # type: ignore[union-attr]
                counts = self._check_counts(counts)
            # One copy into the buffer the library reads (a negative count becomes >= 2^63 there,
            # which the library refuses as beyond MAX_COUNT).
            np.copyto(buf, counts, casting="unsafe")  # type: ignore[arg-type]
            try:
                nat.record(step, code, self._count_at, tokens, moe_ns)
            except _native.NativeError as e:
                if e.status == _native.ERR_INVALID:
                    self._check_counts(counts)  # Python's message where it has one
                raise ContractError(str(e)) from None

    def _native_boundary(self, step: int, agree: Optional[Callable[[int], Tuple[int, int]]]) -> Placement:
        """``at_step_boundary`` through the compiled core, in two calls (the caller holds the lock
        and checked the step): ``eplb_boundary_begin`` says what this rank has, ``agree`` runs
        here in Python, ``eplb_boundary_end`` applies or answers. GPU weights: when a command is
        posted, the tensors' addresses are checked as the Python path does (the whole table when
        a command is first seen, the copied ones before an apply); a moved one is reported to the
        library (``eplb_table_fault``) and the boundary begun again, so that the command is
        rejected on this rank and cancelled on the others, never applied."""
        nat, h = self._native, self._h
        assert nat is not None
        ack_before = int(h[_W_ACK_ID])
        try:
            have, posted = nat.boundary_begin(step)
            if posted and self._ptrs and not int(h[_W_TABLE_FAULT]):
                moved = False
                if posted != self._ptrs_seen:
                    self._ptrs_seen = posted
                    moved = not self._check_pointers()
                if have and not moved:
                    moved = not self._check_pointers(int(h[_W_CMD_LAYER]))
                if moved:
                    have, posted = nat.boundary_begin(step)
            lo, hi = (have, have) if agree is None else _agreed(agree(have))
            layer = nat.boundary_end(step, lo, hi)
        except _native.NativeError as e:
            if e.status == _native.ERR_CALLBACK or int(h[_W_ENGINE_STATE]) == ENGINE_FAILED:
                self._broken = str(e)
            raise ContractError(str(e)) from None
        except BaseException as e:
            # An apply that raised (handed back by the library) leaves this rank's weights
            # possibly torn: the library set engine_state = failed.
            if int(h[_W_ENGINE_STATE]) == ENGINE_FAILED:
                self._broken = f"the apply failed mid-copy ({type(e).__name__}: {e})"
                log.error("rank %d step %d: %s; engine_state = failed", self.rank, step, self._broken)
            raise
        placement = self.placement()
        if layer >= 0:
            _fill_log2phy_layer(self._phy2log[layer], self._log2phy[layer])
            self._logcnt[layer] = np.bincount(self._phy2log[layer], minlength=self.num_logical)
            placement.applied.append(layer)
        elif int(h[_W_ACK_ID]) != ack_before and int(h[_W_ACK_RESULT]) == ACK_REJECTED:
            cmd_id, why = nat.last_rejection()
            log.warning("rank %d step %d: command %d rejected: %s", self.rank, step, cmd_id, why)
        return placement

    def record(self, step: int, counts: Any, phase: str = "decode", tokens: int = 0, moe_ns: int = 0) -> None:
        """Step ``step``'s counts into the load ring (seqlock), then ``engine_step = step + 1``.
        Call after the forward pass. ``counts``: ``[num_layers, slots_per_rank]`` (counts
        ``"local"``) or ``[num_layers, num_physical]`` (``"physical"``) exact non-negative integers
        (numpy, torch or nested lists); anything else raises ContractError before the entry is
        touched, so a caught error never leaves the ring entry odd.

        ``moe_ns``: the wall time of the step's MoE layers on this rank, waits for the other
        ranks included (0: not measured). Without ``--step-ms`` the sidecar's cost model takes the
        balanced step time from it."""
        if self._native is not None:
            return self._native_record(step, counts, phase, tokens, moe_ns)
        with self._lock:
            if self._closed or self._broken:
                raise ContractError(f"record: the region is {self._broken or 'closed'}")
            if isinstance(step, bool) or step != int(self._h[_W_ENGINE_STEP]):
                raise ContractError(f"record({step}) but engine_step is {int(self._h[_W_ENGINE_STEP])}")
            if phase not in PHASES:
                raise ContractError(f"phase {phase!r} is not one of {sorted(PHASES)}")
            tokens = _u64(tokens, "tokens")
            moe_ns = _u64(moe_ns, "moe_ns")
            values = self._check_counts(counts)
            q, i = self._h, step % self.ring_len
            w = self._ring_word + i * self._entry_words
            seq = q[w]
            if seq % 2:
                seq += 1  # never leave parity inverted: an odd entry here was torn by a crash
            q[w] = seq + 1  # odd: being written
            try:
                q[w + 1] = step
                q[w + 2] = PHASES[phase]
                q[w + 3] = tokens
                q[w + 4] = moe_ns
                self._ring_counts[i] = values
            finally:
                q[w] = seq + 2  # even: stable (also if the copy above raised)
            q[_W_ENGINE_STEP] = step + 1
            q[_W_ENGINE_HEARTBEAT] = time.monotonic_ns()

    def _check_counts(self, counts: Any) -> np.ndarray:
        """The counts as exact non-negative integers of shape ``[num_layers, count_cols]``."""
        want = (self.num_layers, self.count_cols)
        if type(counts) is np.ndarray and counts.shape == want and counts.dtype.kind in "iu" and counts.size:
            # The fast path (one reduction): as u64, a negative i64 is >= 2^63, beyond MAX_COUNT too.
            v = counts.view(np.uint64) if counts.dtype.itemsize == 8 else counts.astype(np.uint64)
            if v.max() < MAX_COUNT:
                return v
        what = "[num_layers, slots_per_rank]" if self.counts_kind == COUNTS_LOCAL else "[num_layers, num_physical]"
        if _is_torch(counts):
            t = counts.detach().cpu()
            if t.is_floating_point():
                t = t.double()
            counts = t.numpy()
        try:
            a = np.asarray(counts)
        except Exception as e:  # noqa: BLE001 - ragged lists and the like
            raise ContractError(f"counts: not an array ({e})") from None
        if a.shape != want:
            raise ContractError(f"counts has shape {a.shape}, want {want} {what} (no broadcasting)")
        k = a.dtype.kind
        if k == "b":
            raise ContractError("counts are bool: pass integer counts")
        if k not in "iuf":
            raise ContractError(f"counts have dtype {a.dtype}: pass non-negative integers")
        if a.size == 0:
            return a.astype(np.uint64)
        if k == "f":
            bad = ~np.isfinite(a)
            if bad.any():
                raise ContractError(f"counts: {a[bad][0]} at {_at(bad)} is not a number of pairs")
            bad = a != np.floor(a)
            if bad.any():
                raise ContractError(f"counts: {a[bad][0]} at {_at(bad)} is not an integer")
        if k in "if":
            bad = a < 0
            if bad.any():
                raise ContractError(f"counts: {a[bad][0]} at {_at(bad)} is negative")
        bad = a >= MAX_COUNT
        if bad.any():
            raise ContractError(f"counts: {a[bad][0]} at {_at(bad)} is beyond {MAX_COUNT} pairs (overflow or garbage)")
        return a.astype(np.uint64)

    def read_step(self, step: int) -> Optional[Tuple[int, int, np.ndarray]]:
        """A reader's copy of step ``step``'s entry as (phase, tokens, counts), or None when it was
        overwritten (the reader fell ring_len steps behind). For tools and tests."""
        entry = self._ring[step % self.ring_len]
        while True:
            s1 = int(entry[0])
            copy = entry.copy()
            s2 = int(entry[0])
            if s1 == s2 and s1 % 2 == 0:
                break
        if int(copy[1]) != step or step >= self.engine_step:
            return None
        L, C = self.num_layers, self.count_cols
        return int(copy[2]), int(copy[3]), copy[8 : 8 + L * C].reshape(L, C)

    # ---- state and lifetime ----------------------------------------------------------------

    def start_heartbeat(self, interval_s: float = 0.05) -> None:
        """A daemon thread that writes ``engine_heartbeat_ns`` every ``interval_s`` while the
        process lives (the contract wants one at least every 100 ms, also during long steps)."""
        if self._hb_thread is not None:
            return

        def beat() -> None:
            while not self._hb_stop.wait(interval_s):
                if self._closed:
                    return
                self._heartbeat()

        self._hb_thread = threading.Thread(target=beat, name="eplb-heartbeat", daemon=True)
        self._hb_thread.start()

    @property
    def sidecar_pid(self) -> int:
        return int(self._h[_W_SIDECAR_PID])

    @property
    def sidecar_heartbeat_ns(self) -> int:
        """The sidecar's last heartbeat (0 until its loop runs; informational, never waited on by
        the contract)."""
        return int(self._h[_W_SIDECAR_HEARTBEAT])

    @property
    def sidecar_state(self) -> int:
        return int(self._h[_W_SIDECAR_STATE])

    @property
    def engine_state(self) -> int:
        return int(self._h[_W_ENGINE_STATE])

    def finish(self, wait_detach_s: float = 0.0) -> None:
        """Every step done: answers a command still pending as cancelled (no boundary is left
        for it on any rank), ``engine_state = 2``, then closes and unlinks. ``wait_detach_s``: first
        wait up to that long for an attached sidecar to leave (GPU weights: it has closed its IPC
        mappings, so the engine may free the memory)."""
        with self._lock:
            if self._closed:
                return
            if self._native is not None:
                try:
                    self._native.finish(int(max(0.0, wait_detach_s) * 1000))
                finally:
                    self.close()
                return
            pending = int(self._h[_W_CMD_ID])
            seq = int(self._h[_W_CMD_SEQ])
            if seq % 2 == 0 and pending and pending != int(self._h[_W_ACK_ID]) and seq == int(self._h[_W_CMD_SEQ]):
                self._answer(pending, ACK_CANCELLED, self.engine_step)
            self._h[_W_ENGINE_STATE] = ENGINE_FINISHED
            self._heartbeat()
            deadline = time.monotonic() + wait_detach_s
            while int(self._h[_W_SIDECAR_STATE]) == SIDECAR_ATTACHED and time.monotonic() < deadline:
                time.sleep(0.005)
                self._heartbeat()
            self.close()

    def fail(self) -> None:
        """``engine_state = 3`` (the engine gives up), then closes and unlinks."""
        with self._lock:
            if self._closed:
                return
            if self._native is not None:
                try:
                    self._native.fail()
                finally:
                    self.close()
                return
            self._h[_W_ENGINE_STATE] = ENGINE_FAILED
            self.close()

    def close(self) -> None:
        """Stops the heartbeat thread, unlinks the file (the creator only) and unmaps."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _LIVE_REGIONS.discard(self)
            self._hb_stop.set()
            if self._hb_thread is not None and self._hb_thread is not threading.current_thread():
                self._hb_thread.join(timeout=1.0)
            if self._native is not None:
                self._native.close()  # marks a running region failed, removes the file, unmaps its own mapping
            elif self._owner:
                for p in (self._tmp_path, self.path if self._published else None):
                    if p:
                        try:
                            os.unlink(p)
                        except FileNotFoundError:
                            pass
            self._h.release()
            self._mv.release()
            for attr in ("_h", "_mv", "_ring", "_ring_counts", "_phy2log", "_epoch", "_cmd_row", "_cmd_mask",
                         "_ro_phy2log", "_ro_epoch", "_rows", "_views", "_staging_views"):
                setattr(self, attr, None)
            self._ptrs = []
            self._ptrs_by_layer = {}
            try:
                self._mm.close()
            except BufferError:
                pass  # the caller still holds views; the mapping goes with the process

    def __enter__(self) -> "EngineRegion":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.fail()

    # ---- internals -------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        if self._native is not None:
            self._native.heartbeat()
            return
        h = self._h
        if h is not None:
            h[_W_ENGINE_HEARTBEAT] = time.monotonic_ns()

    def _check_pointers(self, layer: Optional[int] = None) -> bool:
        """GPU weights: every registered tensor (``layer`` given: that layer's and the staging
        tensors, the ones an apply of ``layer`` touches) still at the address it was published
        with? On a change: ``table_fault = 1 + entry`` (every command is rejected from now on) and
        False. The whole table is checked when a command is first seen; right before an apply only
        the tensors it copies, since a ``data_ptr()`` costs about a microsecond (236 tensors of a
        DeepSeek-V3 table took 0.25 ms of the apply stall)."""
        ptrs = self._ptrs if layer is None else self._ptrs_by_layer.get(layer, []) + self._ptrs_by_layer.get(
            self.num_layers, [])
        for i, e, tensor, ptr in ptrs:
            now = int(tensor.data_ptr())
            if now != ptr:
                log.error("rank %d: %s, tensor %r (table entry %d) moved from %#x to %#x since the region was "
                          "published (re-allocated): table_fault = %d, every command is rejected from now on",
                          self.rank, "staging" if e.layer == self.num_layers else f"layer {e.layer}", e.name, i,
                          ptr, now, i + 1)
                if self._native is not None:
                    self._native.table_fault(e.layer, e.index)
                else:
                    self._h[_W_TABLE_FAULT] = i + 1
                return False
        return True

    def _pending_for(self, step: int) -> Tuple[int, Optional[Tuple[int, str]]]:
        """(have, reject): ``have`` is the pending command's id when it is for this very boundary
        and valid, else 0; ``reject`` is (id, why) for a command for this boundary that is invalid.
        A command being written (odd or changing ``cmd_seq``) counts as none: the engine never
        waits for the sidecar."""
        h = self._h
        for _ in range(4):
            s1 = int(h[_W_CMD_SEQ])
            if s1 % 2:
                return 0, None
            cmd_id, layer, apply_step, epoch = (int(h[_W_CMD_ID]), int(h[_W_CMD_LAYER]),
                                                int(h[_W_CMD_APPLY_STEP]), int(h[_W_CMD_EPOCH]))
            if cmd_id == 0 or cmd_id == int(h[_W_ACK_ID]):
                return 0, None
            why = None
            if apply_step == step:
                why = self._invalid(layer, epoch)
            if int(h[_W_CMD_SEQ]) != s1:
                continue  # written under us: read again
            if apply_step < step:
                self._answer(cmd_id, ACK_MISSED, step)
                return 0, None
            if apply_step > step:
                return 0, None
            if why is not None:
                return 0, (cmd_id, why)
            return cmd_id, None
        return 0, None

    def _invalid(self, layer: int, epoch: int) -> Optional[str]:
        if self._ptrs and not int(self._h[_W_TABLE_FAULT]):
            self._check_pointers(layer)  # right before an apply: the tensors it copies where they were published
        fault = int(self._h[_W_TABLE_FAULT])
        if fault:
            e = self.table[fault - 1] if fault - 1 < len(self.table) else None
            return (f"table_fault {fault}: tensor {e.name!r} of "
                    f"{'staging' if e.layer == self.num_layers else f'layer {e.layer}'} was re-allocated"
                    if e else f"table_fault {fault}")
        if layer >= self.num_layers:
            return f"layer {layer} >= num_layers {self.num_layers}"
        if epoch != int(self._epoch[layer]) + 1:
            return f"epoch {epoch} is not layer {layer}'s epoch {int(self._epoch[layer])} + 1"
        row = self._cmd_row
        why = check_phy2log(row, self.num_logical)
        if why:
            return f"new row: {why}"
        S, r = self.slots_per_rank, self.rank
        changed = row[r * S : (r + 1) * S] != self._phy2log[layer, r * S : (r + 1) * S]
        if np.any(changed & (self._cmd_mask == 0)):
            return "a local slot changes expert without a staged copy (copy_mask 0)"
        return None

    def _apply(self, step: int) -> int:
        """Applies the pending command in place and answers it; returns its layer."""
        h = self._h
        layer, cmd_id, epoch = int(h[_W_CMD_LAYER]), int(h[_W_CMD_ID]), int(h[_W_CMD_EPOCH])
        slots = np.flatnonzero(self._cmd_mask)
        try:
            if self.weights_kind == WEIGHTS_HOST:
                all_rows = _some(self._rows)
                rows, stage = all_rows[layer], all_rows[self.num_layers]
                for t in self._per_expert:
                    dst, src = _some(rows[t]), _some(stage[t])
                    for s in slots:  # row s of every per-expert tensor, nothing else; a plain row copy
                        dst[s] = src[s]  # each (fancy indexing gathered into temporaries: 10x slower)
                if self._gpu_apply is not None:
                    self._gpu_apply(layer, slots)  # host: a notification after the copy
            else:
                _some(self._gpu_apply)(layer, slots)  # returns once the device copy is done
        except BaseException as e:
            # Some rows may hold the new experts under the old phy2log: this rank's weights are
            # torn. Nothing is answered; the engine is failed so that the sidecar stops, and the
            # region refuses every later step (an engine that caught this must not go on).
            self._broken = f"the apply of layer {layer} failed mid-copy ({type(e).__name__}: {e})"
            self._h[_W_ENGINE_STATE] = ENGINE_FAILED
            log.error("rank %d step %d: %s; engine_state = failed", self.rank, step, self._broken)
            raise
        self._phy2log[layer] = self._cmd_row
        self._epoch[layer] = epoch
        _fill_log2phy_layer(self._phy2log[layer], self._log2phy[layer])
        self._logcnt[layer] = np.bincount(self._phy2log[layer], minlength=self.num_logical)
        self._answer(cmd_id, ACK_APPLIED, step)
        return layer

    def _answer(self, cmd_id: int, result: int, step: int) -> None:
        h = self._h
        h[_W_ACK_RESULT] = result
        h[_W_ACK_STEP] = step
        h[_W_ACK_ID] = cmd_id  # last: the sidecar reads id, then result and step

    def _derive_all(self) -> None:
        for layer in range(self.num_layers):
            _fill_log2phy_layer(self._phy2log[layer], self._log2phy[layer])
            self._logcnt[layer] = np.bincount(self._phy2log[layer], minlength=self.num_logical)


def _describe_layers(layers: Any, num_layers: int, slots_per_rank: int) -> List[List[_Desc]]:
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__len__"):
        raise ContractError("layers: one list of LayerTensor per layer")
    if len(layers) != num_layers:
        raise ContractError(f"layers: {len(layers)} lists, want num_layers = {num_layers}")
    descs = []
    for layer, row in enumerate(layers):
        if isinstance(row, LayerTensor) or not hasattr(row, "__len__"):
            raise ContractError(f"layer {layer}: a list of LayerTensor")
        if not 1 <= len(row) <= MAX_TENSORS:
            raise ContractError(f"layer {layer}: {len(row)} tensors, the table holds 1 to {MAX_TENSORS} a layer")
        descs.append([_describe(t, layer, slots_per_rank) for t in row])
    ref = descs[0]
    for layer, row in enumerate(descs):
        names = [d.name for d in row]
        for t, d in enumerate(row):
            if names.index(d.name) != t:
                raise ContractError(f"{d.where}: field name: used twice in layer {layer}")
        if len(row) != len(ref):
            raise ContractError(f"layer {layer}: {len(row)} tensors, layer 0 has {len(ref)} (the same in every layer)")
        for d, r in zip(row, ref):
            for f in ("name", "kind", "dtype", "row_bytes"):
                if getattr(d, f) != getattr(r, f):
                    raise ContractError(f"{d.where}: field {f}: {getattr(d, f)!r}, but layer 0's tensor {ref.index(r)} "
                                        f"has {getattr(r, f)!r} (the same in every layer, in the same order)")
    if not any(d.kind == KIND_EXPERT for d in ref):
        raise ContractError("layer 0: field kind: at least one per-expert tensor (kind 'expert')")
    return descs


_V = TypeVar("_V")


def _some(x: Optional[_V]) -> _V:
    """``x``, which an invariant of the caller says is set (the weights' rows of a host region, the
    rows of a per-expert tensor, the apply of a CUDA region): the narrowing the type checker needs."""
    assert x is not None
    return x


def _describe_staging(staging: Any, ref: List[_Desc], slots_per_rank: int) -> List[Optional[_Desc]]:
    """The engine's staging tensors in table order (None for a global's slot)."""
    if isinstance(staging, LayerTensor) or not hasattr(staging, "__iter__"):
        raise ContractError("staging: a list of LayerTensor")
    by_name: Dict[str, _Desc] = {}
    for t in staging:
        desc = _describe(t, None, slots_per_rank)
        if desc.name in by_name:
            raise ContractError(f"{desc.where}: field name: used twice in staging")
        by_name[desc.name] = desc
    out: List[Optional[_Desc]] = []
    for r in ref:
        d = by_name.pop(r.name, None)
        if r.kind == KIND_GLOBAL:
            if d is not None:
                raise ContractError(f"{d.where}: field kind: {r.name!r} is global: globals have no staging")
            out.append(None)
            continue
        if d is None:
            raise ContractError(f"{_where(None, r.name)}: field name: the per-expert tensor has no staging tensor")
        for f in ("kind", "dtype", "row_bytes"):
            if getattr(d, f) != getattr(r, f):
                raise ContractError(f"{d.where}: field {f}: {getattr(d, f)!r}, but the layers' tensor has "
                                    f"{getattr(r, f)!r}")
        if not d.cuda or d.device != r.device:
            raise ContractError(f"{d.where}: field data: on {d.device}, the layers' tensors on {r.device}")
        out.append(d)
    if by_name:
        name = next(iter(by_name))
        raise ContractError(f"{_where(None, name)}: field name: no layer has a tensor of that name")
    return out


def _copy_into(view: np.ndarray, d: _Desc) -> None:
    """Copies a handed-over host tensor into its region view, byte for byte."""
    src = d.data
    if _is_torch(src):
        import torch  # only when the engine handed torch tensors

        raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[d.itemsize]
        src = src.detach().view(raw).numpy()
    src = np.asarray(src)
    if src.dtype != view.dtype:
        src = src.view(view.dtype) if src.ndim else src.reshape(1).view(view.dtype).reshape(())
    np.copyto(view, src, casting="no")


def _read_table(mm: mmap.mmap, table_offset: int, num_layers: int, num_tensors: int) -> List[TableEntry]:
    out = []
    for i in range((num_layers + 1) * num_tensors):
        n, dt, off, rs, rb, rows, kind, _res, h = struct.unpack_from(_ENTRY_FMT, mm, table_offset + i * TENSOR_ENTRY_BYTES)
        out.append(TableEntry(i // num_tensors, i % num_tensors, n.rstrip(b"\0").decode(errors="replace"),
                              dt.rstrip(b"\0").decode(errors="replace"), off, rs, rb, rows, kind, h))
    return out


def _at(mask: np.ndarray) -> Tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _agreed(pair: Any) -> Tuple[int, int]:
    """``agree``'s answer as (min, max), each an integer in [0, 2^64)."""
    try:
        lo, hi = pair
        ok = type(lo) is int and type(hi) is int
        if not ok:
            lo, hi = operator.index(lo), operator.index(hi)  # numpy integers
    except (TypeError, ValueError):
        raise ContractError(f"agree returned {pair!r}: want (min, max) of have over every engine rank") from None
    if not (0 <= lo < 1 << 64 and 0 <= hi < 1 << 64):
        raise ContractError(f"agree returned ({lo}, {hi}): the min and max of have, in [0, 2^64)")
    return lo, hi


def _plain_int(v: Any) -> Any:
    """A numpy integer as a Python int (a step the library takes through ctypes); else ``v``."""
    return int(v) if isinstance(v, np.integer) else v


def _u64(v: Any, what: str) -> int:
    if isinstance(v, bool):
        raise ContractError(f"{what} {v!r}: an integer, not a bool")
    try:
        n = operator.index(v)
    except TypeError:
        raise ContractError(f"{what} {v!r}: a non-negative integer") from None
    if not 0 <= n < 1 << 64:
        raise ContractError(f"{what} {n}: outside [0, 2^64)")
    return n


# Regions this process created and has not closed: unlinked at interpreter exit (also after an
# uncaught exception), so a normal exit leaves nothing in /dev/shm. A SIGKILL leaves the files:
# ``cleanup(name)`` or ``rm -f /dev/shm/eplb-NAME-* /dev/shm/.eplb-NAME-*`` removes them.
_LIVE_REGIONS: "weakref.WeakSet[EngineRegion]" = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for region in list(_LIVE_REGIONS):
        if region._closed:
            continue
        if region.engine_state in (ENGINE_STARTING, ENGINE_RUNNING):
            region.fail()
        else:
            region.close()


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid >= 1 << 31:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def _read_head(path: str) -> Optional[bytes]:
    """The first 128 bytes of the regular file at ``path`` (None if it is gone), never blocking:
    anything but a regular file (FIFO, device, socket, symlink, directory) raises ContractError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise ContractError(f"{path} exists and is not a regular file ({_file_kind(st.st_mode)}): remove it or "
                            f"choose another name")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between lstat and open
            raise ContractError(f"{path} exists and is not a regular file: remove it or choose another name")
        return os.pread(fd, 128, 0)
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return what
    return "not a plain file"


def _check_existing(path: str) -> None:
    """A region left at ``path`` by a crashed engine is replaced; one whose engine lives, or a
    file that is not a region, is an error (never blocking on a FIFO or device)."""
    head = _read_head(path)
    if head is None:
        return
    if len(head) < 128 or struct.unpack_from("<Q", head, 0)[0] != MAGIC:
        raise ContractError(f"{path} exists and is not an eplb region: remove it or choose another name")
    pid = struct.unpack_from("<Q", head, 120)[0]
    if _pid_alive(pid):
        raise ContractError(f"{path} belongs to running engine pid {pid}: choose another name")
    log.warning("%s: replacing a region left by engine pid %d, which is gone", path, pid)


def _create_exclusive(tmp: str) -> int:
    """Creates the temporary file (O_EXCL, 0600). A regular leftover of a dead process with our
    pid is removed once; anything else at that name is an error."""
    for _ in range(2):
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError as err:
            st = os.lstat(tmp)
            if not stat.S_ISREG(st.st_mode):
                raise ContractError(f"{tmp} exists and is not a regular file ({_file_kind(st.st_mode)}): remove it") from err
            os.unlink(tmp)
    raise ContractError(f"{tmp} keeps appearing: another process uses this name")


def _check_free_space(path: str, total_bytes: int) -> None:
    """Refuses a region larger than the free space of its file system (tmpfs pages would fail
    later with SIGBUS on first touch, or fill the host's memory)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if total_bytes > free:
        raise ContractError(f"{path}: the region needs {total_bytes} bytes ({total_bytes / 2**30:.2f} GiB) but "
                            f"{SHM_DIR} has {free} free ({free / 2**30:.2f} GiB): enlarge {SHM_DIR} (docker "
                            f"--shm-size) or shrink the region")


_REGION_FILE = re.compile(r"eplb-(?P<name>.+)-(?P<rank>[0-9]+)")
_TMP_FILE = re.compile(r"\.eplb-(?P<name>.+)-(?P<rank>[0-9]+)\.(?P<pid>[0-9]+)\.tmp")


def cleanup(name: str) -> List[str]:
    """Removes the regions of exactly ``name`` (``eplb-NAME-<rank>`` and their temporary files)
    whose engine process is gone (crash leftovers); returns them. A file is removed only if it
    is a regular file holding an eplb region (magic) of that rank; never blocks on a FIFO."""
    check_name(name)
    removed = []
    for entry in sorted(os.listdir(SHM_DIR)):
        m = _REGION_FILE.fullmatch(entry) or _TMP_FILE.fullmatch(entry)
        if not m or m.group("name") != name:
            continue
        path = os.path.join(SHM_DIR, entry)
        try:
            head = _read_head(path)
        except (ContractError, OSError):
            continue  # not a regular file: not ours to remove
        if head is None or len(head) < 128 or struct.unpack_from("<Q", head, 0)[0] != MAGIC:
            continue
        if struct.unpack_from("<I", head, 32)[0] != int(m.group("rank")):
            continue
        pid = struct.unpack_from("<Q", head, 120)[0]
        if not _pid_alive(pid):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed

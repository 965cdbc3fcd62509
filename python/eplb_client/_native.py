"""The compiled core of the client: ``libeplb_client`` (issue 21; docs/c-api.md) through ctypes.

:class:`eplb_client.EngineRegion` uses it when it loads (``backend="auto"``, the default, or
``"native"``): the library creates the region and does every write the contract orders (the ring
seqlock, the mailbox answers, the placement and epochs of an apply, the states) with atomic
release stores, so the client is correct on any machine, not only on x86-64, and its step costs
compiled code, not Python's cold-cache path. No compiler runs at ``pip install``: the library is
found at run time, in this order:

* ``$EPLB_CLIENT_LIB`` (a path to ``libeplb_client.so``); if set, nothing else is tried;
* the repository's ``target/release/libeplb_client.so`` when this package is an editable install
  of the eplb repository (``cargo build --release`` builds it).

``EPLB_CLIENT_BACKEND`` (``auto`` | ``native`` | ``python``) chooses when ``create`` is given no
``backend``. The library must speak the client's contract major version.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from ctypes import POINTER, c_char_p, c_int, c_int32, c_size_t, c_uint32, c_uint64, c_void_p
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

from .errors import ContractError

LIB_ENV = "EPLB_CLIENT_LIB"
BACKEND_ENV = "EPLB_CLIENT_BACKEND"
BACKENDS = ("auto", "native", "python")
LIB_NAME = "libeplb_client.so"

# eplb_status
OK, ERR_INVALID, ERR_STATE, ERR_IO, ERR_SIDECAR, ERR_CALLBACK, ERR_PANIC = range(7)
STATUS_NAMES = ("EPLB_OK", "EPLB_ERR_INVALID", "EPLB_ERR_STATE", "EPLB_ERR_IO", "EPLB_ERR_SIDECAR",
                "EPLB_ERR_CALLBACK", "EPLB_ERR_PANIC")


class TensorDesc(ctypes.Structure):
    """``eplb_tensor_desc``."""

    _fields_ = [("name", c_char_p), ("dtype", c_char_p), ("kind", c_uint32), ("rows", c_uint32),
                ("row_bytes", c_uint64), ("row_stride", c_uint64), ("ipc_handle", c_void_p),
                ("ipc_offset", c_uint64)]


class Config(ctypes.Structure):
    """``eplb_config``."""

    _fields_ = [("rank", c_uint32), ("world_size", c_uint32), ("num_layers", c_uint32),
                ("slots_per_rank", c_uint32), ("num_logical", c_uint32), ("ring_len", c_uint32),
                ("weights_kind", c_uint32), ("counts_kind", c_uint32), ("num_tensors", c_uint32),
                ("tensors", POINTER(TensorDesc)), ("staging", POINTER(TensorDesc)), ("phy2log", POINTER(c_int32))]


APPLY_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_uint32, POINTER(c_uint32), c_size_t)


class NativeError(ContractError):
    """A non-zero ``eplb_status``: ``status`` and the library's message (which names the call)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Library:
    """The loaded library with its prototypes."""

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        self.lib = lib
        # The step's calls through a second handle that keeps the GIL (ctypes.PyDLL): they take
        # microseconds, and releasing and re-taking the GIL around each costs as much as the call
        # (more with cold caches, or with another Python thread waiting). Calls that may block
        # (finish waits for the sidecar to detach) go through `lib`, which releases it.
        fast = ctypes.PyDLL(path)
        self.fast = fast
        lib.eplb_abi_version.restype, lib.eplb_abi_version.argtypes = c_uint32, []
        lib.eplb_last_error.restype, lib.eplb_last_error.argtypes = c_char_p, []
        lib.eplb_create.restype = c_int
        lib.eplb_create.argtypes = [c_char_p, POINTER(Config), APPLY_FN, c_void_p, POINTER(c_void_p)]
        lib.eplb_tensor_ptr.restype, lib.eplb_tensor_ptr.argtypes = c_void_p, [c_void_p, c_uint32, c_uint32]
        for fn in ("eplb_publish", "eplb_heartbeat", "eplb_fail"):
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = c_int, [c_void_p]
        # The hot path: plain integers and addresses (no per-call conversion objects).
        for h in (lib, fast):
            h.eplb_record.restype = c_int
            h.eplb_record.argtypes = [c_void_p, c_uint64, c_uint32, c_void_p, c_size_t, c_uint64, c_uint64]
            # The boundary in two calls: the engine's agree runs in Python between them (no
            # callback from C into Python, which costs more than the rest of the boundary).
            h.eplb_boundary_begin.restype = c_int
            h.eplb_boundary_begin.argtypes = [c_void_p, c_uint64, c_void_p, c_void_p]
            h.eplb_boundary_end.restype = c_int
            h.eplb_boundary_end.argtypes = [c_void_p, c_uint64, c_uint64, c_uint64, c_void_p]
            h.eplb_heartbeat.restype, h.eplb_heartbeat.argtypes = c_int, [c_void_p]
        lib.eplb_phy2log.restype, lib.eplb_phy2log.argtypes = c_int, [c_void_p, c_uint32, c_void_p, c_size_t]
        lib.eplb_table_fault.restype, lib.eplb_table_fault.argtypes = c_int, [c_void_p, c_uint32, c_uint32]
        lib.eplb_finish.restype, lib.eplb_finish.argtypes = c_int, [c_void_p, c_uint64]
        lib.eplb_close.restype, lib.eplb_close.argtypes = None, [c_void_p]
        self.abi_version = int(lib.eplb_abi_version())

    def error(self, status: int, what: str) -> NativeError:
        msg = (self.lib.eplb_last_error() or b"").decode(errors="replace")
        name = STATUS_NAMES[status] if 0 <= status < len(STATUS_NAMES) else f"status {status}"
        return NativeError(status, msg or f"{what}: {name}")


_LOCK = threading.Lock()
_LOADED: Optional[Tuple[Optional[Library], str]] = None


def candidates() -> List[Path]:
    """Where the library is looked for (see the module docstring)."""
    env = os.environ.get(LIB_ENV)
    if env:
        return [Path(env)]
    repo = Path(__file__).resolve().parents[2]
    if (repo / "Cargo.toml").is_file() and (repo / "client").is_dir():
        return [repo / "target" / "release" / LIB_NAME]
    return []


def load(version: int) -> Tuple[Optional[Library], str]:
    """(the library, "") or (None, why not). Loaded once a process; ``version``: the contract
    major version the client speaks (the library must speak the same)."""
    global _LOADED
    with _LOCK:
        if _LOADED is None:
            _LOADED = _load(version)
        return _LOADED


def reset() -> None:
    """Forgets the loaded library (tests: after changing ``$EPLB_CLIENT_LIB``)."""
    global _LOADED
    with _LOCK:
        _LOADED = None


def _load(version: int) -> Tuple[Optional[Library], str]:
    paths = candidates()
    if not paths:
        return None, (f"{LIB_NAME} not found: set {LIB_ENV} to its path (cargo build --release builds it in the "
                      f"eplb repository's target/release)")
    path = paths[0]
    if not path.is_file():
        return None, f"{path} does not exist (cargo build --release builds it; {LIB_ENV} names another)"
    try:
        lib = Library(str(path))
    except (OSError, AttributeError) as e:
        return None, f"{path} does not load as {LIB_NAME}: {e}"
    if lib.abi_version >> 16 != version:
        return None, (f"{path} speaks contract version {lib.abi_version >> 16} (minor {lib.abi_version & 0xFFFF}), "
                      f"this client version {version}: use the library of the same release")
    return lib, ""


class NativeRegion:
    """One ``eplb_region *`` and what its callbacks need. Not thread-safe by itself: the
    :class:`~eplb_client.EngineRegion` that owns it serialises every call but ``heartbeat`` (which
    the library allows at any time)."""

    def __init__(self, lib: Library, name: str, cfg: Config, keep: Sequence[Any],
                 apply: Optional[Callable[[int, Any], None]], count_len: int):
        self.lib = lib
        self._l = lib.lib
        self._record = lib.fast.eplb_record
        self._begin = lib.fast.eplb_boundary_begin
        self._end = lib.fast.eplb_boundary_end
        self._beat = lib.fast.eplb_heartbeat
        self._keep = keep  # the descriptions' strings and buffers, alive while the library reads them
        self.callback_error: Optional[BaseException] = None
        self._apply = apply
        self._apply_fn = APPLY_FN(self._apply_tramp) if apply is not None else APPLY_FN()
        # The out-values of the step's calls, allocated once (a ctypes object a call costs more
        # than the call's own work).
        self._have, self._posted, self._applied = c_uint64(), c_uint64(), c_int32(-1)
        self._have_at, self._posted_at = ctypes.addressof(self._have), ctypes.addressof(self._posted)
        self._applied_at = ctypes.addressof(self._applied)
        # The compiled step ends (eplb_client._fast.StepEnd) that hold this region's pointer:
        # detached before the region is freed.
        self._step_ends: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.count_len = count_len
        ptr = c_void_p()
        rc = self._l.eplb_create(name.encode(), ctypes.byref(cfg), self._apply_fn, None, ctypes.byref(ptr))
        if rc != OK:
            raise self._error(rc, "eplb_create")
        self.ptr: Optional[int] = ptr.value

    def _error(self, rc: int, what: str) -> BaseException:
        if rc == ERR_CALLBACK and self.callback_error is not None:
            err, self.callback_error = self.callback_error, None
            return err
        return self.lib.error(rc, what)

    def _apply_tramp(self, _user: Any, layer: int, slots: Any, n: int) -> int:
        try:
            import numpy as np

            arr = np.ctypeslib.as_array(slots, shape=(n,)).astype(np.int64) if n else np.zeros(0, np.int64)
            self._apply(layer, arr)  # type: ignore[misc]
            return 0
        except BaseException as e:  # noqa: BLE001 - handed back to the caller of at_step_boundary
            self.callback_error = e
            return 1

    def tensor_ptr(self, layer: int, tensor: int) -> int:
        p = self._l.eplb_tensor_ptr(self.ptr, layer, tensor)
        if not p:
            raise self.lib.error(ERR_INVALID, "eplb_tensor_ptr")
        return int(p)

    def publish(self) -> None:
        rc = self._l.eplb_publish(self.ptr)
        if rc != OK:
            raise self._error(rc, "eplb_publish")

    def record(self, step: int, phase: int, counts_at: int, tokens: int, moe_ns: int) -> None:
        rc = self._record(self.ptr, step, phase, counts_at, self.count_len, tokens, moe_ns)
        if rc != OK:
            raise self._error(rc, "eplb_record")

    def boundary_begin(self, step: int) -> Tuple[int, int]:
        """``eplb_boundary_begin``: (have, posted)."""
        rc = self._begin(self.ptr, step, self._have_at, self._posted_at)
        if rc != OK:
            raise self._error(rc, "eplb_boundary_begin")
        return self._have.value, self._posted.value

    def boundary_end(self, step: int, lo: int, hi: int) -> int:
        """``eplb_boundary_end``: the layer applied, or -1."""
        rc = self._end(self.ptr, step, lo, hi, self._applied_at)
        if rc != OK:
            raise self._error(rc, "eplb_boundary_end")
        return self._applied.value

    def adopt(self, step_end: Any) -> None:
        """Keeps a compiled step end to detach when the region is freed."""
        self._step_ends.add(step_end)

    def heartbeat(self) -> None:
        if self.ptr is not None:
            self._beat(self.ptr)

    def table_fault(self, layer: int, tensor: int) -> None:
        rc = self._l.eplb_table_fault(self.ptr, layer, tensor)
        if rc != OK:
            raise self._error(rc, "eplb_table_fault")

    def finish(self, wait_detach_ms: int) -> None:
        rc = self._l.eplb_finish(self.ptr, wait_detach_ms)
        if rc != OK:
            raise self._error(rc, "eplb_finish")

    def fail(self) -> None:
        rc = self._l.eplb_fail(self.ptr)
        if rc != OK:
            raise self._error(rc, "eplb_fail")

    def close(self) -> None:
        """Unmaps, removes the file (a running region is marked failed first) and frees."""
        for step_end in list(self._step_ends):
            step_end.detach()  # it must not call into the library with a freed pointer
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            self._l.eplb_close(ptr)

"""The engine side of the eplb engine contract, version 1 (docs/engine-contract.md).

One shared-memory region per engine rank, ``/dev/shm/eplb-NAME-RANK``. The engine creates it,
fills its expert weights, publishes it, and then at every step:

* ``at_step_boundary(step, agree)`` before the forward pass: reads the mailbox, agrees with the
  other engine ranks (``agree`` is the engine's own collective), applies a command in place or
  answers it, and returns the placement the router needs;
* ``record(step, counts, phase)`` after the forward pass: one load-ring entry under a sequence lock.

Only the engine writes the live weights, ``phy2log`` and the epochs, and only inside
``at_step_boundary``; the sidecar writes the staging area and the mailbox.

Layout constants below are the contract's byte offsets; integers are little-endian. Atomic fields
are aligned ``u64`` written with one numpy scalar store (a single 8-byte store on x86-64, which
also keeps store order, as the contract's seqlocks need).
"""

from __future__ import annotations

import atexit
import errno
import logging
import mmap
import os
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("eplb_client")

MAGIC = 0x314D4853424C5045  # the bytes "EPLBSHM1"
VERSION = 1
MINOR_VERSION = 2  # 1: CUDA IPC weights (weights_kind 1); 2: the step's MoE time in the ring entry
WEIGHTS_HOST, WEIGHTS_CUDA_IPC = 0, 1
IPC_OFFSET = 2048  # the IPC section: pci_bus_id[16], uuid[16], num_handles u32, then the table at 2112
IPC_TABLE = 2112
IPC_ENTRY_BYTES = 128
IPC_MAX_HANDLES = 15
IPC_ROLE_LIVE, IPC_ROLE_STAGING = 1, 2
HEADER_BYTES = 4096
TENSOR_TABLE_OFFSET = 1024
TENSOR_ENTRY_BYTES = 64
MAX_TENSORS = 16
MIN_RING_LEN = 16
SHM_DIR = "/dev/shm"

# Header u64 word indices (byte offset / 8).
_W_ENGINE_PID = 120 // 8
_W_ENGINE_STEP = 128 // 8
_W_ENGINE_HEARTBEAT = 136 // 8
_W_ENGINE_STATE = 144 // 8
_W_SIDECAR_PID = 152 // 8
_W_SIDECAR_HEARTBEAT = 160 // 8
_W_SIDECAR_STATE = 168 // 8
_W_CMD_SEQ = 256 // 8
_W_CMD_ID = 264 // 8
_W_CMD_LAYER = 272 // 8
_W_CMD_APPLY_STEP = 280 // 8
_W_CMD_EPOCH = 288 // 8
_W_ACK_ID = 320 // 8
_W_ACK_RESULT = 328 // 8
_W_ACK_STEP = 336 // 8

# engine_state / sidecar_state values.
ENGINE_STARTING, ENGINE_RUNNING, ENGINE_FINISHED, ENGINE_FAILED = 0, 1, 2, 3
SIDECAR_NONE, SIDECAR_ATTACHED, SIDECAR_EXITED_OK, SIDECAR_FAILED = 0, 1, 2, 3
# ack_result values.
ACK_APPLIED, ACK_CANCELLED, ACK_MISSED, ACK_REJECTED = 1, 2, 3, 4
# Ring entry phase values.
PHASES = {"prefill": 1, "decode": 2, "mixed": 3}

DTYPES: Dict[str, Optional[np.dtype]] = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "f64": np.dtype("<f8"),
    "i8": np.dtype("i1"),
    "u8": np.dtype("u1"),
    "i32": np.dtype("<i4"),
    "bf16": None,  # no numpy dtype: exposed as raw uint16
    "f8e4m3": None,  # exposed as raw uint8
}
_RAW: Dict[str, np.dtype] = {"bf16": np.dtype("<u2"), "f8e4m3": np.dtype("u1")}
_ITEMSIZE = {"f32": 4, "f16": 2, "f64": 8, "i8": 1, "u8": 1, "i32": 4, "bf16": 2, "f8e4m3": 1}


class ContractError(RuntimeError):
    """The region cannot be created or used as the contract says (the message says why)."""


class TensorSpec(NamedTuple):
    """One tensor of an expert: name (up to 23 UTF-8 bytes), dtype name, shape (1 or 2 dims)."""

    name: str
    dtype: str
    shape: Tuple[int, ...]


class IpcHandle(NamedTuple):
    """One CUDA IPC handle: the 64-byte ``cudaIpcMemHandle_t`` of a whole allocation, the role
    (IPC_ROLE_LIVE: live slots ``[layers][slots_per_rank][expert_bytes]`` of layers
    ``first_layer..``; IPC_ROLE_STAGING: ``[slots_per_rank][expert_bytes]``), and the tensor's byte
    offset and size inside the allocation."""

    handle: bytes
    role: int
    first_layer: int
    offset: int
    nbytes: int


class IpcWeights(NamedTuple):
    """The engine's GPU (PCI bus id as ``cuDeviceGetPCIBusId`` writes it, 16-byte UUID) and the
    handles of its expert weights (weights_kind 1). See ``eplb_client.cuda_ipc.export_weights``."""

    pci_bus_id: str
    uuid: bytes
    handles: Sequence[IpcHandle]


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def region_path(name: str, rank: int) -> str:
    """``/dev/shm/eplb-NAME-RANK``."""
    if not name or any(not (c.isascii() and (c.isalnum() or c in "_.-")) for c in name):
        raise ContractError(f"region name {name!r}: use only [A-Za-z0-9_.-]")
    return os.path.join(SHM_DIR, f"eplb-{name}-{rank}")


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
        tensors: Sequence[TensorSpec],
        phy2log: np.ndarray,
        ring_len: int = 64,
        ipc: Optional[IpcWeights] = None,
        apply: Optional[Callable[[int, np.ndarray], None]] = None,
    ) -> "EngineRegion":
        """Creates the region under a temporary name with the header, the placement (``phy2log``
        [num_layers, world_size * slots_per_rank]) and zeroed weights. Fill the weights through
        :meth:`weights`, then :meth:`publish` renames it into place.

        GPU weights (weights_kind 1): ``ipc`` names the engine's GPU and the CUDA IPC handles of
        its live slots and staging area (the region then holds no weights), and
        ``apply(layer, slots)`` copies staging slot s into live slot s of ``layer`` for every s in
        ``slots`` on the GPU and returns once the copy has completed (the sidecar may write the
        staging area again as soon as the command is answered)."""
        path = region_path(name, rank)
        if not (0 <= rank < world_size):
            raise ContractError(f"rank {rank} is outside world_size {world_size}")
        if num_layers < 1 or slots_per_rank < 1 or num_logical < 1:
            raise ContractError("num_layers, slots_per_rank and num_logical must be >= 1")
        if ring_len < MIN_RING_LEN:
            raise ContractError(f"ring_len {ring_len} < {MIN_RING_LEN}")
        if not 1 <= len(tensors) <= MAX_TENSORS:
            raise ContractError(f"{len(tensors)} tensors: the table holds 1 to {MAX_TENSORS}")
        num_physical = world_size * slots_per_rank
        phy2log = np.asarray(phy2log)
        if phy2log.shape != (num_layers, num_physical):
            raise ContractError(f"phy2log has shape {phy2log.shape}, want ({num_layers}, {num_physical})")
        for layer in range(num_layers):
            why = check_phy2log(phy2log[layer], num_logical)
            if why:
                raise ContractError(f"phy2log layer {layer}: {why}")

        if (ipc is None) != (apply is None):
            raise ContractError("GPU weights need both ipc (the handles) and apply (the engine's copy)")
        table, expert_bytes = _tensor_table(tensors)
        ipc_section = _ipc_section(ipc, num_layers, slots_per_rank * expert_bytes) if ipc is not None else b""
        ring_entry_bytes = 64 + _round_up(8 * num_layers * slots_per_rank, 64)
        ring_offset = HEADER_BYTES
        placement_offset = ring_offset + ring_len * ring_entry_bytes
        epochs_offset = _round_up(placement_offset + 4 * num_layers * num_physical, 64)
        command_offset = _round_up(epochs_offset + 8 * num_layers, 64)
        mask_offset = command_offset + _round_up(4 * num_physical, 64)
        weights_offset = _round_up(mask_offset + slots_per_rank, 4096)
        staging_offset = weights_offset + num_layers * slots_per_rank * expert_bytes
        total_bytes = _round_up(staging_offset + slots_per_rank * expert_bytes, 4096)
        kind = WEIGHTS_HOST
        if ipc is not None:  # the weights are on the GPU: the region ends before them
            kind, total_bytes, weights_offset, staging_offset = WEIGHTS_CUDA_IPC, weights_offset, 0, 0

        _check_existing(path)
        tmp = os.path.join(SHM_DIR, f".eplb-{name}-{rank}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, total_bytes)
            mm = mmap.mmap(fd, total_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)

        header = struct.pack(
            "<QIIIIIIIIQIIQQQQQQQQQQ",
            MAGIC, VERSION, HEADER_BYTES, num_layers, slots_per_rank, num_logical, world_size, rank,
            ring_len, expert_bytes, len(tensors), kind, total_bytes, ring_offset, ring_entry_bytes,
            placement_offset, epochs_offset, command_offset, weights_offset, staging_offset,
            os.getpid(), 0,
        )
        mm[0 : len(header)] = header
        struct.pack_into("<I", mm, 176, MINOR_VERSION)
        mm[TENSOR_TABLE_OFFSET : TENSOR_TABLE_OFFSET + len(table)] = table
        mm[IPC_OFFSET : IPC_OFFSET + len(ipc_section)] = ipc_section
        region = cls(mm, path, tmp, owner=True)
        region._gpu_apply = apply
        _LIVE_REGIONS.add(region)
        region._phy2log[:] = phy2log
        region._derive_all()
        region._heartbeat()
        return region

    def __init__(self, mm: mmap.mmap, path: str, tmp_path: Optional[str], owner: bool):
        self._mm = mm
        self.path = path
        self._tmp_path = tmp_path
        self._owner = owner
        self._closed = False
        hdr = struct.unpack_from("<QIIIIIIIIQIIQQQQQQQQQ", mm, 0)
        (magic, version, _hb, self.num_layers, self.slots_per_rank, self.num_logical, self.world_size,
         self.rank, self.ring_len, self.expert_bytes, num_tensors, self.weights_kind, total, ring_offset,
         self.ring_entry_bytes, placement_offset, epochs_offset, command_offset, weights_offset,
         staging_offset, _pid) = hdr
        if magic != MAGIC or version != VERSION:
            raise ContractError(f"{path}: not an eplb region of version {VERSION} (magic {magic:#x}, version {version})")
        self.num_physical = self.world_size * self.slots_per_rank
        self.tensors = _read_tensor_table(mm, num_tensors)
        L, S, P, E = self.num_layers, self.slots_per_rank, self.num_physical, self.num_logical
        # Header and ring words through a memoryview: a plain C load or store of 8 bytes per access,
        # with far less code on the path than numpy scalar indexing (it matters when the engine's
        # forward pass has just flushed the caches: see BENCHMARKS.md).
        self._mv = memoryview(mm)
        self._h = self._mv.cast("Q")  # the whole region as u64 words; the header is words 0..511
        self._ring_word = ring_offset // 8
        self._entry_words = self.ring_entry_bytes // 8
        self._ring = np.frombuffer(mm, dtype="<u8", count=self.ring_len * self.ring_entry_bytes // 8,
                                   offset=ring_offset).reshape(self.ring_len, self.ring_entry_bytes // 8)
        self._ring_counts = self._ring[:, 8 : 8 + L * S].reshape(self.ring_len, L, S)
        self._phy2log = np.frombuffer(mm, dtype="<i4", count=L * P, offset=placement_offset).reshape(L, P)
        self._epoch = np.frombuffer(mm, dtype="<u8", count=L, offset=epochs_offset)
        self._cmd_row = np.frombuffer(mm, dtype="<i4", count=P, offset=command_offset)
        self._cmd_mask = np.frombuffer(mm, dtype="u1", count=S, offset=command_offset + _round_up(4 * P, 64))
        self._gpu_apply: Optional[Callable[[int, np.ndarray], None]] = None
        if self.weights_kind == WEIGHTS_HOST:
            self._live = np.frombuffer(mm, dtype="u1", count=L * S * self.expert_bytes,
                                       offset=weights_offset).reshape(L, S, self.expert_bytes)
            self._staging = np.frombuffer(mm, dtype="u1", count=S * self.expert_bytes,
                                          offset=staging_offset).reshape(S, self.expert_bytes)
        else:  # on the engine's GPU (weights_kind 1)
            # None here: every use goes through _host_weights(), which raises for weights_kind 1.
            self._live = self._staging = None  # type: ignore[assignment]
        self._log2phy = np.full((L, E, max(1, P - E + 1)), -1, dtype=np.int32)
        self._logcnt = np.zeros((L, E), dtype=np.int32)
        self._published = False
        self._hb_thread: Optional[threading.Thread] = None
        self._hb_stop = threading.Event()
        self._ro_phy2log = self._phy2log.view()
        self._ro_phy2log.flags.writeable = False
        self._ro_epoch = self._epoch.view()
        self._ro_epoch.flags.writeable = False

    @classmethod
    def attach(cls, name: str, rank: int) -> "EngineRegion":
        """Maps an existing region (for tools and tests: a sidecar's view). Never unlinks it."""
        path = region_path(name, rank)
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        region = cls(mm, path, None, owner=False)
        region._derive_all()
        return region

    def publish(self) -> None:
        """Renames the filled region into place (``engine_state = 1``): a sidecar may attach now."""
        if self._published:
            return
        self._h[_W_ENGINE_STATE] = ENGINE_RUNNING
        self._heartbeat()
        assert self._tmp_path is not None  # set by create() until the first publish
        os.rename(self._tmp_path, self.path)
        self._tmp_path = None
        self._published = True

    # ---- weights ---------------------------------------------------------------------------

    def weights(self, layer: int, staging: bool = False) -> Dict[str, np.ndarray]:
        """numpy views of each tensor of ``layer``'s local slots: ``name -> [slots_per_rank, *shape]``
        (bf16 and f8e4m3 as raw uint16 / uint8). ``staging=True``: the staging area instead."""
        self._host_weights()
        raw = self._staging if staging else self._live[layer]
        out = {}
        for t in self.tensors:
            dt = DTYPES[t.dtype] or _RAW[t.dtype]
            off, nbytes = t.offset, t.bytes
            out[t.name] = raw[:, off : off + nbytes].view(dt).reshape((self.slots_per_rank,) + t.shape)
        return out

    def raw_weights(self, layer: int) -> np.ndarray:
        """The bytes of ``layer``'s local slots: uint8 ``[slots_per_rank, expert_bytes]``."""
        self._host_weights()
        return self._live[layer]

    @property
    def staging(self) -> np.ndarray:
        """The staging area: uint8 ``[slots_per_rank, expert_bytes]`` (the sidecar writes it)."""
        self._host_weights()
        return self._staging

    def _host_weights(self) -> None:
        if self._live is None:
            raise ContractError("this region's weights are on the engine's GPU (weights_kind 1): use the engine's tensors")

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
        MPI_Allreduce). It may be None only when ``world_size == 1``.
        """
        if not self._published:
            self.publish()
        if step != int(self._h[_W_ENGINE_STEP]):
            raise ContractError(f"at_step_boundary({step}) but engine_step is {int(self._h[_W_ENGINE_STEP])}")
        self._heartbeat()
        have, reject = self._pending_for(step)
        if agree is None:
            if self.world_size != 1:
                raise ContractError("agree is required with more than one engine rank")
            lo = hi = have
        else:
            lo, hi = agree(have)
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

    def record(self, step: int, counts: np.ndarray, phase: str = "decode", tokens: int = 0, moe_ns: int = 0) -> None:
        """Step ``step``'s per-slot counts ``[num_layers, slots_per_rank]`` into the load ring
        (seqlock), then ``engine_step = step + 1``. Call after the forward pass.

        ``moe_ns``: the wall time of the step's MoE layers on this rank, waits for the other
        ranks included (0: not measured). Without ``--step-ms`` the sidecar's cost model takes the
        balanced step time from it."""
        if step != int(self._h[_W_ENGINE_STEP]):
            raise ContractError(f"record({step}) but engine_step is {int(self._h[_W_ENGINE_STEP])}")
        q, i = self._h, step % self.ring_len
        w = self._ring_word + i * self._entry_words
        seq = q[w]
        q[w] = seq + 1  # odd: being written
        q[w + 1] = step
        q[w + 2] = PHASES[phase]
        q[w + 3] = tokens
        q[w + 4] = moe_ns
        np.copyto(self._ring_counts[i], counts, casting="unsafe")
        q[w] = seq + 2  # even: stable
        q[_W_ENGINE_STEP] = step + 1
        q[_W_ENGINE_HEARTBEAT] = time.monotonic_ns()

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
        L, S = self.num_layers, self.slots_per_rank
        return int(copy[2]), int(copy[3]), copy[8 : 8 + L * S].reshape(L, S)

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
        if self._closed:
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
        if self._closed:
            return
        self._h[_W_ENGINE_STATE] = ENGINE_FAILED
        self.close()

    def close(self) -> None:
        """Stops the heartbeat thread, unlinks the file (the creator only) and unmaps."""
        if self._closed:
            return
        self._closed = True
        _LIVE_REGIONS.discard(self)
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=1.0)
        if self._owner:
            for p in (self._tmp_path, self.path if self._published else None):
                if p:
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass
        self._h.release()
        self._mv.release()
        for attr in ("_h", "_mv", "_ring", "_ring_counts", "_phy2log", "_epoch", "_cmd_row", "_cmd_mask", "_live",
                     "_staging", "_ro_phy2log", "_ro_epoch"):
            setattr(self, attr, None)
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
        h = self._h
        if h is not None:
            h[_W_ENGINE_HEARTBEAT] = time.monotonic_ns()

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
        mask = self._cmd_mask.astype(bool)
        if self._gpu_apply is not None:
            self._gpu_apply(layer, np.flatnonzero(mask))  # returns once the device copy is done
        else:
            self._live[layer][mask] = self._staging[mask]
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


@dataclass
class _TensorEntry:
    name: str
    dtype: str
    offset: int
    bytes: int
    shape: Tuple[int, ...]


def _tensor_table(tensors: Sequence[TensorSpec]) -> Tuple[bytes, int]:
    out = bytearray()
    offset = 0
    for t in tensors:
        if t.dtype not in _ITEMSIZE:
            raise ContractError(f"tensor {t.name}: dtype {t.dtype!r} is not one of {sorted(_ITEMSIZE)}")
        shape = tuple(int(d) for d in t.shape)
        if len(shape) not in (1, 2) or min(shape) < 1:
            raise ContractError(f"tensor {t.name}: shape {shape}: 1 or 2 positive dims (flatten more)")
        name = t.name.encode()
        if not 0 < len(name) < 24:
            raise ContractError(f"tensor name {t.name!r}: 1 to 23 UTF-8 bytes")
        nbytes = _ITEMSIZE[t.dtype] * int(np.prod(shape))
        dims = shape + (0,) * (2 - len(shape))
        out += struct.pack("<24s8sQQII2I", name, t.dtype.encode(), offset, nbytes, len(shape), 0, *dims)
        offset = _round_up(offset + nbytes, 64)
    return bytes(out), offset


def _ipc_section(ipc: IpcWeights, num_layers: int, layer_bytes: int) -> bytes:
    """The IPC section (at IPC_OFFSET) for ``ipc``, checked like the sidecar checks it: every layer
    in exactly one live handle, one staging handle of one layer's slots."""
    bus = ipc.pci_bus_id.encode()
    if not 0 < len(bus) < 16 or any(c not in b"0123456789abcdefABCDEF:." for c in bus):
        raise ContractError(f"pci_bus_id {ipc.pci_bus_id!r} is not a PCI bus id like 0000:19:00.0")
    if len(ipc.uuid) != 16:
        raise ContractError("the GPU uuid must be 16 bytes")
    if not 1 <= len(ipc.handles) <= IPC_MAX_HANDLES:
        raise ContractError(f"{len(ipc.handles)} IPC handles: 1 to {IPC_MAX_HANDLES}")
    covered = np.zeros(num_layers, np.int64)
    staging = 0
    table = bytearray()
    for i, h in enumerate(ipc.handles):
        if len(h.handle) != 64:
            raise ContractError(f"IPC handle {i}: {len(h.handle)} bytes, want 64 (a legacy cudaIpcMemHandle_t)")
        if h.role == IPC_ROLE_LIVE:
            if h.nbytes <= 0 or h.nbytes % layer_bytes or h.first_layer + h.nbytes // layer_bytes > num_layers:
                raise ContractError(f"IPC handle {i}: {h.nbytes} bytes from layer {h.first_layer} are not whole layers "
                                    f"of {layer_bytes} bytes inside {num_layers} layers")
            covered[h.first_layer : h.first_layer + h.nbytes // layer_bytes] += 1
        elif h.role == IPC_ROLE_STAGING:
            if h.nbytes != layer_bytes:
                raise ContractError(f"IPC handle {i}: staging of {h.nbytes} bytes, want {layer_bytes}")
            staging += 1
        else:
            raise ContractError(f"IPC handle {i}: unknown role {h.role}")
        table += struct.pack("<64sIIQQ40x", h.handle, h.role, h.first_layer, h.offset, h.nbytes)
    if np.any(covered != 1) or staging != 1:
        raise ContractError("the IPC handles must hold every layer exactly once and one staging area")
    head = struct.pack("<16s16sI28x", bus, bytes(ipc.uuid), len(ipc.handles))
    return head + bytes(table)


def _read_tensor_table(mm: mmap.mmap, n: int) -> List[_TensorEntry]:
    out = []
    for i in range(n):
        name, dtype, offset, nbytes, ndim, _pad, d0, d1 = struct.unpack_from(
            "<24s8sQQII2I", mm, TENSOR_TABLE_OFFSET + i * TENSOR_ENTRY_BYTES)
        out.append(_TensorEntry(name.rstrip(b"\0").decode(), dtype.rstrip(b"\0").decode(), offset, nbytes,
                                (d0,) if ndim == 1 else (d0, d1)))
    return out


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def _check_existing(path: str) -> None:
    """A region left at ``path`` by a crashed engine is replaced; one whose engine lives, or a
    file that is not a region, is an error."""
    try:
        with open(path, "rb") as f:
            head = f.read(128)
    except FileNotFoundError:
        return
    if len(head) < 128 or struct.unpack_from("<Q", head, 0)[0] != MAGIC:
        raise ContractError(f"{path} exists and is not an eplb region: remove it or choose another name")
    pid = struct.unpack_from("<Q", head, 120)[0]
    if _pid_alive(pid):
        raise ContractError(f"{path} belongs to running engine pid {pid}: choose another name")
    log.warning("%s: replacing a region left by engine pid %d, which is gone", path, pid)


def cleanup(name: str) -> List[str]:
    """Removes the regions of ``name`` whose engine process is gone (crash leftovers); returns them."""
    removed = []
    for entry in os.listdir(SHM_DIR):
        if not (entry.startswith(f"eplb-{name}-") or entry.startswith(f".eplb-{name}-")):
            continue
        path = os.path.join(SHM_DIR, entry)
        try:
            with open(path, "rb") as f:
                head = f.read(128)
            pid = struct.unpack_from("<Q", head, 120)[0] if len(head) >= 128 else 0
        except OSError:
            continue
        if not _pid_alive(pid):
            os.unlink(path)
            removed.append(path)
    return removed

"""The cross-language golden test's Python side (issue 21): the golden scenario written by the
pure-Python client (or by the client on the compiled core), and Python's reader of a region,
which dumps every field of contract 2 as JSON.

The same scenario is written by ``tests/golden/region_golden.c`` (``raw``: the C structs and
constants of the generated header, every byte by hand; ``capi``: through libeplb_client's C API),
and every region is read by the C program (``dump``), by the worker's Rust reader
(``examples/region_golden.rs``) and by :func:`dump` here; ``test_golden.py`` compares them.

The scenario (keep it identical in the three writers):

* world_size 2, rank 1, 3 layers, 4 slots a rank, 6 logical experts, ring_len 16; the initial
  placement ``phy2log[l][p] = (p + l) % 6``; 20 steps (the ring wraps), each: a boundary (the
  harness agrees on ``(have, have)``, except at step 13: ``(0, have)``), then a record of
  :func:`counts` with phase ``PHASES[t % 3]``, :func:`tokens` and :func:`moe_ns`;
* the harness plays the sidecar: right after publish ``sidecar_pid = 4242``,
  ``sidecar_heartbeat_ns = 123456789``, ``sidecar_state = 1``; it posts commands (``post``)
  under ``cmd_seq`` before some boundaries, and stages bytes (host) before posting;
* ``host``: counts local; tensors ``w13_weight`` (bf16 [4, 2, 8] with 16 bytes of padding a row,
  per-expert), ``w2_weight`` (f8e4m3 [4, 24], per-expert), ``w13_input_scale`` (f32 [1],
  global); live bytes ``fill(l, t, r, i)``; commands: 1 (layer 1, step 5, applied), 2 (layer 0,
  step 9, epoch 2: rejected), 3 (layer 2, step 10, posted before boundary 11: missed), 4 (layer
  2, step 13: cancelled by the agreement), 5 (layer 0, step 22, posted after the last record:
  pending);
* ``ipc``: counts physical; the same tensors as CUDA IPC entries of fake allocations (one per
  layer, one for the staging); commands: 1 (layer 1, step 5, applied through the engine's
  apply), 2 (layer 2, step 10, posted before boundary 8, where the engine finds layer 2's
  ``w2_weight`` re-allocated: ``table_fault = 8``, then rejected at 10), 3 (layer 0, step 25,
  pending).

    python tests/golden_region.py write SCENARIO OUT [--backend python|native]
    python tests/golden_region.py dump PATH
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from eplb_client import EngineRegion, LayerTensor, cuda_ipc
from eplb_client import region as R

W, RANK, L, S, E, RING = 2, 1, 3, 4, 6, 16
P = W * S
STEPS = 20
PHASE_NAMES = ("prefill", "decode", "mixed")
SIDECAR_PID, SIDECAR_HB, SIDECAR_STATE = 4242, 123456789, 1
# Tensors: (name, dtype, kind, row shape in items, itemsize, padding bytes a row)
W13_ROW, W2_ROW, SCALE_ROW = 32, 24, 4
W13_STRIDE = 48
IPC_BASE, IPC_SEG, IPC_STAGE_BASE = 0x7F0000000000, 1 << 16, 0x7F1000000000
# The fake allocations' sizes: each ends right after its last tensor's last row (the C API's
# `bytes` of an IPC handle is that end, the Python client's the driver's size: equal here).
IPC_LAYER_BYTES, IPC_STAGE_BYTES = 1024 + 4, 256 + 4 * 24
# The UUID of the fake GPU: zeros, "not checked" (the C API writes zeros when EPLB_PCI_BUS_ID
# names the GPU instead of the driver).
PCI_BUS_ID, UUID = "0000:19:00.0", bytes(16)


def phy2log0() -> np.ndarray:
    return np.array([[(p + layer) % E for p in range(P)] for layer in range(L)], dtype=np.int32)


def count_cols(scenario: str) -> int:
    return S if scenario == "host" else P


def counts(scenario: str, t: int) -> np.ndarray:
    c = count_cols(scenario)
    out = np.array([[(t * 131 + layer * 17 + col * 3) % 97 for col in range(c)] for layer in range(L)], dtype=np.uint64)
    out[0, 0] = (1 << 40) - 1 - t  # the largest count the client accepts, less t
    return out


def tokens(t: int) -> int:
    return (1 << 63) + t if t % 2 else 100 + t


def moe_ns(t: int) -> int:
    return 0 if t % 4 == 0 else 1000 * t + 7


def fill(layer: int, t: int, r: int, i: int) -> int:
    """Byte ``i`` of row ``r`` of live tensor ``t`` of ``layer`` (host)."""
    return (layer * 37 + t * 11 + r * 5 + i * 3 + 1) % 256


def stage(t: int, s: int, i: int) -> int:
    """Byte ``i`` of staging row ``s`` of per-expert tensor ``t``, as the harness stages it."""
    return (200 + t * 13 + s * 7 + i) % 256


def ipc_handle(base: int) -> bytes:
    """The fake ``cudaIpcMemHandle_t`` of the allocation at ``base``."""
    return struct.pack("<Q", base) + bytes((base >> 16) % 7 + k for k in range(56))


# Commands: (post before boundary, id, layer, apply_step, epoch, new local slots, copy_mask).
# ``None`` as "before boundary": posted after the last record. The row is phy2log[layer] of the
# moment with the local slots (rank 1: physical 4..7) replaced.
COMMANDS: Dict[str, List[Tuple[Optional[int], int, int, int, int, Tuple[int, ...], Tuple[int, ...]]]] = {
    "host": [
        (5, 1, 1, 5, 1, (5, 1, 0, 2), (0, 1, 1, 1)),
        (9, 2, 0, 9, 2, (4, 5, 0, 1), (1, 1, 1, 1)),
        (11, 3, 2, 10, 1, (1, 0, 2, 3), (1, 1, 0, 0)),
        (13, 4, 2, 13, 1, (1, 0, 2, 3), (1, 1, 0, 0)),
        (None, 5, 0, 22, 1, (5, 4, 1, 0), (1, 1, 1, 1)),
    ],
    "ipc": [
        (5, 1, 1, 5, 1, (5, 1, 0, 2), (0, 1, 1, 1)),
        (8, 2, 2, 10, 1, (1, 0, 2, 3), (1, 1, 0, 0)),
        (None, 3, 0, 25, 1, (5, 4, 1, 0), (1, 1, 1, 1)),
    ],
}
# Where the ipc scenario's engine finds a re-allocated tensor: (boundary, layer, tensor).
IPC_FAULT = (8, 2, 1)


def agree_at(t: int) -> Callable[[int], Tuple[int, int]]:
    return (lambda have: (0, have)) if t == 13 else (lambda have: (have, have))


# ---- the Python writer ------------------------------------------------------------------------


class _Dtype:
    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return f"torch.{self.name}"


class FakeCudaTensor:
    """What the client reads of a CUDA tensor (shape, stride(), element_size(), dtype, is_cuda,
    device, data_ptr()); ``ptr`` may be moved, as a re-allocation would."""

    def __init__(self, ptr: int, shape: Tuple[int, ...], itemsize: int, dtype: str, stride: Tuple[int, ...]):
        self.ptr, self.shape, self.itemsize, self.dtype = ptr, shape, itemsize, _Dtype(dtype)
        self._stride = stride
        self.is_cuda, self.device = True, "cuda:0"

    def data_ptr(self) -> int:
        return self.ptr

    def element_size(self) -> int:
        return self.itemsize

    def stride(self) -> Tuple[int, ...]:
        return self._stride

    def dim(self) -> int:
        return len(self.shape)


def _host_layers() -> List[List[LayerTensor]]:
    layers = []
    for layer in range(L):
        w13 = np.zeros((S, W13_STRIDE // 2), np.uint16)[:, :16].reshape(S, 2, 8)  # bf16 bits, padded rows
        w2 = np.zeros((S, W2_ROW), np.uint8)
        sc = np.zeros((1,), np.float32)
        arrays: Tuple[np.ndarray, ...] = (w13, w2, sc)
        for t, arr in enumerate(arrays):
            raw = arr.view(np.uint8).reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.view(np.uint8).reshape(1, -1)
            for r in range(raw.shape[0]):
                raw[r] = [fill(layer, t, r, i) for i in range(raw.shape[1])]
        assert w13.strides[0] == W13_STRIDE
        layers.append([LayerTensor("w13_weight", w13), LayerTensor("w2_weight", w2, dtype="f8e4m3"),
                       LayerTensor("w13_input_scale", sc, kind="global")])
    return layers


def _ipc_tensors() -> Tuple[List[List[LayerTensor]], List[LayerTensor], List[FakeCudaTensor]]:
    layers, flat = [], []
    for layer in range(L):
        base = IPC_BASE + layer * IPC_SEG
        w13 = FakeCudaTensor(base, (S, 2, 8), 2, "bfloat16", (W13_STRIDE // 2, 8, 1))
        w2 = FakeCudaTensor(base + 512, (S, W2_ROW), 1, "float8_e4m3fn", (W2_ROW, 1))
        sc = FakeCudaTensor(base + 1024, (1,), 4, "float32", (1,))
        flat += [w13, w2, sc]
        layers.append([LayerTensor("w13_weight", w13), LayerTensor("w2_weight", w2),
                       LayerTensor("w13_input_scale", sc, kind="global")])
    staging = [LayerTensor("w13_weight", FakeCudaTensor(IPC_STAGE_BASE, (S, 2, 8), 2, "bfloat16", (16, 8, 1))),
               LayerTensor("w2_weight", FakeCudaTensor(IPC_STAGE_BASE + 256, (S, W2_ROW), 1, "float8_e4m3fn",
                                                        (W2_ROW, 1)))]
    return layers, staging, flat


def _fake_driver() -> None:
    """The driver calls of cuda_ipc, answered for the fake allocations (no GPU here)."""

    def address_range(ptr: int) -> Tuple[int, int]:
        for base, size in [(IPC_BASE + k * IPC_SEG, IPC_LAYER_BYTES) for k in range(L)] + [
                (IPC_STAGE_BASE, IPC_STAGE_BYTES)]:
            if base <= ptr < base + size:
                return base, size
        raise R.ContractError(f"no fake allocation holds {ptr:#x}")

    fakes: Dict[str, Any] = {"address_range": address_range, "ipc_handle": ipc_handle,
                             "ipc_capable": lambda ptr: True, "device_ids": lambda ptr=None: (PCI_BUS_ID, UUID)}
    for attr, fake in fakes.items():
        setattr(cuda_ipc, attr, fake)
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    os.environ.pop("PYTORCH_ALLOC_CONF", None)
    os.environ["EPLB_PCI_BUS_ID"] = PCI_BUS_ID  # the C API's GPU, without a driver


def post(region: EngineRegion, cmd: Tuple[Optional[int], int, int, int, int, Tuple[int, ...], Tuple[int, ...]]) -> None:
    """The harness as the sidecar: one command under ``cmd_seq`` (staging first, host only)."""
    _, cmd_id, layer, apply_step, epoch, local, mask = cmd
    if region.weights_kind == R.WEIGHTS_HOST:
        for t, name in enumerate(region.tensor_names):
            if region.table[t].kind != R.KIND_EXPERT:
                continue
            rows = region.rows(L, name)
            for s in range(S):
                if mask[s]:
                    rows[s] = [stage(t, s, i) for i in range(rows.shape[1])]
    row = region.placement().phy2log[layer].copy()
    row[RANK * S : (RANK + 1) * S] = local
    h = region._h
    seq = int(h[R._W_CMD_SEQ])
    h[R._W_CMD_SEQ] = seq + 1
    h[R._W_CMD_ID], h[R._W_CMD_LAYER], h[R._W_CMD_APPLY_STEP], h[R._W_CMD_EPOCH] = cmd_id, layer, apply_step, epoch
    region._cmd_row[:] = row
    region._cmd_mask[:] = mask
    h[R._W_CMD_SEQ] = seq + 2


def write(scenario: str, out: str, backend: str = "python") -> None:
    """Runs the scenario with the Python client (``backend``) and copies the region to ``out``."""
    name = f"golden{os.getpid()}{scenario}"
    applied: List[Tuple[int, List[int]]] = []
    flat: List[FakeCudaTensor] = []
    kw: Dict[str, Any] = {"backend": backend} if _has_backend() else {}
    if not kw and backend != "python":
        raise SystemExit(f"backend {backend!r}: this client has only the pure-Python writer")
    if scenario == "host":
        region = EngineRegion.create(name, RANK, W, L, S, E, _host_layers(), phy2log0(), ring_len=RING,
                                     counts="local", **kw)
    elif scenario == "ipc":
        _fake_driver()
        layers, staging, flat = _ipc_tensors()
        region = EngineRegion.create(name, RANK, W, L, S, E, layers, phy2log0(), ring_len=RING, counts="physical",
                                     staging=staging, apply=lambda layer, slots: applied.append((layer, list(slots))),
                                     **kw)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}: host or ipc")
    try:
        region.publish()
        h = region._h
        h[R._W_SIDECAR_PID], h[R._W_SIDECAR_HEARTBEAT], h[R._W_SIDECAR_STATE] = SIDECAR_PID, SIDECAR_HB, SIDECAR_STATE
        cmds = COMMANDS[scenario]
        for t in range(STEPS):
            for c in cmds:
                if c[0] == t:
                    post(region, c)
            if scenario == "ipc" and t == IPC_FAULT[0]:
                flat[IPC_FAULT[1] * 3 + IPC_FAULT[2]].ptr += 1  # re-allocated: the engine finds it now
            region.at_step_boundary(t, agree_at(t))
            region.record(t, counts(scenario, t), phase=PHASE_NAMES[t % 3], tokens=tokens(t), moe_ns=moe_ns(t))
        for c in cmds:
            if c[0] is None:
                post(region, c)
        if scenario == "ipc":
            assert applied == [(1, [1, 2, 3])], applied
        shutil.copyfile(region.path, out)
        os.chmod(out, 0o600)
    finally:
        region.fail()


def _has_backend() -> bool:
    """Whether this client takes ``backend=`` (the compiled core, issue 21)."""
    import inspect

    return "backend" in inspect.signature(EngineRegion.create).parameters


# ---- Python's reader --------------------------------------------------------------------------

_HEADER_NAMES = ("magic", "version", "header_bytes", "num_layers", "slots_per_rank", "num_logical", "world_size",
                 "rank", "ring_len", "expert_bytes", "num_tensors", "weights_kind", "total_bytes", "ring_offset",
                 "ring_entry_bytes", "placement_offset", "epochs_offset", "command_offset", "table_offset",
                 "ipc_offset", "engine_pid")


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _nonzero(buf: Any, lo: int, hi: int) -> int:
    return int(np.count_nonzero(np.frombuffer(buf, np.uint8, count=hi - lo, offset=lo))) if hi > lo else 0


def dump(path: str) -> Dict[str, Any]:
    """Every field of contract 2 in the region file at ``path``, as Python's client reads it."""
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    region = EngineRegion(mm, path, None, owner=False)
    try:
        return _dump(region, mm)
    finally:
        region.close()


def _dump(r: EngineRegion, mm: mmap.mmap) -> Dict[str, Any]:
    h = r._h
    fixed = dict(zip(_HEADER_NAMES, struct.unpack_from(R._HEADER_FMT, mm, 0)))
    minor, counts_kind, num_handles, reserved0 = struct.unpack_from("<IIII", mm, 176)
    header = dict(fixed)
    header.update({
        "engine_step": r.engine_step, "engine_heartbeat_ns": int(h[R._W_ENGINE_HEARTBEAT]),
        "engine_state": r.engine_state, "sidecar_pid": r.sidecar_pid, "sidecar_heartbeat_ns": r.sidecar_heartbeat_ns,
        "sidecar_state": r.sidecar_state, "minor_version": minor, "counts_kind": counts_kind,
        "num_handles": num_handles, "reserved0": reserved0, "table_fault": r.table_fault,
    })
    # What the reader derived from the header agrees with it.
    assert (r.num_layers, r.slots_per_rank, r.num_logical, r.world_size, r.rank, r.ring_len) == tuple(
        fixed[k] for k in ("num_layers", "slots_per_rank", "num_logical", "world_size", "rank", "ring_len"))
    assert (r.counts_kind, r.num_handles, r.num_tensors, r.expert_bytes) == (
        counts_kind, num_handles, fixed["num_tensors"], fixed["expert_bytes"])
    mailbox = {
        "cmd_seq": int(h[R._W_CMD_SEQ]), "cmd_id": int(h[R._W_CMD_ID]), "cmd_layer": int(h[R._W_CMD_LAYER]),
        "cmd_apply_step": int(h[R._W_CMD_APPLY_STEP]), "cmd_epoch": int(h[R._W_CMD_EPOCH]),
        "ack_id": int(h[R._W_ACK_ID]), "ack_result": int(h[R._W_ACK_RESULT]), "ack_step": int(h[R._W_ACK_STEP]),
        "new_row": [int(x) for x in r._cmd_row], "copy_mask": [int(x) for x in r._cmd_mask],
    }
    table = []
    nonzero = 0
    for i, e in enumerate(r.table):
        at = fixed["table_offset"] + i * R.TENSOR_ENTRY_BYTES
        raw = struct.unpack_from(R._ENTRY_FMT, mm, at)
        entry: Dict[str, Any] = {
            "layer": e.layer, "index": e.index, "name": e.name, "dtype": e.dtype, "offset": e.offset,
            "row_stride": e.row_stride, "row_bytes": e.row_bytes, "rows": e.rows, "kind": e.kind,
            "reserved": raw[7], "handle": e.handle,
        }
        if r.weights_kind == R.WEIGHTS_HOST:
            data = b"".join(r._rows[e.layer][e.index][k].tobytes() for k in range(e.rows)) if e.rows else b""  # type: ignore[index]
            entry["rows_fnv1a64"] = fnv1a64(data)
        table.append(entry)
        nonzero += _nonzero(mm, at + 24 + len(e.dtype), at + 32) + _nonzero(mm, at + len(e.name.encode()), at + 24)
    ipc: Optional[Dict[str, Any]] = None
    if r.weights_kind == R.WEIGHTS_CUDA_IPC:
        io = fixed["ipc_offset"]
        bus, uuid = struct.unpack_from("<16s16s", mm, io)
        handles = []
        for k in range(num_handles):
            hb, nbytes = struct.unpack_from("<64sQ", mm, io + R.IPC_HEAD_BYTES + R.IPC_ENTRY_BYTES * k)
            handles.append({"handle": hb.hex(), "bytes": nbytes})
            at = io + R.IPC_HEAD_BYTES + R.IPC_ENTRY_BYTES * k
            nonzero += _nonzero(mm, at + 72, at + R.IPC_ENTRY_BYTES)
        ipc = {"pci_bus_id": bus.rstrip(b"\0").decode(), "uuid": uuid.hex(), "handles": handles}
        nonzero += _nonzero(mm, io + 32, io + 64) + _nonzero(mm, io + len(bus.rstrip(b"\0")), io + 16)
    ring = []
    C = r.count_cols
    for i in range(r.ring_len):
        w = r._ring[i]
        ring.append({"index": i, "seq": int(w[0]), "step": int(w[1]), "phase": int(w[2]), "tokens": int(w[3]),
                     "moe_ns": int(w[4]), "counts": w[8 : 8 + L * C].reshape(r.num_layers, C).tolist()})
        nonzero += _nonzero(mm, fixed["ring_offset"] + i * r.ring_entry_bytes + 40,
                            fixed["ring_offset"] + i * r.ring_entry_bytes + 64)
    steps = []
    for t in range(max(0, r.engine_step - r.ring_len), r.engine_step):
        got = r.read_step(t)
        assert got is not None, t
        steps.append({"step": t, "phase": got[0], "tokens": got[1], "counts": got[2].tolist()})
    nonzero += _nonzero(mm, 200, 256) + _nonzero(mm, 296, 320) + _nonzero(mm, 344, R.HEADER_BYTES)
    placement = r.placement()
    return {
        "header": header, "mailbox": mailbox, "table": table, "ipc": ipc,
        "placement": placement.phy2log.tolist(), "epochs": [int(x) for x in placement.epoch],
        "ring": ring, "steps": steps, "reserved_nonzero_bytes": nonzero,
    }


def main(argv: List[str]) -> int:
    if len(argv) >= 3 and argv[0] == "write":
        backend = argv[4] if len(argv) >= 5 and argv[3] == "--backend" else "python"
        write(argv[1], argv[2], backend)
        return 0
    if len(argv) == 2 and argv[0] == "dump":
        print(json.dumps(dump(argv[1]), sort_keys=True))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The client's GPU-weights region (weights_kind 1) without a GPU: the IPC section's bytes, the
apply callback at the boundary, and the refusals (expandable segments, bad handle tables)."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from eplb_client import (
    ACK_APPLIED,
    ContractError,
    EngineRegion,
    IpcHandle,
    IpcWeights,
    TensorSpec,
    cuda_ipc,
    region_path,
)
from eplb_client import region as R

L, S, E, W = 3, 4, 6, 2
TENSORS = [TensorSpec("w13", "bf16", (8, 16)), TensorSpec("w2", "bf16", (16, 4))]
EB = 256 + 128  # expert bytes


@pytest.fixture
def name(request):
    n = f"pytest{os.getpid()}-ipc-{request.node.name[:16]}"
    yield n
    for f in [f for f in os.listdir(R.SHM_DIR) if f"eplb-{n}-" in f]:
        os.unlink(os.path.join(R.SHM_DIR, f))


def ipc(live_first=0, live_layers=L, staging_bytes=S * EB):
    return IpcWeights("0000:19:00.0", bytes(range(16)), [
        IpcHandle(b"\x01" * 64, R.IPC_ROLE_LIVE, live_first, 4096, live_layers * S * EB),
        IpcHandle(b"\x02" * 64, R.IPC_ROLE_STAGING, 0, 0, staging_bytes)])


def trivial():
    return np.tile(np.arange(W * S, dtype=np.int32) % E, (L, 1))


def test_the_ipc_section_is_what_the_contract_says(name):
    applied = []
    reg = EngineRegion.create(name, 0, W, L, S, E, TENSORS, trivial(), ring_len=16, ipc=ipc(),
                              apply=lambda layer, slots: applied.append((layer, list(slots))))
    reg.publish()
    with open(region_path(name, 0), "rb") as f:
        head = f.read(4096)
    expert_bytes, _, kind, total = struct.unpack_from("<QIIQ", head, 40)
    weights_offset, staging_offset = struct.unpack_from("<QQ", head, 104)
    assert (expert_bytes, kind, weights_offset, staging_offset) == (EB, 1, 0, 0)
    assert total == os.path.getsize(region_path(name, 0)), "the region ends before any weights"
    assert struct.unpack_from("<I", head, 176)[0] == R.MINOR_VERSION == 2
    bus, uuid, n = struct.unpack_from("<16s16sI", head, 2048)
    assert bus.rstrip(b"\0") == b"0000:19:00.0" and uuid == bytes(range(16)) and n == 2
    h, role, first, off, nbytes = struct.unpack_from("<64sIIQQ", head, 2112)
    assert (h, role, first, off, nbytes) == (b"\x01" * 64, 1, 0, 4096, L * S * EB)
    h, role, first, off, nbytes = struct.unpack_from("<64sIIQQ", head, 2112 + 128)
    assert (h, role, off, nbytes) == (b"\x02" * 64, 2, 0, S * EB)
    with pytest.raises(ContractError, match="on the engine's GPU"):
        reg.weights(0)
    # A command applies through the engine's callback, with the slots of the copy mask.
    row = reg.placement().phy2log[1].copy()
    row[0], row[1] = row[1], row[0]
    h = reg._h
    h[R._W_CMD_SEQ] = 1
    h[R._W_CMD_ID], h[R._W_CMD_LAYER], h[R._W_CMD_APPLY_STEP], h[R._W_CMD_EPOCH] = 1, 1, 0, 1
    reg._cmd_row[:] = row
    reg._cmd_mask[:] = [1, 1, 0, 0]
    h[R._W_CMD_SEQ] = 2
    p = reg.at_step_boundary(0, lambda have: (have, have))
    assert p.applied == [1] and applied == [(1, [0, 1])]
    assert (int(h[R._W_ACK_ID]), int(h[R._W_ACK_RESULT])) == (1, ACK_APPLIED)
    assert np.array_equal(p.phy2log[1], row)
    reg.finish(wait_detach_s=0.1)
    assert not os.path.exists(region_path(name, 0))


@pytest.mark.parametrize("bad,match", [
    (dict(live_layers=2), "every layer exactly once"),
    (dict(live_first=1), "not whole layers"),
    (dict(staging_bytes=EB), "staging of"),
])
def test_bad_handle_tables_are_refused(name, bad, match):
    with pytest.raises(ContractError, match=match):
        EngineRegion.create(name, 0, W, L, S, E, TENSORS, trivial(), ring_len=16, ipc=ipc(**bad), apply=lambda *a: None)
    with pytest.raises(ContractError, match="both ipc"):
        EngineRegion.create(name, 0, W, L, S, E, TENSORS, trivial(), ring_len=16, ipc=ipc())
    assert not os.path.exists(region_path(name, 0))


def test_expandable_segments_are_refused(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64, expandable_segments:True")
    with pytest.raises(ContractError, match="expandable segments"):
        cuda_ipc.check_alloc_conf()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    cuda_ipc.check_alloc_conf()

"""The client with real torch tensors: host weights handed over as CPU torch tensors (bf16, fp8,
strided, 0-d), the default GPU apply (cuda_ipc.torch_apply), and, on a CUDA machine, a region of
CUDA tensors whose IPC handles a second process opens to read every listed row and write the
staging rows (what a sidecar does), then an apply, and a re-allocated parameter.

Skipped, with the reason shown, where torch (or a GPU) is missing: run on the GPU machine with
``python -m pytest -q -rs tests/test_torch_client.py``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed here: these run on the GPU machine")

from eplb_client import (  # noqa: E402
    ACK_APPLIED,
    ACK_REJECTED,
    EngineRegion,
    LayerTensor,
    cuda_ipc,
)
from eplb_client import region as R  # noqa: E402

L, S, E, W = 3, 4, 6, 2
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU weights need one")
RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture
def name(request):
    n = f"pytest{os.getpid()}-torch-{request.node.name[:14]}"
    yield n
    for f in [f for f in os.listdir(R.SHM_DIR) if f"eplb-{n}-" in f]:
        os.unlink(os.path.join(R.SHM_DIR, f))


def trivial():
    return np.tile(np.arange(W * S, dtype=np.int32) % E, (L, 1))


def row_bytes(t, r=None):
    """The bytes of row r of t (or of a 0-d t), as the contract counts them."""
    x = t.detach().reshape(1) if t.dim() == 0 else t.detach()[r : r + 1]
    return x.contiguous().view(torch.uint8).cpu().numpy().tobytes()


def padded(shape, extra_rows, pad, dtype, device):
    """A ``[shape[0] + extra_rows, *shape[1:]]`` tensor whose rows lie 16 elements apart beyond
    the row (row stride > row bytes; shared rows after the routed ones); its padding holds the
    byte ``pad``. Returns (tensor, the flat allocation under it)."""
    inner = int(np.prod(shape[1:]))
    n = shape[0] + extra_rows
    base = torch.empty((n * (inner + 16),), dtype=dtype, device=device)
    base.view(torch.uint8).fill_(pad)
    inner_strides = tuple(int(np.prod(shape[i + 1 :])) for i in range(1, len(shape)))
    t = torch.as_strided(base, (n,) + tuple(shape[1:]), (inner + 16,) + inner_strides)
    t.copy_(torch.randint(1, 100, t.shape, device=device).to(dtype))
    return t, base


def layer_tensors(layer, device):
    g = torch.Generator().manual_seed(layer)
    w13, _ = padded((S, 4, 8), 1, 0x77, torch.bfloat16, device)
    tensors = [
        LayerTensor("w13_weight", w13, rows=S),
        LayerTensor("w2_weight", torch.randint(0, 255, (S, 8, 4), generator=g, dtype=torch.uint8).to(device)
                    .view(torch.float8_e4m3fn)),
        LayerTensor("w13_weight_scale_inv", torch.rand((S, 2, 3), generator=g).to(device)),
        LayerTensor("w13_input_scale", torch.rand((E, 2), generator=g).to(device), kind="global"),
        LayerTensor("w2_input_scale", torch.tensor(0.5 + layer, device=device), kind="global"),
    ]
    return tensors


def test_host_torch_tensors_are_copied_byte_for_byte(name):
    handed = [layer_tensors(layer, "cpu") for layer in range(L)]
    reg = EngineRegion.create(name, 0, W, L, S, E, handed, trivial(), ring_len=16)
    assert [e.dtype for e in reg.table[:5]] == ["bf16", "f8e4m3", "f32", "f32", "f32"]
    for layer in range(L):
        for t in handed[layer]:
            view = reg.tensor(layer, t.name)
            assert view.shape == tuple(t.data.shape), t.name
            want = t.data.detach().view(RAW[t.data.element_size()]).numpy()
            assert np.array_equal(view.view(want.dtype), want), (layer, t.name)
    w13 = reg.tensor(1, "w13_weight")
    assert w13.strides[0] == handed[1][0].data.stride(0) * 2 and w13.shape[0] == S + 1
    reg.close()


def test_torch_apply_copies_routed_rows_only():
    padded_layers = [padded((S, 4, 8), 1, 0x77, torch.bfloat16, "cpu") for _ in range(2)]
    live = [[w13, torch.zeros((S, 3), dtype=torch.float32)] for w13, _ in padded_layers]
    staging = [torch.full((S, 4, 8), 3.0, dtype=torch.bfloat16), torch.full((S, 3), 5.0)]
    before = [[t.clone() for t in row] for row in live]
    apply = cuda_ipc.torch_apply(live, staging, [0, 1])
    apply(1, np.array([0, 2]))
    assert torch.equal(live[0][0], before[0][0]) and torch.equal(live[0][1], before[0][1]), "another layer moved"
    for s in range(S + 1):
        moved = s in (0, 2)
        assert torch.equal(live[1][0][s], staging[0][s] if moved else before[1][0][s]), s
        if s < S:
            assert torch.equal(live[1][1][s], staging[1][s] if moved else before[1][1][s]), s
    pad = padded_layers[1][1].view(torch.uint8).view(S + 1, 2 * (32 + 16))[:, 64:]
    assert bool((pad == 0x77).all()), "the padding between rows was written"


CHILD = r"""
import ctypes, hashlib, json, struct, sys
sys.path.insert(0, {root!r})
from eplb_client import EngineRegion
reg = EngineRegion.attach({name!r}, 0)
mm = reg._mm
ipc = struct.unpack_from("<Q", mm, 112)[0]
cu = ctypes.CDLL("libcuda.so.1")
def check(rc, what):
    if rc:
        raise SystemExit(f"{{what}}: CUDA error {{rc}}")
check(cu.cuInit(0), "cuInit")
dev = ctypes.c_int()
check(cu.cuDeviceGetByPCIBusId(ctypes.byref(dev), bytes(mm[ipc : ipc + 16]).rstrip(b"\0")), "cuDeviceGetByPCIBusId")
ctx = ctypes.c_void_p()
check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
class Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]
open_ = getattr(cu, "cuIpcOpenMemHandle_v2", None) or cu.cuIpcOpenMemHandle
ptrs = []
for i in range(reg.num_handles):
    h = Handle()
    ctypes.memmove(ctypes.addressof(h), bytes(mm[ipc + 64 + 128 * i : ipc + 128 + 128 * i]), 64)
    p = ctypes.c_uint64()
    check(open_(ctypes.byref(p), h, ctypes.c_uint(1)), f"cuIpcOpenMemHandle {{i}}")
    ptrs.append(p.value)
out = {{}}
for e in reg.table:
    rows = []
    for r in range(e.rows):
        buf = ctypes.create_string_buffer(e.row_bytes)
        check(cu.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(ptrs[e.handle] + e.offset + r * e.row_stride),
                                 ctypes.c_size_t(e.row_bytes)), "cuMemcpyDtoH")
        rows.append(hashlib.sha1(buf.raw).hexdigest())
    out[f"{{e.layer}}/{{e.name}}"] = rows
for e in reg.table:  # stage: slot s of every per-expert staging tensor = bytes 0x40 + s
    if e.layer == reg.num_layers and e.rows:
        for s in range(e.rows):
            data = bytes([0x40 + s]) * e.row_bytes
            check(cu.cuMemcpyHtoD_v2(ctypes.c_uint64(ptrs[e.handle] + e.offset + s * e.row_stride), data,
                                     ctypes.c_size_t(e.row_bytes)), "cuMemcpyHtoD")
check(cu.cuCtxSynchronize(), "cuCtxSynchronize")
for p in ptrs:
    check(cu.cuIpcCloseMemHandle(ctypes.c_uint64(p)), "cuIpcCloseMemHandle")
print(json.dumps({{"rows": out, "handles": reg.num_handles}}))
"""


def post(reg, cmd_id, layer, apply_step, mask):
    row = reg.placement().phy2log[layer].copy()
    row[0], row[2] = row[2], row[0]
    h = reg._h
    seq = int(h[R._W_CMD_SEQ])
    h[R._W_CMD_SEQ] = seq + 1
    h[R._W_CMD_ID], h[R._W_CMD_LAYER], h[R._W_CMD_APPLY_STEP] = cmd_id, layer, apply_step
    h[R._W_CMD_EPOCH] = int(reg.placement().epoch[layer]) + 1
    reg._cmd_row[:] = row
    reg._cmd_mask[:] = mask
    h[R._W_CMD_SEQ] = seq + 2


@needs_cuda
def test_cuda_tensors_a_second_process_reads_and_stages_through_the_handles(name):
    dev = "cuda"
    handed = [layer_tensors(layer, dev) for layer in range(L)]
    # Three layers' scales as views of one allocation: one handle for the three.
    block = torch.rand((L, S, 2, 3), device=dev)
    for layer in range(L):
        handed[layer][2] = LayerTensor("w13_weight_scale_inv", block[layer])
    staging = [LayerTensor("w13_weight", torch.zeros((S, 4, 8), dtype=torch.bfloat16, device=dev)),
               LayerTensor("w2_weight", torch.zeros((S, 8, 4), dtype=torch.uint8, device=dev).view(torch.float8_e4m3fn)),
               LayerTensor("w13_weight_scale_inv", torch.zeros((S, 2, 3), device=dev))]
    torch.cuda.synchronize()
    reg = EngineRegion.create(name, 0, W, L, S, E, handed, trivial(), ring_len=16, staging=staging)
    reg.publish()
    distinct = {cuda_ipc.address_range(t.data.data_ptr())[0] for row in handed for t in row} | \
        {cuda_ipc.address_range(t.data.data_ptr())[0] for t in staging}
    assert reg.num_handles == len(distinct)
    before = {(layer, t.name): t.data.view(RAW[t.data.element_size()]).clone() for layer in range(L) for t in handed[layer]}
    p = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, name=name)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stdout)["rows"]
    for layer in range(L):
        for t in handed[layer]:
            n = t.data.shape[0] if t.data.dim() and t.kind == "global" else (S if t.data.dim() else 1)
            want = [hashlib.sha1(row_bytes(t.data, r)).hexdigest() for r in range(n)]
            assert seen[f"{layer}/{t.name}"] == want, (layer, t.name)
    # The sidecar staged slot s = 0x40 + s; apply slots 0 and 2 of layer 1 with the default apply.
    post(reg, 1, 1, 0, [1, 0, 1, 0])
    placement = reg.at_step_boundary(0, lambda have: (have, have))
    assert placement.applied == [1] and int(reg._h[R._W_ACK_RESULT]) == ACK_APPLIED
    for layer in range(L):
        for t in handed[layer]:
            now, old = t.data, before[(layer, t.name)]
            if layer != 1 or t.kind == "global":
                assert torch.equal(now.view(RAW[now.element_size()]), old), t.name
                continue
            for r in range(now.shape[0]):
                if r in (0, 2):
                    assert row_bytes(now, r) == bytes([0x40 + r]) * len(row_bytes(now, r)), (t.name, r)
                else:
                    assert row_bytes(now, r) == row_bytes(old, r), (t.name, r, "moved")
    reg.finish(wait_detach_s=1.0)


@needs_cuda
@pytest.mark.parametrize("stepping", ["boundary", "step_end"])
def test_a_replaced_parameter_sets_table_fault(name, stepping):
    # step_end: the compiled step hands a boundary with a command posted to the Python one, which
    # checks the addresses before the command can be applied.
    handed = [layer_tensors(layer, "cuda") for layer in range(L)]
    params = [[torch.nn.Parameter(t.data, requires_grad=False) if t.data.dim() else t.data for t in row] for row in handed]
    layers = [[LayerTensor(t.name, p, t.kind, t.rows) for t, p in zip(row, prow)] for row, prow in zip(handed, params)]
    staging = [LayerTensor("w13_weight", torch.zeros((S, 4, 8), dtype=torch.bfloat16, device="cuda")),
               LayerTensor("w2_weight", torch.zeros((S, 8, 4), dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)),
               LayerTensor("w13_weight_scale_inv", torch.zeros((S, 2, 3), device="cuda"))]
    reg = EngineRegion.create(name, 0, W, L, S, E, layers, trivial(), ring_len=16, staging=staging)
    reg.publish()
    agree = lambda have: (have, have)  # noqa: E731
    counts = np.zeros((L, S), np.int64)
    end = reg.step_end(counts, agree)
    if stepping == "step_end":
        reg.at_step_boundary(0, agree)
        post(reg, 1, 1, 1, [1, 0, 1, 0])
        assert end(0) == 1, "applied through the compiled step's hand-over"
        assert int(reg._h[R._W_ACK_RESULT]) == ACK_APPLIED
    params[2][2].data = params[2][2].data.clone()  # what process_weights_after_loading may do
    if stepping == "boundary":
        post(reg, 1, 0, 0, [1, 0, 1, 0])
        reg.at_step_boundary(0, agree)
    else:
        post(reg, 2, 0, 2, [1, 0, 1, 0])
        assert end(1) == -1
    assert reg.table_fault == 2 * 5 + 2 + 1
    assert int(reg._h[R._W_ACK_RESULT]) == ACK_REJECTED
    reg.finish()

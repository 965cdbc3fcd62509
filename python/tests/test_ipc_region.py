"""The client's GPU-weights region (weights_kind 1) without a GPU: fake CUDA tensors (duck-typed
like torch's) in a fake driver's allocations. The IPC section's bytes, one handle per distinct
allocation, the table's handles and offsets, the apply callback, the data_ptr check that sets
table_fault, and the refusals (expandable segments, VMM memory, tensors outside an allocation,
overlaps, staging that does not match)."""

from __future__ import annotations

import ctypes
import logging
import os
import struct

import numpy as np
import pytest

from eplb_client import ACK_APPLIED, ACK_REJECTED, ContractError, EngineRegion, LayerTensor, cuda_ipc, region_path
from eplb_client import region as R

L, S, E, W = 3, 4, 6, 2


class FakeDtype:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return f"torch.{self.name}"


class FakeCudaTensor:
    """What the client reads of a CUDA torch tensor: shape, stride() in elements, element_size(),
    dtype, is_cuda, device and data_ptr() (which a test may move, as a re-allocation would)."""

    def __init__(self, ptr, shape, itemsize=2, dtype="bfloat16", stride=None, device="cuda:0"):
        self.ptr, self.shape, self.itemsize, self.dtype = ptr, tuple(shape), itemsize, FakeDtype(dtype)
        inner = []
        acc = 1
        for n in reversed(self.shape):
            inner.append(acc)
            acc *= n
        self._stride = tuple(stride) if stride is not None else tuple(reversed(inner))
        self.is_cuda, self.device = True, device

    def data_ptr(self):
        return self.ptr

    def element_size(self):
        return self.itemsize

    def stride(self):
        return self._stride

    def dim(self):
        return len(self.shape)


class FakeAllocator:
    """Allocations (base -> size) standing in for the caching allocator's segments."""

    def __init__(self):
        self.segments = {}
        self.next = 0x7F0000000000
        self.vmm = set()

    def segment(self, size):
        base = self.next
        self.segments[base] = size
        self.next += size + (1 << 20)
        return base

    def address_range(self, ptr):
        for base, size in self.segments.items():
            if base <= ptr < base + size:
                return base, size
        raise ContractError(f"cuMemGetAddressRange({ptr:#x}) failed: CUDA error 1 (CUDA_ERROR_INVALID_VALUE)")

    def handle(self, base):
        return struct.pack("<Q", base) + bytes(56)


@pytest.fixture
def gpu(monkeypatch):
    alloc = FakeAllocator()
    monkeypatch.setattr(cuda_ipc, "address_range", alloc.address_range)
    monkeypatch.setattr(cuda_ipc, "ipc_handle", alloc.handle)
    monkeypatch.setattr(cuda_ipc, "ipc_capable", lambda ptr: ptr not in alloc.vmm)
    monkeypatch.setattr(cuda_ipc, "device_ids", lambda ptr=None: ("0000:19:00.0", bytes(range(16))))
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    return alloc


def trivial():
    return np.tile(np.arange(W * S, dtype=np.int32) % E, (L, 1))


W13, W2, SC = 2 * 8 * 16, 2 * 16 * 4, 4 * 2  # row bytes: bf16 [8, 16], bf16 [16, 4], f32 [2]


def engine_tensors(alloc, shared=1):
    """vLLM-like: per layer, w13 and w2 in one caching-allocator segment (w13 with ``shared``
    fused shared-expert rows after the routed slots and a padded row stride), fp32 scales in a
    second segment shared by every layer, a global input scale beside them; the staging in its
    own segment. Allocations: one per layer + scales + staging."""
    scales = alloc.segment(1 << 16)
    layers = []
    for layer in range(L):
        seg = alloc.segment(1 << 16)
        w13 = FakeCudaTensor(seg + 512, (S + shared, 8, 16), stride=(8 * 16 + 32, 16, 1))  # 64 bytes of padding
        w2 = FakeCudaTensor(seg + 512 + 8192, (S, 16, 4))
        sc = FakeCudaTensor(scales + layer * 1024, (S, 2), itemsize=4, dtype="float32")
        gl = FakeCudaTensor(scales + 8192 + layer * 64, (E,), itemsize=4, dtype="float32")
        layers.append([LayerTensor("w13_weight", w13, rows=S), LayerTensor("w2_weight", w2),
                       LayerTensor("w13_weight_scale", sc), LayerTensor("w13_input_scale", gl, kind="global")])
    st = alloc.segment(1 << 16)
    staging = [LayerTensor("w2_weight", FakeCudaTensor(st + 4096, (S, 16, 4))),
               LayerTensor("w13_weight", FakeCudaTensor(st, (S, 8, 16))),
               LayerTensor("w13_weight_scale", FakeCudaTensor(st + 8192, (S, 2), itemsize=4, dtype="float32"))]
    return layers, staging, scales, st


def create(name, layers, staging, apply=None, **kw):
    return EngineRegion.create(name, 0, W, L, S, E, layers, trivial(), ring_len=16, staging=staging,
                               apply=apply if apply is not None else (lambda layer, slots: None), **kw)


def post(reg, cmd_id, layer, apply_step, epoch, mask=(1, 1, 0, 0)):
    row = reg.placement().phy2log[layer].copy()
    row[0], row[1] = row[1], row[0]
    h = reg._h
    seq = int(h[R._W_CMD_SEQ])
    h[R._W_CMD_SEQ] = seq + 1
    h[R._W_CMD_ID], h[R._W_CMD_LAYER], h[R._W_CMD_APPLY_STEP], h[R._W_CMD_EPOCH] = cmd_id, layer, apply_step, epoch
    reg._cmd_row[:] = row
    reg._cmd_mask[:] = mask
    h[R._W_CMD_SEQ] = seq + 2
    return row


def test_the_ipc_section_and_the_table_are_what_the_contract_says(name, gpu):
    layers, staging, scales, st = engine_tensors(gpu)
    applied = []
    reg = create(name, layers, staging, apply=lambda layer, slots: applied.append((layer, list(slots))))
    reg.publish()
    with open(region_path(name, 0), "rb") as f:
        data = f.read()
    expert_bytes, ntens, kind, total = struct.unpack_from("<QIIQ", data, 40)
    table_off, ipc_off = struct.unpack_from("<QQ", data, 104)
    assert (expert_bytes, ntens, kind, total) == (W13 + W2 + SC, 4, 1, len(data))
    minor, counts_kind, num_handles = struct.unpack_from("<III", data, 176)
    assert (minor, counts_kind, num_handles) == (0, 0, L + 2), "one handle per distinct allocation"
    assert ipc_off % 64 == 0 and ipc_off >= table_off + 64 * (L + 1) * 4
    bus, uuid = struct.unpack_from("<16s16s", data, ipc_off)
    assert bus.rstrip(b"\0") == b"0000:19:00.0" and uuid == bytes(range(16)) and not any(data[ipc_off + 32 : ipc_off + 64])
    handles = []
    for i in range(num_handles):
        h, nbytes = struct.unpack_from("<64sQ", data, ipc_off + 64 + 128 * i)
        assert not any(data[ipc_off + 64 + 128 * i + 72 : ipc_off + 64 + 128 * (i + 1)]), "reserved"
        base = struct.unpack_from("<Q", h)[0]
        assert nbytes == gpu.segments[base] == 1 << 16
        handles.append(base)
    assert len(set(handles)) == num_handles
    entries = reg.table
    assert reg.check_table() == W13 + W2 + SC
    for e in entries:
        base = handles[e.handle]
        if e.layer == L:
            want = {"w13_weight": st, "w2_weight": st + 4096, "w13_weight_scale": st + 8192}.get(e.name)
            if e.kind == 2:
                assert (e.offset, e.row_stride, e.rows, e.handle) == (0, 0, 0, 0), "globals have no staging"
                continue
        else:
            t = next(t for t in layers[e.layer] if t.name == e.name)
            want = t.data.ptr
        assert base + e.offset == want, (e.layer, e.name)
        assert e.rows == (E if e.kind == 2 else S)
    w13 = next(e for e in entries if e.layer == 1 and e.name == "w13_weight")
    assert (w13.row_stride, w13.row_bytes, w13.dtype) == (2 * (8 * 16 + 32), W13, "bf16")
    st_w13 = next(e for e in entries if e.layer == L and e.name == "w13_weight")
    assert (st_w13.row_stride, st_w13.row_bytes) == (W13, W13)
    assert entries[3].dtype == "f32" and entries[3].kind == 2
    assert reg.tensor(1, "w2_weight") is layers[1][1].data and reg.staging_tensor("w13_weight") is staging[1].data
    with pytest.raises(ContractError, match="on the engine's GPU"):
        reg.read_expert(0, 0)
    # A command applies through the engine's callback, with the slots of the copy mask.
    row = post(reg, 1, 1, 0, 1)
    p = reg.at_step_boundary(0, lambda have: (have, have))
    assert p.applied == [1] and applied == [(1, [0, 1])]
    assert (int(reg._h[R._W_ACK_ID]), int(reg._h[R._W_ACK_RESULT])) == (1, ACK_APPLIED)
    assert np.array_equal(p.phy2log[1], row) and reg.table_fault == 0
    reg.finish(wait_detach_s=0.1)
    assert not os.path.exists(region_path(name, 0))


@pytest.mark.parametrize("which", ["live", "staging", "global"])
def test_a_reallocated_tensor_sets_table_fault_and_every_command_is_rejected(name, gpu, caplog, which):
    layers, staging, _, _ = engine_tensors(gpu)
    applied = []
    reg = create(name, layers, staging, apply=lambda layer, slots: applied.append(layer))
    reg.publish()
    agree = lambda have: (have, have)  # noqa: E731
    reg.at_step_boundary(0, agree)  # no command: nothing checked, nothing changed
    reg.record(0, np.zeros((L, S), np.int64))
    if which == "live":
        moved, entry = layers[2][1].data, 2 * 4 + 1
    elif which == "staging":
        moved, entry = staging[1].data, L * 4 + 0  # w13_weight is tensor 0 of the staging layer
    else:
        moved, entry = layers[0][3].data, 3
    moved.ptr = gpu.segment(1 << 16)  # process_weights_after_loading replaced the parameter
    post(reg, 1, 1, 1, 1)
    with caplog.at_level(logging.ERROR, logger="eplb_client"):
        p = reg.at_step_boundary(1, agree)
    assert p.applied == [] and applied == []
    assert reg.table_fault == entry + 1
    assert (int(reg._h[R._W_ACK_ID]), int(reg._h[R._W_ACK_RESULT])) == (1, ACK_REJECTED)
    assert reg.table[entry].name in caplog.text and "re-allocated" in caplog.text
    reg.record(1, np.zeros((L, S), np.int64))
    moved.ptr = 12345  # even if it comes back somewhere: the table stays faulty
    post(reg, 2, 1, 2, 1)
    reg.at_step_boundary(2, agree)
    assert int(reg._h[R._W_ACK_RESULT]) == ACK_REJECTED and applied == [] and reg.table_fault == entry + 1
    reg.finish()


def test_tensors_sharing_an_allocation_share_a_handle(name, gpu):
    seg = gpu.segment(1 << 20)
    layers = [[LayerTensor("w", FakeCudaTensor(seg + layer * 4096, (S, 64)))] for layer in range(L)]
    staging = [LayerTensor("w", FakeCudaTensor(seg + L * 4096, (S, 64)))]
    reg = create(name, layers, staging)
    assert reg.num_handles == 1 and [e.handle for e in reg.table] == [0] * (L + 1)
    assert [e.offset for e in reg.table] == [layer * 4096 for layer in range(L + 1)]
    reg.close()


@pytest.mark.parametrize("bad,match", [
    ("outside", r"layer 2, tensor 'w': field offset: its \d+ bytes at offset \d+ are not inside one allocation"),
    ("overlap", r"field offset: its rows .* overlap those of layer 0, tensor 'w'"),
    ("vmm", r"layer 0, tensor 'w': field handle: .* legacy CUDA IPC handle"),
    ("no staging", r"GPU weights need staging"),
    ("staging name", r"staging, tensor 'v': field name"),
    ("staging missing", r"staging, tensor 'w': field name: the per-expert tensor has no staging"),
    ("staging rows", r"staging, tensor 'w': field rows"),
    ("staging dtype", r"staging, tensor 'w': field dtype"),
    ("staging for a global", r"staging, tensor 'g': field kind"),
    ("host among cuda", r"layer 1, tensor 'w': field data: a host tensor among CUDA ones"),
    ("two devices", r"layer 1, tensor 'w': field data: on cuda:1"),
    ("cpu torch", None),
])
def test_bad_gpu_tables_are_refused_before_anything_is_written(name, gpu, bad, match):
    seg = gpu.segment(1 << 16)
    layers = [[LayerTensor("w", FakeCudaTensor(seg + layer * 4096, (S, 64))),
               LayerTensor("g", FakeCudaTensor(seg + 60000 + layer * 64, (E,), itemsize=4, dtype="float32"), "global")]
              for layer in range(L)]
    staging = [LayerTensor("w", FakeCudaTensor(seg + L * 4096, (S, 64)))]
    if bad == "outside":
        layers[2][0] = LayerTensor("w", FakeCudaTensor(seg + (1 << 16) - 100, (S, 64)))
    elif bad == "overlap":
        layers[1][0] = LayerTensor("w", FakeCudaTensor(seg + 64, (S, 64)))
    elif bad == "vmm":
        gpu.vmm.add(seg)
    elif bad == "no staging":
        staging = None
    elif bad == "staging name":
        staging.append(LayerTensor("v", FakeCudaTensor(seg + 50000, (S, 64))))
    elif bad == "staging missing":
        staging = []
    elif bad == "staging rows":
        staging = [LayerTensor("w", FakeCudaTensor(seg + L * 4096, (S + 1, 64)), rows=S + 1)]
    elif bad == "staging dtype":
        staging = [LayerTensor("w", FakeCudaTensor(seg + L * 4096, (S, 64), dtype="float16"))]
    elif bad == "staging for a global":
        staging.append(LayerTensor("g", FakeCudaTensor(seg + 50000, (E,), itemsize=4, dtype="float32"), "global"))
    elif bad == "host among cuda":
        layers[1][0] = LayerTensor("w", np.zeros((S, 64), np.uint16))
    elif bad == "two devices":
        layers[1][0] = LayerTensor("w", FakeCudaTensor(seg + 4096, (S, 64), device="cuda:1"))
    elif bad == "cpu torch":  # a torch tensor on the host among CUDA ones (is_cuda False, device cpu)
        t = FakeCudaTensor(seg + 4096, (S, 64))
        t.is_cuda, t.device = False, "cpu"
        layers[1][0] = LayerTensor("w", t)
        match = r"layer 1, tensor 'w': field data: a host tensor among CUDA ones"
    with pytest.raises(ContractError, match=match):
        create(name, layers, staging)
    assert not [f for f in os.listdir(R.SHM_DIR) if name in f], "something was created"


def test_expandable_segments_are_refused(monkeypatch, name, gpu):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64, expandable_segments:True")
    with pytest.raises(ContractError, match="expandable segments"):
        cuda_ipc.check_alloc_conf()
    layers, staging, _, _ = engine_tensors(gpu)
    with pytest.raises(ContractError, match="expandable segments"):
        create(name, layers, staging)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    cuda_ipc.check_alloc_conf()


class FakeLib:
    """libcuda.so.1 as ctypes calls it: out-parameters arrive as byref() objects or arrays."""

    def __init__(self, segments, vmm=()):
        self.segments, self.vmm, self.calls = segments, set(vmm), []

    def cuMemGetAddressRange_v2(self, pbase, psize, ptr):
        self.calls.append(("range", ptr.value))
        for base, size in self.segments.items():
            if base <= ptr.value < base + size:
                pbase._obj.value, psize._obj.value = base, size
                return 0
        return 1

    def cuPointerGetAttribute(self, pdata, attr, ptr):
        if attr.value == cuda_ipc.CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
            pdata._obj.value = 0 if ptr.value in self.vmm else 1
        elif attr.value == cuda_ipc.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
            pdata._obj.value = 0
        else:
            return 1
        return 0

    def cuIpcGetMemHandle(self, handle, ptr):
        self.calls.append(("handle", ptr.value))
        ctypes.memmove(handle, struct.pack("<Q", ptr.value) + b"h" * 56, 64)
        return 0

    def cuDeviceGet(self, pdev, ordinal):
        pdev._obj.value = 7
        return 0

    def cuDeviceGetPCIBusId(self, buf, n, dev):
        buf.value = b"0000:19:00.0"
        return 0

    def cuDeviceGetUuid_v2(self, uuid, dev):
        ctypes.memmove(uuid, bytes(range(16)), 16)
        return 0

    def cuGetErrorName(self, rc, pname):
        pname._obj.value = b"CUDA_ERROR_INVALID_VALUE"
        return 0


def test_the_driver_calls_export_each_allocation_once_from_its_base(monkeypatch):
    lib = FakeLib({0x1000: 0x10000, 0x40000: 0x2000})
    monkeypatch.setattr(cuda_ipc, "_CUDA", lib)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    exp = cuda_ipc.export_tensors([("a", 0x1000 + 64, 128), ("b", 0x40000 + 8, 16), ("c", 0x1000 + 4096, 64)])
    assert exp.pci_bus_id == "0000:19:00.0" and exp.uuid == bytes(range(16))
    assert [(a.base, a.bytes) for a in exp.allocations] == [(0x1000, 0x10000), (0x40000, 0x2000)]
    assert [a.handle[:8] for a in exp.allocations] == [struct.pack("<Q", 0x1000), struct.pack("<Q", 0x40000)]
    assert exp.places == [(0, 64), (1, 8), (0, 4096)]
    assert [c for c in lib.calls if c[0] == "handle"] == [("handle", 0x1000), ("handle", 0x40000)], "once per base"
    section = cuda_ipc.ipc_section(exp)
    assert len(section) == 64 + 2 * 128
    assert struct.unpack_from("<Q", section, 64 + 128 + 64)[0] == 0x2000
    with pytest.raises(ContractError, match=r"'d': field offset"):
        cuda_ipc.export_tensors([("'d'", 0x40000 + 0x1F00, 0x200)])
    with pytest.raises(ContractError, match="cuMemGetAddressRange.*CUDA_ERROR_INVALID_VALUE"):
        cuda_ipc.export_tensors([("e", 0x99999999, 1)])
    lib.vmm.add(0x40000)
    with pytest.raises(ContractError, match="legacy CUDA IPC"):
        cuda_ipc.export_tensors([("f", 0x40000, 1)])


def test_the_addresses_are_checked_when_a_command_arrives_and_again_at_its_boundary(name, gpu):
    layers, staging, _, _ = engine_tensors(gpu)
    reg = create(name, layers, staging)
    reg.publish()
    agree = lambda have: (have, have)  # noqa: E731
    post(reg, 1, 0, 3, 1)  # for step 3
    reg.at_step_boundary(0, agree)  # seen: the addresses are fine
    assert reg.table_fault == 0 and int(reg._h[R._W_ACK_ID]) == 0
    reg.record(0, np.zeros((L, S), np.int64))
    layers[1][1].data.ptr += 1 << 12  # another layer's tensor: not what this apply copies
    layers[0][0].data.ptr += 1 << 12  # re-allocated after the command arrived, before its boundary
    for t in (1, 2):
        reg.at_step_boundary(t, agree)
        reg.record(t, np.zeros((L, S), np.int64))
    reg.at_step_boundary(3, agree)
    # Right before the apply, the tensors the apply copies (layer 0's and staging) are checked:
    # the first of them that moved is named; layer 1's move is found when the next command arrives.
    assert reg.table_fault == 0 * 4 + 0 + 1, "entry 0: layer 0's w13_weight"
    assert (int(reg._h[R._W_ACK_ID]), int(reg._h[R._W_ACK_RESULT])) == (1, ACK_REJECTED)
    assert reg.placement().epoch[0] == 0
    reg.finish()


def test_a_reallocation_is_reported_as_soon_as_a_command_arrives(name, gpu):
    layers, staging, _, _ = engine_tensors(gpu)
    reg = create(name, layers, staging)
    reg.publish()
    layers[0][2].data.ptr = gpu.segment(4096)
    post(reg, 1, 0, 5, 1)  # due later: the sidecar reads table_fault at the end of its wait
    reg.at_step_boundary(0, lambda have: (have, have))
    assert reg.table_fault == 3 and int(reg._h[R._W_ACK_ID]) == 0
    reg.finish()

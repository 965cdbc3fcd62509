"""The client alone, in one process: contract 2's layout and tensor table, the load ring, the
placement, the switch rules at a boundary, and the refusals (bad tables, bad counts, bad names,
special files, no space, other machines)."""

from __future__ import annotations

import os
import signal
import stat
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from eplb_client import (
    ACK_APPLIED,
    ACK_CANCELLED,
    ACK_MISSED,
    ACK_REJECTED,
    ContractError,
    EngineRegion,
    LayerTensor,
    TableEntry,
    _native,
    check_table,
    cleanup,
    derive_log2phy,
    region_path,
)
from eplb_client import region as R

L, S, E, W = 3, 4, 6, 2  # layers, slots a rank, experts, engine ranks
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# row bytes of the default tensors: w13 f32 [8, 16], w2 f32 [8, 8], scale bf16 (u16) [3]
EB = 512 + 256 + 6


def trivial():
    return np.tile(np.arange(W * S, dtype=np.int32) % E, (L, 1))


def default_layer(layer: int):
    """Three per-expert tensors, each row s filled with ``layer * 16 + s``."""
    w13 = np.empty((S, 8, 16), np.float32)
    w2 = np.empty((S, 8, 8), np.float32)
    scale = np.empty((S, 3), np.uint16)  # bf16 bits
    for s in range(S):
        w13[s], w2[s], scale[s] = layer * 16 + s, layer * 16 + s, layer * 16 + s
    return [LayerTensor("w13", w13), LayerTensor("w2", w2), LayerTensor("scale", scale)]


def make(name, rank=0, publish=True, layers=None, **kw):
    layers = layers if layers is not None else [default_layer(layer) for layer in range(L)]
    reg = EngineRegion.create(name, rank, W, L, S, E, layers, trivial(), ring_len=16, **kw)
    if publish:
        reg.publish()
    return reg


def experts(reg, layer):
    """[S, expert_bytes] u8: every slot's expert bytes (row s of every per-expert tensor)."""
    return np.stack([np.frombuffer(reg.read_expert(layer, s), np.uint8) for s in range(S)])


def agree_alone(have):
    return have, have


def post(reg, cmd_id, layer, apply_step, epoch, row, mask, staging_value=200):
    """What a sidecar does: stage (row s of every per-expert staging tensor), then post under cmd_seq."""
    for s in np.flatnonzero(mask):
        reg.write_expert(reg.num_layers, s, bytes([staging_value + s]) * reg.expert_bytes)
    h = reg._h
    seq = int(h[R._W_CMD_SEQ])
    h[R._W_CMD_SEQ] = seq + 1
    h[R._W_CMD_ID], h[R._W_CMD_LAYER], h[R._W_CMD_APPLY_STEP], h[R._W_CMD_EPOCH] = cmd_id, layer, apply_step, epoch
    reg._cmd_row[:] = row
    reg._cmd_mask[:] = mask
    h[R._W_CMD_SEQ] = seq + 2


def ack(reg):
    h = reg._h
    return int(h[R._W_ACK_ID]), int(h[R._W_ACK_RESULT]), int(h[R._W_ACK_STEP])


def swapped_row(reg, layer):
    """Rank 0's slots 0 and 1 exchange experts (both change, so both need a staged copy)."""
    row = reg.placement().phy2log[layer].copy()
    row[0], row[1] = row[1], row[0]
    return row


def run_to(reg, step, agree=agree_alone):
    """Boundaries and records up to (not including) the boundary of ``step``."""
    while reg.engine_step < step:
        t = reg.engine_step
        reg.at_step_boundary(t, agree)
        reg.record(t, np.zeros((L, reg.count_cols), np.int64))


def test_layout_matches_the_contract(name):
    reg = make(name, rank=1, publish=False)
    tmp = reg._tmp_path
    assert os.path.exists(tmp) and not os.path.exists(region_path(name, 1)), "published before publish()"
    reg.publish()
    path = region_path(name, 1)
    assert path == f"/dev/shm/eplb-{name}-1"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, "rb") as f:
        data = f.read()
    magic, version, header_bytes, nl, spr, ne, ws, rank, ring_len = struct.unpack_from("<QIIIIIIII", data, 0)
    assert data[:8] == b"EPLBSHM1" and version == 2 and header_bytes == 4096
    assert (nl, spr, ne, ws, rank, ring_len) == (L, S, E, W, 1, 16)
    expert_bytes, ntens, kind, total = struct.unpack_from("<QIIQ", data, 40)
    assert (expert_bytes, ntens, kind, total) == (EB, 3, 0, len(data))
    ring_off, entry_bytes, place_off, epochs_off, cmd_off, table_off, ipc_off = struct.unpack_from("<7Q", data, 64)
    assert ring_off == 4096 and entry_bytes == 64 + 64 * ((8 * L * S + 63) // 64)
    assert place_off == ring_off + 16 * entry_bytes and ipc_off == 0
    for off in (ring_off, place_off, epochs_off, cmd_off, table_off):
        assert off % 64 == 0
    assert epochs_off >= place_off + 4 * L * W * S and cmd_off >= epochs_off + 8 * L
    assert table_off >= cmd_off + 64 * ((4 * W * S + 63) // 64) + S
    assert struct.unpack_from("<Q", data, 120)[0] == os.getpid()
    assert struct.unpack_from("<Q", data, 144)[0] == 1  # running once published
    minor, counts_kind, num_handles, reserved = struct.unpack_from("<IIII", data, 176)
    assert (minor, counts_kind, num_handles, reserved) == (0, 0, 0, 0)
    assert struct.unpack_from("<Q", data, 192)[0] == 0, "table_fault"
    assert not any(data[1024:4096]), "reserved"
    # The table: (L + 1) * 3 entries; the staging layer last.
    entries = [struct.unpack_from("<24s8sQQQIBBH", data, table_off + 64 * i) for i in range((L + 1) * 3)]
    spans = []
    for i, (nm, dt, off, stride, rb, rows, knd, res, handle) in enumerate(entries):
        layer, t = divmod(i, 3)
        assert nm.rstrip(b"\0") == [b"w13", b"w2", b"scale"][t]
        assert dt.rstrip(b"\0") == [b"f32", b"f32", b"bf16"][t]
        assert (rb, rows, knd, res, handle) == ([512, 256, 6][t], S, 1, 0, 0)
        assert stride >= rb and off % 64 == 0 and off >= table_off + 64 * (L + 1) * 3
        spans.append((off, off + (rows - 1) * stride + rb))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "extents overlap"
    reader = EngineRegion.attach(name, 1)
    assert reader.check_table() == EB and reader.table == reg.table
    reader.close()
    assert spans[-1][1] <= total
    # The views are the region's bytes, with the shapes handed over.
    w2 = reg.tensor(2, "w2")
    assert w2.shape == (S, 8, 8) and w2.dtype == np.float32 and np.all(w2[3] == 2 * 16 + 3)
    w2[3] = 1.5
    off = entries[2 * 3 + 1][2]
    assert np.all(np.frombuffer(data, np.float32, 64, off + 3 * 256) == 2 * 16 + 3)  # the copy read before
    assert np.all(reg.rows(2, "w2")[3].view(np.float32) == 1.5)
    assert reg.tensor(0, "scale").dtype == np.uint16 and reg.staging_tensor("w13").shape == (S, 8, 16)
    assert set(reg.weights(1)) == {"w13", "w2", "scale"}
    reg.finish()
    assert not os.path.exists(path)


def quantised_layer(layer: int, shared: int = 2):
    """A quantised-like layer, as vLLM / SGLang hold one: bf16 weights as u16, fp8 weights as u8,
    fp32 block scales, per-expert fp32 scale_2, a global input scale, and a fused weight whose
    rows are padded (row stride > row bytes) with ``shared`` shared-expert rows after the routed
    slots."""
    rng = np.random.default_rng(layer)
    fused = rng.integers(0, 255, (S + shared, 12), np.uint8)  # 4 bytes of padding a row
    return [
        LayerTensor("w13_weight", rng.integers(0, 1 << 16, (S, 4, 6), np.uint16)),  # bf16 bits
        LayerTensor("w2_weight", rng.integers(0, 255, (S, 6, 4), np.uint8), dtype="f8e4m3"),
        LayerTensor("w13_weight_scale_inv", rng.random((S, 2, 3), np.float32)),
        LayerTensor("w13_input_scale", rng.random((E, 2), np.float32), kind="global"),
        LayerTensor("w2_weight_scale_2", rng.random(S, np.float32)),
        LayerTensor("fused_shared", fused[:, :8], rows=S, dtype="fp4x2"),
        LayerTensor("w2_input_scale", np.float32(0.5 + layer), kind="global"),
    ]


def test_a_quantised_tensor_set_round_trips_and_apply_moves_only_routed_rows(name):
    handed = [quantised_layer(layer) for layer in range(L)]
    # The fused shared-expert rows (dim 0 beyond the listed rows): the compiled core lays out only
    # the listed rows, so "auto" takes the Python writer for this tensor set, whatever the default.
    reg = make(name, layers=handed, backend="auto")
    assert reg.backend == "python"
    names = [t.name for t in handed[0]]
    assert reg.tensor_names == names and reg.check_table() == reg.expert_bytes
    rb = [48, 24, 24, 8, 4, 8, 4]
    assert reg.expert_bytes == 48 + 24 + 24 + 4 + 8, "globals are not part of an expert"
    for e in reg.table:
        t = handed[0][e.index]
        assert e.name == t.name and e.row_bytes == rb[e.index]
        assert e.dtype == ["bf16", "f8e4m3", "f32", "f32", "f32", "fp4x2", "f32"][e.index]
        assert e.kind == (2 if t.kind == "global" else 1)
        if e.layer < L:
            assert e.rows == {3: E, 6: 1}.get(e.index, S)
            assert e.row_stride == (12 if t.name == "fused_shared" else rb[e.index])
        elif e.kind == 2:
            assert (e.offset, e.row_stride, e.rows) == (0, 0, 0), "globals have no staging"
    for layer in range(L):
        for t in handed[layer]:
            view = reg.tensor(layer, t.name)
            assert view.shape == np.shape(t.data) and view.dtype == np.asarray(t.data).dtype
            assert np.array_equal(view, t.data), (layer, t.name)
    fused = reg.tensor(1, "fused_shared")
    assert fused.shape == (S + 2, 8) and fused.strides == (12, 1), "the row stride and the shared rows kept"
    # The padding between the fused rows, in the region, is never touched by anyone.
    e = next(e for e in reg.table if e.layer == 1 and e.name == "fused_shared")
    pad = np.ndarray((S + 2, 4), np.uint8, buffer=reg._mm, offset=e.offset + 8, strides=(12, 1))
    pad[:] = 0xA5
    before = {(layer, t.name): np.array(reg.tensor(layer, t.name)) for layer in range(L) for t in handed[layer]}
    post(reg, 1, layer=1, apply_step=0, epoch=1, row=swapped_row(reg, 1), mask=np.array([1, 1, 0, 0], np.uint8))
    staged = [reg.read_expert(L, s) for s in range(S)]
    p = reg.at_step_boundary(0, agree_alone)
    assert p.applied == [1] and ack(reg)[:2] == (1, ACK_APPLIED)
    for s in range(S):
        got = reg.read_expert(1, s)
        assert (got == staged[s]) == (s < 2), s
    for layer in range(L):
        for t in handed[layer]:
            now = np.array(reg.tensor(layer, t.name))
            if t.kind == "global" or layer != 1:
                assert np.array_equal(now, before[(layer, t.name)]), f"{t.name} of layer {layer} changed"
            else:
                assert np.array_equal(now[2:], before[(layer, t.name)][2:]), f"{t.name}: a row beyond the mask moved"
    assert np.all(pad == 0xA5), "the padding between rows was written"
    reg.finish()


def test_counts_physical_have_a_row_per_physical_slot(name):
    reg = make(name, counts="physical")
    assert reg.counts_kind == 1 and reg.count_cols == W * S
    with open(reg.path, "rb") as f:
        head = f.read(4096)
    assert struct.unpack_from("<I", head, 180)[0] == 1
    assert struct.unpack_from("<Q", head, 72)[0] == 64 + 64 * ((8 * L * W * S + 63) // 64)
    reg.at_step_boundary(0, agree_alone)
    with pytest.raises(ContractError, match="num_physical"):
        reg.record(0, np.ones((L, S), np.int64))
    reg.record(0, np.arange(L * W * S).reshape(L, W * S))
    assert np.array_equal(reg.read_step(0)[2], np.arange(L * W * S).reshape(L, W * S))
    reg.finish()


def test_ring_seqlock_entries_and_wraparound(name):
    reg = make(name)
    other = EngineRegion.attach(name, 0)  # a reader's mapping
    for t in range(20):
        reg.at_step_boundary(t, agree_alone)
        reg.record(t, np.full((L, S), t, np.int64) + np.arange(S), phase="prefill" if t % 2 else "decode", tokens=7 * t,
                   moe_ns=1000 * t)
    assert other.engine_step == 20
    phase, tokens, counts = other.read_step(19)
    assert phase == 1 and tokens == 133 and np.array_equal(counts, np.full((L, S), 19) + np.arange(S))
    assert other.read_step(10)[0] == 2
    assert other.read_step(3) is None, "step 3 was overwritten by step 19 in a ring of 16: lost"
    assert other.read_step(20) is None, "not recorded yet"
    entry = other._ring[19 % 16]
    assert int(entry[0]) % 2 == 0 and int(entry[1]) == 19
    assert int(entry[4]) == 19000, "the MoE time at byte 32 of the entry"
    with pytest.raises(ContractError):
        reg.record(5, np.zeros((L, S), np.int64))  # out of order
    other.close()
    reg.finish()


BAD_COUNTS = {
    "negative": lambda: np.full((L, S), -7, np.int64),
    "nan": lambda: np.full((L, S), np.nan),
    "inf": lambda: np.full((L, S), np.inf),
    "fraction": lambda: np.full((L, S), 2.9),
    "bool": lambda: np.ones((L, S), bool),
    "scalar": lambda: 5,
    "row": lambda: np.arange(S),  # would broadcast over the layers
    "shape": lambda: np.zeros((L, S + 1), np.int64),
    "huge float": lambda: np.full((L, S), 1e30),
    "overflow": lambda: np.full((L, S), R.MAX_COUNT, np.uint64),
    "u64 max": lambda: np.full((L, S), 2**64 - 1, np.uint64),
    "strings": lambda: np.full((L, S), "3"),
    "complex": lambda: np.ones((L, S), complex),
    "ragged": lambda: [[1, 2], [3]],
}


@pytest.mark.parametrize("bad", sorted(BAD_COUNTS))
def test_bad_counts_are_refused_and_leave_the_entry_stable(name, bad):
    reg = make(name)
    reader = EngineRegion.attach(name, 0)
    reg.at_step_boundary(0, agree_alone)
    before = reg._ring[0].copy()
    with pytest.raises(ContractError, match="counts"):
        reg.record(0, BAD_COUNTS[bad]())
    assert np.array_equal(reg._ring[0], before), "the entry was touched"
    assert int(reg._ring[0, 0]) % 2 == 0, "the seqlock is left odd"
    assert reg.engine_step == 0
    reg.record(0, np.full((L, S), 3, np.int64))  # the engine goes on
    assert reader.read_step(0)[2].tolist() == [[3] * S] * L
    reader.close()
    reg.finish()


@pytest.mark.parametrize("kw", [dict(phase="warmup"), dict(tokens=-1), dict(moe_ns=2**64), dict(tokens=1.5),
                                dict(tokens=True)])
def test_bad_record_fields_leave_the_entry_stable(name, kw):
    reg = make(name)
    reg.at_step_boundary(0, agree_alone)
    with pytest.raises(ContractError):
        reg.record(0, np.zeros((L, S), np.int64), **kw)
    assert int(reg._ring[0, 0]) == 0 and reg.engine_step == 0, "the entry was touched"
    reg.record(0, np.zeros((L, S), np.int64))
    assert int(reg._ring[0, 0]) == 2
    reg.finish()


def test_exact_integer_counts_of_any_numeric_type_are_taken(name):
    reg = make(name)
    for t, counts in enumerate([np.full((L, S), 4.0), np.full((L, S), 4, np.uint8), [[4] * S] * L,
                                np.full((L, S), R.MAX_COUNT - 1, np.uint64)]):
        reg.at_step_boundary(t, agree_alone)
        reg.record(t, counts)
        assert np.array_equal(reg.read_step(t)[2], np.asarray(counts, dtype=np.uint64))
    reg.finish()


def test_log2phy_and_logcnt_derive_from_phy2log():
    rng = np.random.default_rng(0)
    for _ in range(50):
        num_logical = int(rng.integers(1, 10))
        num_physical = num_logical + int(rng.integers(0, 10))
        rows = np.stack([np.concatenate([rng.permutation(num_logical),
                                         rng.integers(0, num_logical, num_physical - num_logical)])[rng.permutation(num_physical)]
                         for _ in range(3)]).astype(np.int32)
        log2phy, logcnt = derive_log2phy(rows, num_logical)
        for layer in range(3):
            for e in range(num_logical):
                slots = np.flatnonzero(rows[layer] == e)
                assert logcnt[layer, e] == len(slots)
                assert list(log2phy[layer, e, : len(slots)]) == list(slots)  # ascending
                assert np.all(log2phy[layer, e, len(slots) :] == -1)


def test_replica_rule_is_a_pure_function_of_token_and_layer(name):
    reg = make(name)
    p = reg.placement()
    experts_ = np.array([[0, 1], [0, 2], [1, 0]])
    tok = np.array([[10], [11], [12]])
    slots = p.replica_slot(1, experts_, tok)
    for (i, k), slot in np.ndenumerate(slots):
        e = experts_[i, k]
        assert p.phy2log[1, slot] == e
        assert slot == p.log2phy[1, e, (tok[i, 0] + 1) % p.logcnt[1, e]]
    reg.finish()


def test_command_applies_only_at_its_boundary_and_derives_the_placement(name):
    reg = make(name)
    before = experts(reg, 1)
    row = swapped_row(reg, 1)
    post(reg, 1, layer=1, apply_step=3, epoch=1, row=row, mask=np.array([1, 1, 0, 0], np.uint8))
    for t in range(3):
        p = reg.at_step_boundary(t, agree_alone)
        assert p.applied == [] and np.array_equal(experts(reg, 1), before), f"applied before step 3 (at {t})"
        # the forward pass runs here: nothing may change under it
        reg.record(t, np.zeros((L, S), np.int64))
        assert np.array_equal(experts(reg, 1), before)
    p = reg.at_step_boundary(3, agree_alone)
    assert p.applied == [1] and ack(reg) == (1, ACK_APPLIED, 3)
    assert np.array_equal(p.phy2log[1], row) and p.epoch[1] == 1
    now = experts(reg, 1)
    assert np.all(now[0] == 200) and np.all(now[1] == 201)
    assert np.array_equal(now[2:], before[2:])
    assert np.all(reg.tensor(1, "w2")[0].view(np.uint8) == 200), "the engine's view sees the applied row"
    log2phy, logcnt = derive_log2phy(p.phy2log.copy(), E)
    assert np.array_equal(p.logcnt, logcnt) and np.array_equal(p.log2phy[:, :, : log2phy.shape[2]], log2phy)
    reg.finish()


def test_the_applied_layer_is_the_one_applied_even_if_the_next_command_comes_at_once(name):
    # A sidecar may post its next command as soon as it reads the ack: the boundary must report
    # the layer it applied, not whatever the mailbox holds by the time it returns (a race seen in
    # CI under load: two engine ranks recorded different layers for the same commit).
    reg = make(name)
    post(reg, 1, layer=1, apply_step=0, epoch=1, row=swapped_row(reg, 1), mask=np.array([1, 1, 0, 0], np.uint8))
    answer = reg._answer

    def answer_then_next_command(cmd_id, result, step):
        answer(cmd_id, result, step)
        post(reg, 2, layer=2, apply_step=5, epoch=1, row=swapped_row(reg, 2), mask=np.array([1, 1, 0, 0], np.uint8))

    reg._answer = answer_then_next_command
    p = reg.at_step_boundary(0, agree_alone)
    reg._answer = answer
    assert p.applied == [1] and ack(reg) == (1, ACK_APPLIED, 0)
    assert p.epoch[1] == 1 and p.epoch[2] == 0
    reg.finish()


def test_disagreement_cancels_and_a_late_command_is_missed(name):
    reg = make(name)
    before = experts(reg, 0)
    row = swapped_row(reg, 0)
    post(reg, 1, 0, 2, 1, row, np.array([1, 1, 0, 0], np.uint8))
    run_to(reg, 2)
    p = reg.at_step_boundary(2, lambda have: (0, have))  # another rank had nothing for step 2
    assert p.applied == [] and ack(reg) == (1, ACK_CANCELLED, 2)
    reg.record(2, np.zeros((L, S), np.int64))
    post(reg, 2, 0, 3, 1, row, np.array([1, 1, 0, 0], np.uint8))
    reg.at_step_boundary(3, lambda have: (0, 0))  # no other rank had it: cancelled
    assert ack(reg) == (2, ACK_CANCELLED, 3)
    reg.record(3, np.zeros((L, S), np.int64))
    post(reg, 3, 0, 3, 1, row, np.array([1, 1, 0, 0], np.uint8))  # posted after its boundary
    reg.at_step_boundary(4, agree_alone)
    assert ack(reg) == (3, ACK_MISSED, 4)
    assert np.array_equal(experts(reg, 0), before) and reg.placement().epoch[0] == 0
    reg.finish()


def test_a_post_cut_short_never_stalls_the_engine(name):
    reg = make(name)
    row = swapped_row(reg, 0)
    post(reg, 1, 0, 1, 1, row, np.array([1, 1, 0, 0], np.uint8))
    reg._h[R._W_CMD_SEQ] += 1  # odd: a sidecar killed or stopped in the middle of its next post
    run_to(reg, 5)  # returns: the engine did not wait
    assert reg.placement().epoch[0] == 0 and ack(reg) == (0, 0, 0)
    reg.finish()


@pytest.mark.parametrize("fault", ["epoch", "mask", "row", "layer", "table_fault"])
def test_invalid_commands_are_rejected_on_every_rank(name, fault, caplog):
    reg = make(name)
    before = experts(reg, 0)
    row, mask, epoch, layer = swapped_row(reg, 0), np.array([1, 1, 0, 0], np.uint8), 1, 0
    if fault == "epoch":
        epoch = 2
    elif fault == "mask":
        mask[1] = 0  # slot 1 changes expert without a staged copy
    elif fault == "row":
        row[:] = 0  # experts 1.. have no slot
    elif fault == "layer":
        layer = L
    else:
        reg._h[R._W_TABLE_FAULT] = 2  # the engine found entry 1 re-allocated
    post(reg, 1, layer, 0, epoch, row, mask)
    seen = []
    p = reg.at_step_boundary(0, lambda have: (seen.append(have), (have, have))[1])
    assert seen == [0], "an invalid command takes part in the agreement as no command"
    assert p.applied == [] and ack(reg) == (1, ACK_REJECTED, 0)
    why = {"epoch": "epoch 2 is not", "mask": "without a staged copy", "row": "have no slot", "layer": ">= num_layers",
           "table_fault": "table_fault 2"}[fault]
    assert any("command 1 rejected" in r.getMessage() and why in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert np.array_equal(experts(reg, 0), before)
    reg.finish()


def test_finish_answers_a_pending_command_and_unlinks(name):
    reg = make(name)
    post(reg, 1, 0, 9, 1, swapped_row(reg, 0), np.array([1, 1, 0, 0], np.uint8))
    other = EngineRegion.attach(name, 0)
    run_to(reg, 3)
    reg.finish()
    assert not os.path.exists(region_path(name, 0))
    assert ack(other) == (1, ACK_CANCELLED, 3) and other.engine_state == R.ENGINE_FINISHED
    other.close()


def test_an_apply_that_fails_midway_fails_the_engine_and_every_later_step(name):
    def broken(layer, slots):
        raise RuntimeError("device copy failed")

    reg = make(name, apply=broken)
    post(reg, 1, layer=1, apply_step=0, epoch=1, row=swapped_row(reg, 1), mask=np.array([1, 1, 0, 0], np.uint8))
    with pytest.raises(RuntimeError, match="device copy failed"):
        reg.at_step_boundary(0, agree_alone)
    assert reg.engine_state == R.ENGINE_FAILED and ack(reg) == (0, 0, 0), "nothing answered"
    with pytest.raises(ContractError, match="failed mid-copy"):
        reg.record(0, np.zeros((L, S), np.int64))
    with pytest.raises(ContractError, match="failed mid-copy"):
        reg.at_step_boundary(0, agree_alone)
    reg.fail()
    assert not os.path.exists(reg.path)


class SpyLock:
    """The region's lock, reporting when a second thread waits for it."""

    def __init__(self, lock):
        self.lock, self.waiting, self.owner = lock, threading.Event(), threading.get_ident()

    def __enter__(self):
        if threading.get_ident() != self.owner:
            self.waiting.set()
        self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()


def test_one_lock_serialises_the_boundary_between_threads(name):
    # Issue 24 item 14: two threads at the same boundary answered APPLIED and REJECTED for one
    # command. Thread B enters while thread A is inside the apply: it must wait, then find the
    # command answered.
    results = {}

    def during_apply(layer, slots):  # host weights: called after the rows were copied
        b = threading.Thread(target=lambda: results.setdefault("b", reg.at_step_boundary(0, agree_alone)))
        b.start()
        results["b_thread"] = b
        assert spy.waiting.wait(30), "thread B was not serialised behind the boundary in progress"

    reg = make(name, apply=during_apply)
    spy = reg._lock = SpyLock(reg._lock)
    post(reg, 1, layer=1, apply_step=0, epoch=1, row=swapped_row(reg, 1), mask=np.array([1, 1, 0, 0], np.uint8))
    a = reg.at_step_boundary(0, agree_alone)
    results["b_thread"].join(30)
    assert not results["b_thread"].is_alive()
    assert a.applied == [1] and results["b"].applied == [], "the command is decided once"
    assert ack(reg) == (1, ACK_APPLIED, 0) and reg.placement().epoch[1] == 1
    reg.finish()


# ---- validation: every rule, named by layer, tensor and field, nothing created ----------------


def _layers(edit):
    layers = [default_layer(layer) for layer in range(L)]
    edit(layers)
    return layers


def _set(layers, layer, t, **kw):
    old = layers[layer][t]
    layers[layer][t] = LayerTensor(kw.get("name", old.name), kw.get("data", old.data), kw.get("kind", old.kind),
                                   kw.get("rows", old.rows), kw.get("dtype", old.dtype))


BAD_TABLES = {
    "name differs": (lambda ls: _set(ls, 2, 1, name="w2_other"), r"layer 2, tensor 'w2_other': field name"),
    "kind differs": (lambda ls: _set(ls, 1, 0, kind="global"), r"layer 1, tensor 'w13': field kind"),
    "dtype differs": (lambda ls: _set(ls, 1, 2, data=np.zeros((S, 3), np.int16)), r"layer 1, tensor 'scale': field dtype"),
    "row bytes differ": (lambda ls: _set(ls, 2, 1, data=np.zeros((S, 8, 9), np.float32)),
                         r"layer 2, tensor 'w2': field row_bytes"),
    "name twice": (lambda ls: _set(ls, 0, 1, name="w13"), r"layer 0, tensor 'w13': field name: used twice"),
    "no per-expert": (lambda ls: [[_set(ls, i, t, kind="global") for t in range(3)] for i in range(L)],
                      r"field kind: at least one per-expert"),
    "rows not slots": (lambda ls: _set(ls, 0, 0, rows=S - 1), r"layer 0, tensor 'w13': field rows"),
    "too few rows": (lambda ls: _set(ls, 1, 0, data=np.zeros((S - 1, 8, 16), np.float32)),
                     r"layer 1, tensor 'w13': field rows"),
    "overlapping rows": (lambda ls: _set(ls, 0, 2, data=np.lib.stride_tricks.as_strided(
        np.zeros(3, np.uint16), (S, 3), (0, 2))), r"layer 0, tensor 'scale': field row_stride"),
    "rows not contiguous": (lambda ls: _set(ls, 1, 1, data=np.zeros((S, 8, 16), np.float32)[:, :, ::2]),
                            r"layer 1, tensor 'w2': field row_stride"),
    "0-d per-expert": (lambda ls: _set(ls, 0, 2, data=np.float32(1)), r"layer 0, tensor 'scale': field rows"),
    "no dtype name": (lambda ls: _set(ls, 0, 2, data=np.zeros((S, 3), bool)), r"layer 0, tensor 'scale': field dtype"),
    "unknown dtype=": (lambda ls: _set(ls, 0, 2, dtype="f7"), r"layer 0, tensor 'scale': field dtype"),
    "dtype= size": (lambda ls: _set(ls, 0, 2, dtype="f8e4m3"), r"layer 0, tensor 'scale': field dtype"),
    "name too long": (lambda ls: _set(ls, 0, 2, name="x" * 25), r"layer 0, tensor 'xxxx.*': field name"),
    "empty name": (lambda ls: _set(ls, 0, 2, name=""), r"layer 0, tensor '': field name"),
    "bad kind": (lambda ls: _set(ls, 0, 2, kind="shared"), r"layer 0, tensor 'scale': field kind"),
    "not an array": (lambda ls: _set(ls, 0, 2, data=[[1, 2, 3]] * S), r"layer 0, tensor 'scale': field data"),
    "empty rows": (lambda ls: _set(ls, 2, 2, data=np.zeros((S, 0), np.uint16)), r"layer 2, tensor 'scale': field row_bytes"),
    "global rows 0": (lambda ls: [ls[i].append(LayerTensor("g", np.zeros(4, np.float32), "global", rows=0))
                                  for i in range(L)], r"layer 0, tensor 'g': field rows"),
    "global rows > dim 0": (lambda ls: [ls[i].append(LayerTensor("g", np.zeros(4, np.float32), "global", rows=5))
                                        for i in range(L)], r"layer 0, tensor 'g': field rows"),
    "tensor count": (lambda ls: ls[1].pop(), r"layer 1: 2 tensors, layer 0 has 3"),
    "too many": (lambda ls: [ls[i].extend(LayerTensor(f"t{j}", np.zeros((S, 1), np.uint8)) for j in range(62))
                             for i in range(L)], r"layer 0: 65 tensors"),
    "layer count": (lambda ls: ls.pop(), r"layers: 2 lists, want num_layers = 3"),
    "not a LayerTensor": (lambda ls: ls[0].__setitem__(0, ("w13", np.zeros((S, 8, 16)))), r"not a LayerTensor"),
}


@pytest.mark.parametrize("bad", sorted(BAD_TABLES))
def test_every_bad_tensor_table_is_refused_before_anything_is_written(name, bad):
    edit, match = BAD_TABLES[bad]
    with pytest.raises(ContractError, match=match):
        make(name, layers=_layers(edit))
    assert not [f for f in os.listdir(R.SHM_DIR) if name in f], "something was created"


def test_staging_is_the_clients_with_host_weights(name):
    with pytest.raises(ContractError, match="staging"):
        make(name, staging=[LayerTensor("w13", np.zeros((S, 8, 16), np.float32))])


def _entries(changes):
    """A valid host table: 2 layers + staging of one per-expert tensor and one global."""
    es = []
    off = 1000
    for layer in range(3):
        es.append(TableEntry(layer, 0, "w", "f32", off, 16, 8, 4, 1, 0))
        off += 64
        es.append(TableEntry(layer, 1, "g", "f32", off if layer < 2 else 0, 4 if layer < 2 else 0, 4,
                             2 if layer < 2 else 0, 2, 0))
        off += 64
    for (layer, t), kw in (changes or {}).items():
        i = layer * 2 + t
        es[i] = es[i]._replace(**kw)
    return es


@pytest.mark.parametrize("changes,kind,match", [
    ({}, 0, None),
    ({(1, 0): dict(name="v")}, 0, "layer 1, tensor 'v': field name"),
    ({(2, 0): dict(dtype="f16")}, 0, "staging, tensor 'w': field dtype"),
    ({(1, 1): dict(kind=1, rows=4)}, 0, "layer 1, tensor 'g': field kind"),
    ({(0, 0): dict(row_bytes=4, row_stride=4)}, 0, "field row_bytes"),
    ({(1, 0): dict(row_stride=7)}, 0, "layer 1, tensor 'w': field row_stride"),
    ({(0, 0): dict(rows=3)}, 0, "layer 0, tensor 'w': field rows"),
    ({(0, 1): dict(rows=0)}, 0, "layer 0, tensor 'g': field rows"),
    ({(2, 1): dict(offset=64)}, 0, "staging, tensor 'g': field offset"),
    ({(1, 0): dict(offset=999)}, 0, "layer 1, tensor 'w': field offset"),
    ({(1, 0): dict(offset=1950)}, 0, "layer 1, tensor 'w': field offset"),
    ({(1, 0): dict(offset=1000)}, 0, "overlap"),
    ({(1, 1): dict(name="w")}, 0, "field name: used twice"),
    ({(1, 0): dict(handle=1)}, 0, "field handle"),
    ({(0, 0): dict(kind=2, rows=4), (1, 0): dict(kind=2, rows=4), (2, 0): dict(kind=2, rows=0, offset=0, row_stride=0)},
     0, "at least one per-expert"),
    ({(1, 0): dict(handle=2)}, 1, "layer 1, tensor 'w': field handle"),
    ({(1, 0): dict(offset=5000)}, 1, "layer 1, tensor 'w': field offset"),
    ({(1, 0): dict(handle=1, offset=0), (2, 0): dict(handle=1, offset=40)}, 1, "overlap"),
])
def test_check_table_enforces_every_rule(changes, kind, match):
    args = dict(lo=1000, hi=2000) if kind == 0 else dict(handle_bytes=[4096, 4096])
    if match is None:
        assert check_table(_entries(changes), 2, 2, 4, kind, **args) == 8
    else:
        with pytest.raises(ContractError, match=match):
            check_table(_entries(changes), 2, 2, 4, kind, **args)


def test_a_version_1_region_is_refused_naming_both_versions(name):
    reg = make(name)
    struct.pack_into("<I", reg._mm, 8, 1)
    with pytest.raises(ContractError, match=r"version 1.*version 2"):
        EngineRegion.attach(name, 0)
    struct.pack_into("<I", reg._mm, 8, 2)
    reg.finish()


def test_bad_inputs_are_refused(name):
    with pytest.raises(ContractError):
        EngineRegion.create(name, 2, W, L, S, E, [default_layer(x) for x in range(L)], trivial())  # rank outside
    bad = trivial()
    bad[1, :] = 0
    with pytest.raises(ContractError, match="no slot"):
        EngineRegion.create(name, 0, W, L, S, E, [default_layer(x) for x in range(L)], bad)
    with pytest.raises(ContractError, match="counts"):
        make(name, counts="global")
    with pytest.raises(ContractError):
        region_path("a/b", 0)
    reg = make(name)
    with pytest.raises(ContractError, match="agree is required"):
        reg.at_step_boundary(0)
    reg.finish()


@pytest.mark.parametrize("bad,match", [("a/b", "letters"), ("", "letters"), ("é", "letters"), (".hidden", "start"),
                                       ("x" * 201, "at most 200"), ("a b", "letters")])
def test_names_the_worker_refuses_are_refused_clearly(bad, match):
    with pytest.raises(ContractError, match=match):
        EngineRegion.create(bad, 0, W, L, S, E, [default_layer(x) for x in range(L)], trivial())
    with pytest.raises(ContractError, match=match):
        cleanup(bad)
    assert region_path("x" * 200, 0)  # the longest name is fine


def test_a_region_larger_than_the_free_shm_is_refused_before_creating(name, monkeypatch):
    real = os.statvfs

    class Tiny:
        f_bavail, f_frsize = 2, 4096

    monkeypatch.setattr(R.os, "statvfs", lambda p: Tiny() if p == R.SHM_DIR else real(p))
    with pytest.raises(ContractError, match=r"needs \d+ bytes .* but /dev/shm has 8192 free"):
        make(name)
    assert not [f for f in os.listdir(R.SHM_DIR) if name in f]


def test_other_machines_are_refused_unless_overridden(name, monkeypatch):
    monkeypatch.setattr(R.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv(R.ARCH_OVERRIDE_ENV, raising=False)
    with pytest.raises(ContractError, match="aarch64.*x86-64.*compiled client"):
        make(name, backend="python")
    # Without the library, "auto" refuses too, saying why the library did not load.
    monkeypatch.setenv(_native.LIB_ENV, "/nonexistent/libeplb_client.so")
    _native.reset()
    try:
        with pytest.raises(ContractError, match="aarch64.*x86-64.*/nonexistent/libeplb_client.so does not exist"):
            make(name, backend="auto")
    finally:
        monkeypatch.undo()
        _native.reset()
    monkeypatch.setattr(R.platform, "machine", lambda: "aarch64")
    monkeypatch.setenv(R.ARCH_OVERRIDE_ENV, "1")
    make(name, backend="python").finish()


def test_native_without_the_library_is_refused_and_auto_falls_back(name, monkeypatch, tmp_path):
    not_a_lib = tmp_path / "libeplb_client.so"
    not_a_lib.write_text("not a shared object")
    for path, why in (("/nonexistent/libeplb_client.so", "does not exist"), (str(not_a_lib), "does not load")):
        monkeypatch.setenv(_native.LIB_ENV, path)
        _native.reset()
        try:
            with pytest.raises(ContractError, match=f"backend 'native': .*libeplb_client.so {why}"):
                make(name, backend="native")
            assert not [f for f in os.listdir(R.SHM_DIR) if name in f]
            reg = make(name, backend="auto")  # x86-64 here: the pure-Python writer
            assert reg.backend == "python"
            reg.finish()
        finally:
            _native.reset()
    monkeypatch.undo()
    _native.reset()


def test_the_compiled_core_needs_no_x86_64(name, monkeypatch):
    """The library's stores are atomic releases: "auto" and "native" take it on any machine."""
    lib, why = _native.load(R.VERSION)
    assert lib is not None, f"the compiled client does not load: {why}"
    monkeypatch.setattr(R.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv(R.ARCH_OVERRIDE_ENV, raising=False)
    for backend in ("auto", "native"):
        reg = make(name, backend=backend)
        assert reg.backend == "native"
        run_to(reg, 3)
        assert reg.engine_step == 3
        reg.finish()
    with pytest.raises(ContractError, match="backend 'gpu': one of auto, native, python"):
        make(name, backend="gpu")


# ---- special files and other jobs' files --------------------------------------------------------


def _bounded(fn):
    """Runs fn in a daemon thread; fails (instead of hanging the suite) if it blocks."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "blocked (on a FIFO?)"
    return out


def test_a_fifo_at_the_region_path_is_refused_without_hanging(name):
    path = region_path(name, 0)
    os.mkfifo(path, 0o600)
    out = _bounded(lambda: make(name))
    assert isinstance(out.get("error"), ContractError) and "not a regular file (a FIFO)" in str(out["error"])
    assert stat.S_ISFIFO(os.lstat(path).st_mode), "someone else's file was replaced"
    os.unlink(path)


def test_cleanup_never_hangs_and_removes_only_dead_regions_of_exactly_that_name(name):
    # A dead region of this name (rank 0), a FIFO (rank 1), a plain file (rank 2), another job's
    # dead region (NAME-b-0), a dead region of this name with a wrong rank inside, and a live one.
    def dead(nm, rank, as_rank=None):
        code = (f"import os, signal, sys; sys.path.insert(0, {ROOT!r}); import numpy as np\n"
                f"from eplb_client import EngineRegion, LayerTensor\n"
                f"reg = EngineRegion.create({nm!r}, {rank}, 8, 1, 2, 2, [[LayerTensor('w', np.zeros((2, 4), np.float32))]], "
                f"np.zeros((1, 16), np.int32) + np.arange(16) % 2)\n"
                f"reg.publish(); os.kill(os.getpid(), signal.SIGKILL)")
        assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -signal.SIGKILL
        if as_rank is not None:
            os.rename(region_path(nm, rank), region_path(nm, as_rank))

    dead(name, 0)
    dead(f"{name}-b", 0)
    dead(name, 3, as_rank=4)
    os.mkfifo(region_path(name, 1), 0o600)
    with open(region_path(name, 2), "wb") as f:
        f.write(b"not a region" * 20)
    live = EngineRegion.create(name, 5, 8, 1, 2, 2, [[LayerTensor("w", np.zeros((2, 4), np.float32))]],
                               np.zeros((1, 16), np.int32) + np.arange(16) % 2)
    live.publish()
    p = subprocess.run([sys.executable, "-m", "eplb_client", "cleanup", name], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["removed", region_path(name, 0)]
    left = sorted(f for f in os.listdir(R.SHM_DIR) if f"eplb-{name}" in f)
    assert left == sorted([f"eplb-{name}-b-0", f"eplb-{name}-1", f"eplb-{name}-2", f"eplb-{name}-4", f"eplb-{name}-5"])
    p = subprocess.run([sys.executable, "-m", "eplb_client", "status", name, "--ranks", "3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "rank 1: " in p.stdout and "is not a regular file" in p.stdout, p.stdout
    assert "rank 2: " in p.stdout and "shorter than the 4096-byte header" in p.stdout, p.stdout
    p = subprocess.run([sys.executable, "-m", "eplb_client", "cleanup", "a/b"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "region name" in p.stderr, p.stderr
    live.finish()
    assert cleanup(f"{name}-b") == [region_path(f"{name}-b", 0)]
    for r in (1, 2, 4):
        os.unlink(region_path(name, r))


CRASH = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {root!r})
from eplb_client import EngineRegion, LayerTensor
reg = EngineRegion.create({name!r}, 0, 1, 1, 2, 2, [[LayerTensor("w", np.zeros((2, 4), np.float32))]], np.array([[0, 1]]))
reg.publish()
{end}
"""


def _child(name, end):
    return subprocess.run([sys.executable, "-c", CRASH.format(root=ROOT, name=name, end=end)], timeout=60)


def _one(name):
    return EngineRegion.create(name, 0, 1, 1, 2, 2, [[LayerTensor("w", np.zeros((2, 4), np.float32))]],
                               np.array([[0, 1]]))


def test_normal_exit_and_uncaught_error_leave_nothing(name):
    assert _child(name, "pass").returncode == 0
    assert _child(name, "raise RuntimeError('engine bug')").returncode == 1
    assert not [f for f in os.listdir("/dev/shm") if name in f]


def test_crash_leftovers_are_cleaned_and_replaced(name):
    assert _child(name, "os.kill(os.getpid(), signal.SIGKILL)").returncode == -signal.SIGKILL
    path = region_path(name, 0)
    assert os.path.exists(path), "a SIGKILL leaves the region (documented)"
    # A new engine replaces a region whose engine is gone ...
    reg = _one(name)
    reg.publish()
    # ... but never one whose engine lives.
    with pytest.raises(ContractError, match="running engine"):
        _one(name)
    assert cleanup(name) == []  # alive: kept
    reg.finish()
    assert _child(name, "os.kill(os.getpid(), signal.SIGKILL)").returncode == -signal.SIGKILL
    assert cleanup(name) == [path] and not os.path.exists(path)

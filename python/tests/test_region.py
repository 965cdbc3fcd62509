"""The client alone, in one process: layout, load ring, placement, and the switch rules at a boundary."""

from __future__ import annotations

import os
import signal
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest

from eplb_client import (
    ACK_APPLIED,
    ACK_CANCELLED,
    ACK_MISSED,
    ACK_REJECTED,
    ContractError,
    EngineRegion,
    TensorSpec,
    cleanup,
    derive_log2phy,
    region_path,
)
from eplb_client import region as R

L, S, E, W = 3, 4, 6, 2  # layers, slots a rank, experts, engine ranks
TENSORS = [TensorSpec("w13", "f32", (8, 16)), TensorSpec("w2", "f32", (8, 8)), TensorSpec("scale", "bf16", (3,))]


@pytest.fixture
def name(request):
    n = f"pytest{os.getpid()}-{request.node.name[:20].replace('[', '_').replace(']', '_')}"
    yield n
    leftovers = [f for f in os.listdir(R.SHM_DIR) if f"eplb-{n}-" in f]
    for f in leftovers:
        os.unlink(os.path.join(R.SHM_DIR, f))
    assert not leftovers, f"left in /dev/shm: {leftovers}"


def trivial():
    return np.tile(np.arange(W * S, dtype=np.int32) % E, (L, 1))


def make(name, rank=0, publish=True):
    reg = EngineRegion.create(name, rank, W, L, S, E, TENSORS, trivial(), ring_len=16)
    for layer in range(L):
        raw = reg.raw_weights(layer)
        for s in range(S):
            raw[s] = layer * 16 + s
    if publish:
        reg.publish()
    return reg


def agree_alone(have):
    return have, have


def post(reg, cmd_id, layer, apply_step, epoch, row, mask, staging_value=200):
    """What a sidecar does: stage, then post under cmd_seq."""
    for s in np.flatnonzero(mask):
        reg.staging[s] = staging_value + s
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
        reg.record(t, np.zeros((L, S), np.int64))


def test_layout_matches_the_contract(name):
    reg = make(name, rank=1, publish=False)
    tmp = reg._tmp_path
    assert os.path.exists(tmp) and not os.path.exists(region_path(name, 1)), "published before publish()"
    reg.publish()
    path = region_path(name, 1)
    assert path == f"/dev/shm/eplb-{name}-1"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, "rb") as f:
        head = f.read(4096)
    magic, version, header_bytes, nl, spr, ne, ws, rank, ring_len = struct.unpack_from("<QIIIIIIII", head, 0)
    assert head[:8] == b"EPLBSHM1" and version == 1 and header_bytes == 4096
    assert (nl, spr, ne, ws, rank, ring_len) == (L, S, E, W, 1, 16)
    expert_bytes, ntens, kind, total = struct.unpack_from("<QIIQ", head, 40)
    offsets = struct.unpack_from("<7Q", head, 64)
    assert kind == 0 and ntens == 3 and total == os.path.getsize(path)
    assert expert_bytes % 64 == 0 and expert_bytes == 512 + 256 + 64
    assert offsets[1] == 64 + 64 * ((8 * L * S + 63) // 64)  # ring_entry_bytes
    for off in offsets[:1] + offsets[2:]:
        assert off % 64 == 0
    assert offsets[6] + S * expert_bytes <= total  # staging inside the file
    assert struct.unpack_from("<Q", head, 120)[0] == os.getpid()
    assert struct.unpack_from("<Q", head, 144)[0] == 1  # running once published
    name0, dtype0, off0, b0, nd0, _, d0, d1 = struct.unpack_from("<24s8sQQII2I", head, 1024)
    assert name0.rstrip(b"\0") == b"w13" and dtype0.rstrip(b"\0") == b"f32" and (off0, b0, nd0, d0, d1) == (0, 512, 2, 8, 16)
    name2, dtype2, off2, b2, nd2, _, d0, d1 = struct.unpack_from("<24s8sQQII2I", head, 1024 + 128)
    assert dtype2.rstrip(b"\0") == b"bf16" and (off2, b2, nd2, d0, d1) == (768, 6, 1, 3, 0)
    # The weights views are the region's bytes.
    reg.weights(2)["w2"][3] = 1.5
    assert np.all(reg.raw_weights(2)[3, 512:768].view(np.float32) == 1.5)
    assert reg.weights(0)["scale"].dtype == np.uint16
    reg.finish()
    assert not os.path.exists(path)


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
    assert int(entry[4]) == 19000, "the MoE time at byte 32 of the entry (minor 2)"
    with pytest.raises(ContractError):
        reg.record(5, np.zeros((L, S)))  # out of order
    other.close()
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
    experts = np.array([[0, 1], [0, 2], [1, 0]])
    tok = np.array([[10], [11], [12]])
    slots = p.replica_slot(1, experts, tok)
    for (i, k), slot in np.ndenumerate(slots):
        e = experts[i, k]
        assert p.phy2log[1, slot] == e
        assert slot == p.log2phy[1, e, (tok[i, 0] + 1) % p.logcnt[1, e]]
    reg.finish()


def test_command_applies_only_at_its_boundary_and_derives_the_placement(name):
    reg = make(name)
    before = reg.raw_weights(1).copy()
    row = swapped_row(reg, 1)
    post(reg, 1, layer=1, apply_step=3, epoch=1, row=row, mask=np.array([1, 1, 0, 0], np.uint8))
    for t in range(3):
        p = reg.at_step_boundary(t, agree_alone)
        assert p.applied == [] and np.array_equal(reg.raw_weights(1), before), f"applied before step 3 (at {t})"
        # the forward pass runs here: nothing may change under it
        reg.record(t, np.zeros((L, S), np.int64))
        assert np.array_equal(reg.raw_weights(1), before)
    p = reg.at_step_boundary(3, agree_alone)
    assert p.applied == [1] and ack(reg) == (1, ACK_APPLIED, 3)
    assert np.array_equal(p.phy2log[1], row) and p.epoch[1] == 1
    assert np.all(reg.raw_weights(1)[0] == 200) and np.all(reg.raw_weights(1)[1] == 201)
    assert np.array_equal(reg.raw_weights(1)[2:], before[2:])
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
    before = reg.raw_weights(0).copy()
    row = swapped_row(reg, 0)
    post(reg, 1, 0, 2, 1, row, np.array([1, 1, 0, 0], np.uint8))
    run_to(reg, 2)
    p = reg.at_step_boundary(2, lambda have: (0, have))  # another rank had nothing for step 2
    assert p.applied == [] and ack(reg) == (1, ACK_CANCELLED, 2)
    reg.record(2, np.zeros((L, S)))
    post(reg, 2, 0, 3, 1, row, np.array([1, 1, 0, 0], np.uint8))
    reg.at_step_boundary(3, lambda have: (0, 0))  # no other rank had it: cancelled
    assert ack(reg) == (2, ACK_CANCELLED, 3)
    reg.record(3, np.zeros((L, S)))
    post(reg, 3, 0, 3, 1, row, np.array([1, 1, 0, 0], np.uint8))  # posted after its boundary
    reg.at_step_boundary(4, agree_alone)
    assert ack(reg) == (3, ACK_MISSED, 4)
    assert np.array_equal(reg.raw_weights(0), before) and reg.placement().epoch[0] == 0
    reg.finish()


def test_a_post_cut_short_never_stalls_the_engine(name):
    reg = make(name)
    row = swapped_row(reg, 0)
    post(reg, 1, 0, 1, 1, row, np.array([1, 1, 0, 0], np.uint8))
    reg._h[R._W_CMD_SEQ] += 1  # odd: a sidecar killed or stopped in the middle of its next post
    run_to(reg, 5)  # returns: the engine did not wait
    assert reg.placement().epoch[0] == 0 and ack(reg) == (0, 0, 0)
    reg.finish()


@pytest.mark.parametrize("fault", ["epoch", "mask", "row", "layer"])
def test_invalid_commands_are_rejected_on_every_rank(name, fault):
    reg = make(name)
    before = reg.raw_weights(0).copy()
    row, mask, epoch, layer = swapped_row(reg, 0), np.array([1, 1, 0, 0], np.uint8), 1, 0
    if fault == "epoch":
        epoch = 2
    elif fault == "mask":
        mask[1] = 0  # slot 1 changes expert without a staged copy
    elif fault == "row":
        row[:] = 0  # experts 1.. have no slot
    else:
        layer = L
    post(reg, 1, layer, 0, epoch, row, mask)
    seen = []
    p = reg.at_step_boundary(0, lambda have: (seen.append(have), (have, have))[1])
    assert seen == [0], "an invalid command takes part in the agreement as no command"
    assert p.applied == [] and ack(reg) == (1, ACK_REJECTED, 0)
    assert np.array_equal(reg.raw_weights(0), before)
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


def test_bad_inputs_are_refused(name):
    with pytest.raises(ContractError):
        EngineRegion.create(name, 2, W, L, S, E, TENSORS, trivial())  # rank outside world
    bad = trivial()
    bad[1, :] = 0
    with pytest.raises(ContractError, match="no slot"):
        EngineRegion.create(name, 0, W, L, S, E, TENSORS, bad)
    with pytest.raises(ContractError):
        EngineRegion.create(name, 0, W, L, S, E, [TensorSpec("w", "f7", (2,))], trivial())
    with pytest.raises(ContractError):
        region_path("a/b", 0)
    reg = make(name)
    with pytest.raises(ContractError, match="agree is required"):
        reg.at_step_boundary(0)
    reg.finish()


CRASH = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {root!r})
from eplb_client import EngineRegion, TensorSpec
reg = EngineRegion.create({name!r}, 0, 1, 1, 2, 2, [TensorSpec("w", "f32", (4,))], np.array([[0, 1]]))
reg.publish()
{end}
"""


def _child(name, end):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    return subprocess.run([sys.executable, "-c", CRASH.format(root=root, name=name, end=end)], timeout=60)


def test_normal_exit_and_uncaught_error_leave_nothing(name):
    assert _child(name, "pass").returncode == 0
    assert _child(name, "raise RuntimeError('engine bug')").returncode == 1
    assert not [f for f in os.listdir("/dev/shm") if name in f]


def test_crash_leftovers_are_cleaned_and_replaced(name):
    assert _child(name, "os.kill(os.getpid(), signal.SIGKILL)").returncode == -signal.SIGKILL
    path = region_path(name, 0)
    assert os.path.exists(path), "a SIGKILL leaves the region (documented)"
    # A new engine replaces a region whose engine is gone ...
    reg = EngineRegion.create(name, 0, 1, 1, 2, 2, [TensorSpec("w", "f32", (4,))], np.array([[0, 1]]))
    reg.publish()
    # ... but never one whose engine lives.
    with pytest.raises(ContractError, match="running engine"):
        EngineRegion.create(name, 0, 1, 1, 2, 2, [TensorSpec("w", "f32", (4,))], np.array([[0, 1]]))
    assert cleanup(name) == []  # alive: kept
    reg.finish()
    assert _child(name, "os.kill(os.getpid(), signal.SIGKILL)").returncode == -signal.SIGKILL
    assert cleanup(name) == [path] and not os.path.exists(path)

"""``EngineRegion.step_end``: the end of a step in one call (record + the next boundary), compiled
(``eplb_client._fast`` on the native backend) or not. It must do exactly what ``record`` then
``at_step_boundary(step + 1)`` do: the same ring entries, answers, placements, layers applied and
agree calls, and the same errors with the same messages."""

from __future__ import annotations

import os
import stat
from typing import Any, Callable, List, Tuple

import numpy as np
import pytest

from eplb_client import ACK_APPLIED, ACK_CANCELLED, ACK_MISSED, ACK_REJECTED, ContractError, EngineRegion, LayerTensor
from eplb_client import region as R

L, S, E, W = 3, 4, 6, 2
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
IN_REPO = os.path.isfile(os.path.join(ROOT, "Cargo.toml")) and os.path.isdir(os.path.join(ROOT, "client"))
NATIVE = R._choose_backend(None)[1] is not None  # the default backend is the compiled core


@pytest.fixture
def name(request):
    n = f"pytest{os.getpid()}-{request.node.name[:24].replace('[', '_').replace(']', '_')}"
    yield n
    leftovers = [f for f in os.listdir(R.SHM_DIR) if f"eplb-{n}-" in f]
    for f in leftovers:
        p = os.path.join(R.SHM_DIR, f)
        if stat.S_ISREG(os.lstat(p).st_mode):
            os.unlink(p)
    assert not leftovers, f"left in /dev/shm: {leftovers}"


def make(name: str, backend: str | None = None) -> EngineRegion:
    layers = [[LayerTensor("w", np.repeat(np.arange(S, dtype=np.uint8)[:, None] + layer * 16, 16, axis=1))]
              for layer in range(L)]
    reg = EngineRegion.create(name, 0, W, L, S, E, layers, np.tile(np.arange(W * S, dtype=np.int32) % E, (L, 1)),
                              ring_len=16, backend=backend)
    reg.publish()
    return reg


def post(reg: EngineRegion, cmd_id: int, layer: int, apply_step: int, epoch: int, mask=(1, 1, 0, 0),
         swap: bool = True) -> None:
    """What a sidecar does: stage rows, then post under cmd_seq (slots 0 and 1 exchange experts)."""
    row = reg.placement().phy2log[layer].copy()
    if swap:
        row[0], row[1] = row[1], row[0]
    for s in np.flatnonzero(mask):
        reg.write_expert(reg.num_layers, int(s), bytes([200 + s]) * reg.expert_bytes)
    h = reg._h
    seq = int(h[R._W_CMD_SEQ])
    h[R._W_CMD_SEQ] = seq + 1
    h[R._W_CMD_ID], h[R._W_CMD_LAYER], h[R._W_CMD_APPLY_STEP], h[R._W_CMD_EPOCH] = cmd_id, layer, apply_step, epoch
    reg._cmd_row[:] = row
    reg._cmd_mask[:] = np.array(mask, np.uint8)
    h[R._W_CMD_SEQ] = seq + 2


def ack(reg: EngineRegion) -> Tuple[int, int, int]:
    h = reg._h
    return int(h[R._W_ACK_ID]), int(h[R._W_ACK_RESULT]), int(h[R._W_ACK_STEP])


# A script of 14 steps: at the start of step t (before its end), what the sidecar posts; and what
# the other engine rank has at each boundary (None: the same as this rank).
POSTS = {1: (1, 0, 3, 1), 4: (2, 1, 5, 1), 6: (3, 0, 6, 2), 7: (4, 2, 9, 1), 10: (5, 1, 11, 5)}
OTHER_LACKS = {9}  # the boundary of step 9: another rank lacks command 4 -> cancelled


def drive(reg: EngineRegion, by_step_end: bool, compiled: bool | None = None) -> List[Any]:
    """Runs the script; returns what every step observed."""
    seen: List[Any] = []
    haves: List[int] = []

    def agree(have: int) -> Tuple[int, int]:
        haves.append(have)
        step = reg.engine_step
        return (0, have) if step in OTHER_LACKS else (have, have)

    counts = np.zeros((L, S), np.int64)
    end: Callable[..., int] | None = reg.step_end(counts, agree, compiled=compiled) if by_step_end else None
    reg.at_step_boundary(0, agree)
    for t in range(14):
        if t in POSTS:
            cmd_id, layer, apply_step, epoch = POSTS[t]
            # command 3 is for a boundary already passed when it is posted (missed); command 5
            # has a wrong epoch (rejected)
            post(reg, cmd_id, layer, apply_step, epoch)
        counts[:] = np.arange(L * S).reshape(L, S) * (t + 1)
        if end is not None:
            layer_applied = end(t, "prefill" if t % 3 == 0 else "decode", 100 + t, 7 * t)
        else:
            reg.record(t, counts, "prefill" if t % 3 == 0 else "decode", 100 + t, 7 * t)
            applied = reg.at_step_boundary(t + 1, agree).applied
            layer_applied = applied[0] if applied else -1
        p = reg.placement()
        entry = reg.read_step(t)
        assert entry is not None
        seen.append((t, layer_applied, ack(reg), entry[0], entry[1], entry[2].tolist(), p.phy2log.tolist(),
                     p.log2phy.tolist(), p.logcnt.tolist(), p.epoch.tolist(), reg.engine_step,
                     [reg.read_expert(layer, s) for layer in range(L) for s in range(S)]))
    seen.append(("agree", haves))
    return seen


@pytest.mark.parametrize("compiled", [None, False])
def test_step_end_does_what_record_and_the_next_boundary_do(name, compiled):
    ref = make(name + "r")
    want = drive(ref, by_step_end=False)
    ref.finish()
    reg = make(name)
    got = drive(reg, by_step_end=True, compiled=compiled)
    reg.finish()
    assert got == want
    results = [s[2] for s in want[:-1]]
    assert (1, ACK_APPLIED, 3) in results and (2, ACK_APPLIED, 5) in results
    assert (3, ACK_MISSED, 7) in results and (4, ACK_CANCELLED, 9) in results
    assert (5, ACK_REJECTED, 11) in results
    assert want[-1][1].count(0) == 15 - 3 and len(want[-1][1]) == 15, "agree once a boundary"


@pytest.mark.skipif(not IN_REPO, reason="outside the eplb repository the compiled step is optional")
def test_the_compiled_step_is_built_and_taken_here():
    # In the repository python/setup.py builds it (scripts/pyvenv.sh's editable install): a
    # missing compiler or missing Python headers must fail here, not fall back unseen.
    assert R._fast is not None, "eplb_client._fast was not built: see python/setup.py"


@pytest.mark.skipif(not NATIVE or R._fast is None, reason="the compiled step needs the native backend")
def test_compiled_step_end_is_the_c_step_and_detaches_at_close(name):
    reg = make(name)
    end = reg.step_end(np.zeros((L, S), np.uint64), lambda h: (h, h), compiled=True)
    assert type(end).__name__ == "StepEnd" and end.attached
    reg.at_step_boundary(0, lambda h: (h, h))
    assert end(0) == -1 and reg.engine_step == 1
    reg.finish()
    assert not end.attached, "the library's pointer is gone with the region"
    with pytest.raises(ContractError, match="closed"):
        end(1)


@pytest.mark.parametrize("compiled", [None, False])
def test_step_end_errors_are_records_and_boundarys_errors(name, compiled):
    reg = make(name)
    counts = np.zeros((L, S), np.int64)
    answers: List[Any] = [(0, 0)]
    end = reg.step_end(counts, lambda have: answers[0], compiled=compiled)
    reg.at_step_boundary(0, lambda h: (h, h))
    with pytest.raises(ContractError, match="engine_step is 0"):
        end(1)
    counts[1, 2] = -4
    with pytest.raises(ContractError, match=r"-4 at \(1, 2\) is negative"):
        end(0)
    counts[1, 2] = 1 << 41
    with pytest.raises(ContractError, match="beyond"):
        end(0)
    counts[1, 2] = 0
    with pytest.raises(ContractError, match="phase 'bogus'"):
        end(0, "bogus")
    with pytest.raises(ContractError, match="tokens"):
        end(0, "decode", -1)
    assert reg.engine_step == 0 and reg.read_step(0) is None, "nothing recorded by a refused call"
    answers[0] = ("x", 1)
    with pytest.raises(ContractError, match="agree returned"):
        end(0)
    assert reg.engine_step == 1, "the record before the boundary stands"
    answers[0] = (np.uint64(0), np.int64(0))  # numpy integers are integers
    assert end(1, phase="mixed", tokens=3, moe_ns=4) == -1
    assert reg.read_step(1)[:2] == (R.PHASES["mixed"], 3)
    reg.finish()


def test_step_end_refuses_a_counts_buffer_it_cannot_read_each_step(name):
    reg = make(name)
    agree = lambda h: (h, h)  # noqa: E731
    for bad, match in [(np.zeros((L, S), np.int32), "int64 or uint64"), (np.zeros((L, S + 1), np.int64), "shape"),
                       (np.zeros((S, L), np.int64).T, "C-contiguous"), ([[0] * S] * L, "list"),
                       (np.zeros((L, S), ">i8"), "int64 or uint64")]:
        with pytest.raises(ContractError, match=match):
            reg.step_end(bad, agree)
    with pytest.raises(ContractError, match="agree is required"):
        reg.step_end(np.zeros((L, S), np.int64), None)
    reg.finish()
    with pytest.raises(ContractError, match="closed"):
        reg.step_end(np.zeros((L, S), np.int64), agree, compiled=None if not NATIVE else True)


def test_compiled_true_says_why_it_cannot(name):
    reg = make(name, backend="python")
    with pytest.raises(ContractError, match="pure-Python backend"):
        reg.step_end(np.zeros((L, S), np.int64), lambda h: (h, h), compiled=True)
    reg.finish()

"""The reference engine: exact MoE math in-process, and N engine ranks under mpirun beside the fake
sidecar, for the switch protocol's four invariants."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from eplb_client import cleanup
from eplb_engine import loads, model, quant

HERE = os.path.dirname(os.path.abspath(__file__))
PYROOT = os.path.join(HERE, "..")
SHAPE = model.ModelShape(num_layers=2, num_experts=8, hidden=64, ffn=64, top_k=2)


# ---- the math, in one process -------------------------------------------------------------


def test_expert_rows_do_not_depend_on_their_batch():
    w13, w2 = model.expert_weights(0, 1, 3, SHAPE)
    x = model.tokens(0, 5, 97, SHAPE)
    whole = model.expert_forward(x, w13, w2, SHAPE.gate_scale)
    for batch in ([0], [5, 1, 96], list(range(0, 97, 2)), list(range(96, -1, -1))):
        part = model.expert_forward(x[batch], w13, w2, SHAPE.gate_scale)
        assert np.array_equal(part.view(np.uint32), whole[batch].view(np.uint32))
    assert np.all(whole == np.round(whole)) and np.abs(whole).max() < 2**24
    assert len(np.unique(whole)) > 50, "the expert computes something"


def test_reference_layer_detects_a_wrong_expert():
    x = model.tokens(0, 0, 64, SHAPE)
    w13 = np.stack([model.expert_weights(0, 0, e, SHAPE)[0] for e in range(8)])
    w2 = np.stack([model.expert_weights(0, 0, e, SHAPE)[1] for e in range(8)])
    wr = model.router_weights(0, 0, SHAPE)
    ids, w = model.route(x, wr, np.log(np.full(8, 1 / 8)), model.noise_scale_for(SHAPE, 1.0), 2)
    assert w.min() >= 0 and np.all(w.sum(axis=1) >= 63)
    ref = model.reference_layer(x, ids, w, w13, w2, SHAPE.gate_scale)
    # The same pairs, expert by expert in another order and batch, combine to the same bits.
    y = np.stack([np.stack([model.expert_forward(x[i : i + 1], w13[ids[i, k]], w2[ids[i, k]], SHAPE.gate_scale)[0]
                            for k in range(2)]) for i in range(64)])
    assert np.array_equal(model.combine(y, w).view(np.uint32), ref.view(np.uint32))
    swapped = w13.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert not np.array_equal(model.reference_layer(x, ids, w, swapped, w2, SHAPE.gate_scale), ref)


def test_router_follows_the_load():
    shape = model.ModelShape(num_layers=1, num_experts=16, top_k=1)
    p = np.linspace(1, 16, 16) ** 2
    x = model.tokens(0, 0, 4000, shape)
    ids, _ = model.route(x, model.router_weights(0, 0, shape), loads.log_probs(p), model.noise_scale_for(shape, 1.0), 1)
    counts = np.bincount(ids[:, 0], minlength=16)
    assert np.corrcoef(counts, p)[0, 1] > 0.9 and counts[-1] > 5 * counts[0]


def test_trace_csv_reads_the_qwen_trace():
    path = os.path.join(PYROOT, "..", "..", "shared", "traces", "harmoeny_qwen15moe_switch", "expert_freq_qwen_policy_datasets.csv")
    if not os.path.exists(path):
        path = "/work/shared/traces/harmoeny_qwen15moe_switch/expert_freq_qwen_policy_datasets.csv"
    if not os.path.exists(path):
        pytest.skip("shared/ traces not beside the checkout")
    a = loads.read_trace(path, "wikitext")
    assert a.shape == (20, 12, 60) and a[0, 0].sum() == 98304
    with pytest.raises(loads.LoadError, match="no dataset"):
        loads.read_trace(path, "nope")


# ---- the experts' tensors in the engines' layouts (--quant) --------------------------------


def test_quant_layouts_have_the_engines_names_and_shapes():
    names = {q: [(t.name, t.shape, t.kind) for t in quant.layout(q, 64, 32, 8, 16)] for q in quant.QUANTS}
    assert names["none"] == [("w13_weight", (64, 64), "expert"), ("w2_weight", (64, 32), "expert")]
    assert names["fp8-block"] == names["none"] + [("w13_weight_scale_inv", (4, 4), "expert"),
                                                  ("w2_weight_scale_inv", (4, 2), "expert")]
    assert names["nvfp4"] == [("w13_weight", (64, 32), "expert"), ("w2_weight", (64, 16), "expert"),
                              ("w13_weight_scale", (64, 4), "expert"), ("w2_weight_scale", (64, 2), "expert"),
                              ("w13_weight_scale_2", (2,), "expert"), ("w2_weight_scale_2", (), "expert"),
                              ("w13_input_scale", (8, 2), "global"), ("w2_input_scale", (8,), "global")]
    # DeepSeek-V3's FP8 table (H 7168, I 2048, 128 x 128 blocks): 44,050,944 bytes an expert.
    ds = quant.layout("fp8-block", 7168, 2048, 256)
    assert [t.shape for t in ds] == [(4096, 7168), (7168, 2048), (32, 56), (56, 16)]
    assert quant.expert_bytes(ds) == 44_050_944
    # Blocks need not divide the shape (ceil), the gate and up halves are blocked apart.
    assert quant.layout("fp8-block", 64, 40, 8, 32)[2].shape == (4, 2)
    with pytest.raises(ValueError, match="nvfp4 needs"):
        quant.layout("nvfp4", 64, 40, 8)
    with pytest.raises(ValueError, match="one of"):
        quant.layout("int4", 64, 64, 8)


def test_a_padded_tensor_has_a_row_stride_larger_than_its_row():
    t = next(t for t in quant.layout("nvfp4", 64, 32, 8) if t.pad)
    a = quant.alloc(t, 5)
    assert a.shape == (5,) + t.shape and a.strides[0] == t.row_bytes + t.pad > t.row_bytes
    a[3] = 7
    base = np.lib.stride_tricks.as_strided(a, (5, t.row_bytes + t.pad), (a.strides[0], 1))
    assert np.all(base[3, : t.row_bytes] == 7) and np.all(base[3, t.row_bytes :] == 0), "rows, not the padding"


@pytest.mark.parametrize("q", quant.QUANTS)
@pytest.mark.parametrize("block", [128, 24])
def test_dequantised_tensors_are_the_reference_weights_exactly(q, block):
    shape = model.ModelShape(num_layers=2, num_experts=8, hidden=64, ffn=48, top_k=2)
    views = {t.name: quant.alloc(t, 3) for t in quant.layout(q, 64, 48, 8, block) if t.kind == "expert"}
    refs = []
    for s, e in enumerate([5, 0, 2]):
        tensors, w13, w2 = quant.expert_tensors(q, 3, 1, e, shape, block)
        assert set(tensors) == set(views)
        for name, a in tensors.items():
            views[name][s] = a
        refs.append((w13, w2))
        assert np.all(w13 == np.round(w13)) and np.abs(w13).max() <= model.WMAX and len(np.unique(w13)) >= 9
    if q != "nvfp4":
        assert np.array_equal(refs[0][0], model.expert_weights(3, 1, 5, shape)[0]), "the unquantised model's weights"
    w13, w2 = quant.dequant(q, views, np.array([2, 0, 1]), shape, block)
    for i, s in enumerate([2, 0, 1]):
        assert np.array_equal(w13[i], refs[s][0]) and np.array_equal(w2[i], refs[s][1])


@pytest.mark.parametrize("q", quant.QUANTS)
def test_every_per_expert_tensor_left_behind_changes_the_weights(q):
    """What vLLM #34646 and SGLang #13715 were: a mover that moves the weights but not a scale.
    Moving every per-expert tensor of expert B into A's slot but one must give weights that are
    neither A's nor B's."""
    shape = model.ModelShape(num_layers=1, num_experts=16, hidden=64, ffn=32, top_k=2)
    layout = [t for t in quant.layout(q, 64, 32, 16, 16) if t.kind == "expert"]
    experts = [quant.expert_tensors(q, 0, 0, e, shape, 16) for e in range(16)]
    for t in layout:
        # Two experts whose tensor t differs (a per-expert scale_2 has 3 values: some pairs agree).
        b = next(e for e in range(1, 16) if not np.array_equal(experts[e][0][t.name], experts[0][0][t.name]))
        views = {u.name: quant.alloc(u, 1) for u in layout}
        for u in layout:
            views[u.name][0] = experts[0 if u.name == t.name else b][0][u.name]
        w13, w2 = quant.dequant(q, views, np.array([0]), shape, 16)
        for e in (0, b):
            assert not (np.array_equal(w13[0], experts[e][1]) and np.array_equal(w2[0], experts[e][2])), (t.name, e)


def test_input_scales_fold_into_the_expert_exactly():
    w13, w2 = model.expert_weights(0, 1, 3, SHAPE)
    x = model.tokens(0, 5, 33, SHAPE)
    plain = model.expert_forward(x, w13, w2, SHAPE.gate_scale)
    for in13, in2 in ((0.5, 2.0), (2.0, 0.5), (1.0, 2.0)):
        y = model.expert_forward(x, w13, w2, SHAPE.gate_scale, np.float32(in13), np.float32(in2))
        assert np.array_equal(y.view(np.uint32), plain.view(np.uint32))


def test_fp8_and_bf16_codecs_are_exact_and_refuse_inexact_values():
    v = np.array([0, 1, -1, 0.25, 1.75, -28, 448, 2.0**-9], np.float32)
    assert np.array_equal(quant.E4M3[quant.e4m3_encode(v)], v)
    with pytest.raises(ValueError):
        quant.e4m3_encode(np.array([1.1], np.float32))
    w = np.arange(-7, 8, dtype=np.float32)
    assert np.array_equal(quant.bf16_decode(quant.bf16_encode(w)), w)
    with pytest.raises(ValueError):
        quant.bf16_encode(np.array([1 + 2.0**-10], np.float32))
    codes = np.arange(16, dtype=np.uint8).reshape(2, 8)
    assert np.array_equal(quant.fp4_unpack(quant.fp4_pack(codes)), codes)


# ---- engine ranks under mpirun beside the fake sidecar -------------------------------------

mpi = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")


def mpirun(n):
    env_flags = ["--oversubscribe"]
    if os.getuid() == 0:
        env_flags.append("--allow-run-as-root")
    return ["mpirun", "-n", str(n)] + env_flags


class Run:
    def __init__(self, tmp_path, name, ranks=2, steps=60, engine_flags=(), sidecar_flags=(), sidecar=True,
                 sidecar_script="fake_sidecar.py"):
        self.name, self.ranks, self.tmp = name, ranks, tmp_path
        self.report = tmp_path / "engine.json"
        self.sidecar_log = tmp_path / "sidecar.log"
        env = dict(os.environ, PYTHONPATH=PYROOT, OPENBLAS_NUM_THREADS="1")
        self.engine = subprocess.Popen(
            mpirun(ranks) + [sys.executable, "-m", "eplb_engine", "--name", name, "--steps", str(steps),
                             "--num-layers", "3", "--num-experts", "8", "--tokens", "96", "--drift-steps", "40",
                             "--wait-sidecar", "60" if sidecar else "0", "--report", str(self.report), *engine_flags],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sidecar = None
        if sidecar:
            self.sidecar = subprocess.Popen(
                [sys.executable, os.path.join(HERE, sidecar_script), "--name", name, "--ranks", str(ranks),
                 "--every", "2", "--log", str(self.sidecar_log), *sidecar_flags],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def commands(self):
        return self.sidecar_log.read_text().splitlines() if self.sidecar_log.exists() else []

    def finish(self, timeout=240):
        try:
            out, _ = self.engine.communicate(timeout=timeout)
        finally:
            if self.engine.poll() is None:
                self.engine.kill()
        side_out, side_rc = "", None
        if self.sidecar is not None:
            try:
                side_out, _ = self.sidecar.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.sidecar.kill()  # a stopped or hung fake: SIGKILL works on stopped processes too
                side_out, _ = self.sidecar.communicate(timeout=30)
            side_rc = self.sidecar.returncode
        report = json.loads(self.report.read_text()) if self.report.exists() else None
        # Ranks that mpirun ended with SIGKILL leave their regions (crash leftovers): cleanup()
        # removes those whose engine is gone; wait (bounded) until every rank has gone.
        removed, deadline = [], time.monotonic() + 20
        while True:
            removed += cleanup(self.name)
            if not [f for f in os.listdir("/dev/shm") if f"eplb-{self.name}-" in f] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return self.engine.returncode, out, report, side_rc, side_out, removed


def assert_consistent(report, steps):
    assert report["engine_steps"] == steps
    assert report["outputs_match"], report["mismatched_steps"]
    assert report["commit_step_disagreements"] == 0
    assert report["placements_agree"]
    assert report["wrong_bytes"] == 0


@mpi
@pytest.mark.parametrize("client_step", ["one-call", "two-calls"])
def test_healthy_sidecar_moves_layers_and_outputs_match(tmp_path, client_step):
    # one-call: EngineRegion.step_end after each forward pass (the compiled step where it is
    # built); two-calls: at_step_boundary before it, record after it. The same switches either way.
    run = Run(tmp_path, f"pyt{os.getpid()}h{client_step[0]}", ranks=3, steps=60,
              engine_flags=["--client-step", client_step])
    rc, out, report, side_rc, side_out, removed = run.finish()
    assert rc == 0, out
    assert report["client_step"] == client_step
    assert_consistent(report, 60)
    assert report["layers_committed"] >= 5, (report, run.commands())
    assert side_rc == 0, side_out
    assert removed == [], "a normal exit leaves nothing in /dev/shm"
    # (a): every rank switched each layer at one step, the one the sidecar posted
    posted = {int(line.split()[1]): int(line.split()[5]) for line in run.commands() if "results [1, 1, 1]" in line}
    assert sorted(c[0] for c in report["commits"]) == sorted(posted.values())


@mpi
@pytest.mark.parametrize("fault", ["die-after-posting", "die-mid-post", "die-mid-stage"])
def test_sidecar_killed_at_any_moment_engine_goes_on(tmp_path, fault):
    flags = ["--fault-at-move", "3"] + (["--die-after-posting", "1"] if fault == "die-after-posting" else [f"--{fault}"])
    run = Run(tmp_path, f"pyt{os.getpid()}k{fault[4:8]}", ranks=2, steps=40, sidecar_flags=flags)
    rc, out, report, side_rc, side_out, _ = run.finish()
    assert side_rc == -signal.SIGKILL
    assert rc == 0, out
    assert_consistent(report, 40)
    assert report["layers_committed"] == 2, "the two healthy moves, and nothing of the third"


@mpi
@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7])
def test_sidecar_stopped_at_any_moment_engine_goes_on(tmp_path, delay):
    run = Run(tmp_path, f"pyt{os.getpid()}s{int(delay * 10)}", ranks=2, steps=50,
              engine_flags=["--step-delay-ms", "20"], sidecar_flags=["--every", "1"])
    deadline = time.monotonic() + 120
    while not run.commands() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay * 0.05)
    run.sidecar.send_signal(signal.SIGSTOP)
    rc, out, report, side_rc, _, _ = run.finish()
    assert rc == 0, out
    assert_consistent(report, 50)
    assert report["layers_committed"] >= 1


@mpi
def test_engine_rank_dies_sidecar_exits_nonzero_nothing_half_applied(tmp_path):
    run = Run(tmp_path, f"pyt{os.getpid()}d", ranks=2, steps=200, engine_flags=["--die-at-step", "25", "--die-rank", "1"])
    rc, out, report, side_rc, side_out, removed = run.finish()
    assert rc != 0 and report is None
    assert side_rc == 1, side_out
    assert "engine rank" in side_out and ("died" in side_out or "stopped" in side_out), side_out
    assert "live placements the same on every rank" in side_out, side_out
    assert removed, "the SIGKILLed rank's region is a crash leftover that cleanup() removes"


@mpi
def test_weights_written_outside_the_protocol_are_caught(tmp_path):
    run = Run(tmp_path, f"pyt{os.getpid()}w", ranks=2, steps=30, sidecar_flags=["--write-live", "--fault-at-move", "1"])
    rc, out, report, side_rc, _, _ = run.finish()
    assert rc != 0
    assert not report["outputs_match"] and report["mismatched_steps"], "the output check must fail"


@mpi
def test_engine_alone_static_equals_live(tmp_path):
    run = Run(tmp_path, f"pyt{os.getpid()}a", ranks=2, steps=10, sidecar=False)
    rc, out, report, *_ = run.finish()
    assert rc == 0, out
    assert_consistent(report, 10)
    assert report["layers_committed"] == 0
    assert report["balancedness_live"] == report["balancedness_static"] < 1.0


@mpi
@pytest.mark.parametrize("q", quant.QUANTS)
def test_each_quant_beside_the_fake_sidecar(tmp_path, q):
    """Every scheme's tensors move row by row with their experts: outputs match the reference at
    every step, every per-expert tensor of every applied slot is the expert's, and the global
    tensors (nvfp4's input scales) are never written."""
    run = Run(tmp_path, f"pyt{os.getpid()}q{q[:3]}", ranks=2, steps=40, engine_flags=["--quant", q, "--fp8-block", "32"])
    rc, out, report, side_rc, side_out, removed = run.finish()
    assert rc == 0, out
    assert_consistent(report, 40)
    assert report["quant"] == q and report["tensors_per_layer"] == {"none": 2, "fp8-block": 4, "nvfp4": 8}[q]
    assert report["layers_committed"] >= 5, (report, run.commands())
    assert report["global_bytes_changed"] == 0
    assert side_rc == 0, side_out
    assert removed == []


@mpi
@pytest.mark.parametrize("q,skip", [("fp8-block", "w13_weight_scale_inv"), ("nvfp4", "w2_weight_scale_2")])
def test_a_mover_that_leaves_a_scale_behind_is_caught(tmp_path, q, skip):
    """The protocol cannot see a tensor left behind (every staged byte matches what was sent): the
    engine's output check and its applied-bytes check must."""
    run = Run(tmp_path, f"pyt{os.getpid()}l{q[:3]}", ranks=2, steps=30, engine_flags=["--quant", q, "--fp8-block", "32"],
              sidecar_flags=["--skip", skip], sidecar_script="lazy_sidecar.py")
    rc, out, report, side_rc, side_out, _ = run.finish()
    assert side_rc == 0, side_out
    assert rc == 1, out
    assert report["layers_committed"] >= 1 and report["commit_step_disagreements"] == 0
    assert not report["outputs_match"] and report["mismatched_steps"], "the output check must fail"
    assert report["wrong_bytes"] > 0 and report["global_bytes_changed"] == 0

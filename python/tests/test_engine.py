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
from eplb_engine import loads, model

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


# ---- engine ranks under mpirun beside the fake sidecar -------------------------------------

mpi = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")


def mpirun(n):
    env_flags = ["--oversubscribe"]
    if os.getuid() == 0:
        env_flags.append("--allow-run-as-root")
    return ["mpirun", "-n", str(n)] + env_flags


class Run:
    def __init__(self, tmp_path, name, ranks=2, steps=60, engine_flags=(), sidecar_flags=(), sidecar=True):
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
                [sys.executable, os.path.join(HERE, "fake_sidecar.py"), "--name", name, "--ranks", str(ranks),
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
def test_healthy_sidecar_moves_layers_and_outputs_match(tmp_path):
    run = Run(tmp_path, f"pyt{os.getpid()}h", ranks=3, steps=60)
    rc, out, report, side_rc, side_out, removed = run.finish()
    assert rc == 0, out
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

"""scripts/engine_demo.sh --quant: the reference engine's quantised tensor tables beside the fake
sidecar (the script's plumbing) and beside the real `eplb-worker` (issue 19's CPU goal: 4 ranks,
the Qwen1.5 trace, fp8-block and nvfp4)."""

from __future__ import annotations

import os
import subprocess

import pytest
from test_demo import QWEN, ROOT, demo, needs_mpi, needs_trace, needs_worker


@needs_mpi
@pytest.mark.parametrize("q", ["fp8-block", "nvfp4"])
def test_demo_quant_with_fake_sidecar(tmp_path, q):
    rc, out, r = demo(tmp_path, "--sidecar", "fake", "--ranks", "2", "--steps", "30", "--interval-steps", "2",
                      "--quant", q, "--fp8-block", "32")
    assert rc == 0, out
    assert r["outputs_match"] and r["engine_steps"] == 30 and r["layers_committed"] >= 3, out
    assert r["quant"] == q and r["tensors_per_layer"] == {"fp8-block": 4, "nvfp4": 8}[q]
    assert r["wrong_bytes"] == 0 and r["global_bytes_changed"] == 0
    assert f"quant {q}: tensors_per_layer" in out and "global_bytes_changed 0" in out


def test_demo_rejects_an_unknown_quant():
    p = subprocess.run([os.path.join(ROOT, "scripts", "engine_demo.sh"), "--quant", "int4"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "--quant none|fp8-block|nvfp4" in p.stderr


@needs_mpi
@needs_worker
@needs_trace
@pytest.mark.parametrize("q", ["fp8-block", "nvfp4"])
def test_demo_qwen_4_ranks_quantised_balances_with_matching_outputs(tmp_path, q):
    """Issue 19's CPU goal: every per-expert tensor moves with its expert (outputs bitwise equal to
    the reference at every step, no wrong byte), the globals stay put, and balance improves."""
    rc, out, r = demo(tmp_path, "--ranks", "4", "--steps", "200", "--trace", QWEN, "--trace-dataset", "wikitext",
                      "--quant", q)
    assert rc == 0, out
    assert r["outputs_match"] and r["engine_steps"] == 200
    assert r["sidecar_exit_code"] == 0 and r["engine_exit_code"] == 0, out
    assert r["layers_committed"] >= 1 and r["commit_step_disagreements"] == 0 and r["wrong_bytes"] == 0
    assert r["global_bytes_changed"] == 0
    assert r["balancedness_live"] >= r["balancedness_static"] + 0.1, r


def worker_has_force_moves() -> bool:
    from test_demo import WORKER, worker_has_shm

    if not worker_has_shm():
        return False
    out = subprocess.run([WORKER, "run", "--help"], capture_output=True, text=True, timeout=60)
    return "--force-moves" in out.stdout


needs_force = pytest.mark.skipif(not worker_has_force_moves(), reason="eplb-worker without run --force-moves (build the Rust side)")


@needs_mpi
@needs_force
@pytest.mark.parametrize("q", ["none", "fp8-block", "nvfp4"])
def test_one_rank_forced_moves_move_every_tensor(tmp_path, q):
    """The one-GPU benchmark's flow on the CPU engine (world size 1): the worker forces placements
    inside the rank (slots rotated, replicas replaced); every applied slot holds the named expert
    in every per-expert tensor and the outputs still equal the reference."""
    import json
    import sys

    from test_demo import WORKER

    name = f"pytforce{os.getpid()}{q[:3]}"
    report = tmp_path / "engine.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), OPENBLAS_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    engine = subprocess.Popen([sys.executable, "-m", "eplb_engine", "--name", name, "--steps", "30", "--num-layers", "3",
                               "--num-experts", "8", "--slots-per-rank", "9", "--tokens", "64", "--quant", q,
                               "--fp8-block", "16", "--wait-sidecar", "60", "--report", str(report)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    side = subprocess.run(["mpirun", "-n", "1", WORKER, "run", "--engine", f"shm:{name}", "--steps", "30",
                           "--force-moves", "2"], env=env, capture_output=True, text=True, timeout=300)
    out, _ = engine.communicate(timeout=300)
    assert engine.returncode == 0, out
    assert side.returncode == 0, side.stdout + side.stderr
    r = json.loads(report.read_text())
    assert r["outputs_match"] and r["wrong_bytes"] == 0 and r["global_bytes_changed"] == 0
    assert r["layers_committed"] >= 8, r["commits"]

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

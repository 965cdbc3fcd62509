"""scripts/engine_demo.sh: the reference engine beside the real `eplb-worker run --engine shm:NAME`
(skipped until target/release/eplb-worker has the shm engine), and beside the fake sidecar."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WORKER = os.environ.get("EPLB_WORKER", os.path.join(ROOT, "target", "release", "eplb-worker"))
QWEN = os.path.join(ROOT, "..", "shared", "traces", "harmoeny_qwen15moe_switch", "expert_freq_qwen_policy_datasets.csv")
if not os.path.exists(QWEN):
    QWEN = "/work/shared/traces/harmoeny_qwen15moe_switch/expert_freq_qwen_policy_datasets.csv"


def worker_has_shm() -> bool:
    if not os.access(WORKER, os.X_OK):
        return False
    out = subprocess.run([WORKER, "run", "--help"], capture_output=True, text=True, timeout=60)
    return "shm:" in out.stdout


needs_mpi = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
needs_worker = pytest.mark.skipif(not worker_has_shm(), reason="eplb-worker without --engine shm:NAME (build the Rust side)")
needs_trace = pytest.mark.skipif(not os.path.exists(QWEN), reason="shared/ traces not beside the checkout")


def demo(tmp_path, *flags, sidecar_flags=(), engine_flags=(), env_extra=None, extra_keys=(), prefix="pytdemo"):
    """scripts/engine_demo.sh ENGINE_FLAGS... FLAGS... [-- SIDECAR_FLAGS...]: (exit code, output, report)."""
    report = tmp_path / "demo.json"
    name = f"{prefix}{os.getpid()}-{tmp_path.name}"[:60]
    env = dict(os.environ, EPLB_PYTHON=sys.executable, EPLB_WORKER=WORKER, **(env_extra or {}))
    cmd = [os.path.join(ROOT, "scripts", "engine_demo.sh"), *engine_flags, "--name", name, "--report", str(report),
           "--timeout", "500", *flags]
    if sidecar_flags:
        cmd += ["--", *sidecar_flags]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    left = [f for f in os.listdir("/dev/shm") if f.startswith((f"eplb-{name}-", f".eplb-{name}-"))]
    assert not left, f"left in /dev/shm: {left}"
    r = json.loads(report.read_text())
    for key in ("engine_steps", "outputs_match", "layers_committed", "commit_step_disagreements", "wrong_bytes",
                "balancedness_static", "balancedness_live", "sidecar_exit_code", "engine_exit_code", *extra_keys):
        assert key in r, key
    return p.returncode, p.stdout + p.stderr, r


# ---- with the fake sidecar: the script's own plumbing -------------------------------------


@needs_mpi
def test_demo_script_with_fake_sidecar_killed(tmp_path):
    rc, out, r = demo(tmp_path, "--sidecar", "fake", "--ranks", "2", "--steps", "30", "--kill-sidecar-at-step", "12",
                      "--interval-steps", "2")
    assert rc == 0, out
    assert r["engine_steps"] == 30 and r["outputs_match"] and r["engine_exit_code"] == 0
    assert r["sidecar_exit_code"] != 0 and r["commit_step_disagreements"] == 0
    assert "SIGKILL sidecar rank 1" in out


@needs_mpi
def test_demo_script_fails_when_the_engine_dies(tmp_path):
    rc, out, r = demo(tmp_path, "--sidecar", "fake", "--ranks", "2", "--steps", "200", "--kill-engine-at-step", "10")
    assert rc != 0 and r["engine_exit_code"] != 0
    assert r["sidecar_exit_code"] == 1, out
    assert "engine rank" in out


def test_demo_script_rejects_bad_flags():
    p = subprocess.run([os.path.join(ROOT, "scripts", "engine_demo.sh"), "--ranks", "x"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "not a number" in p.stderr


# ---- with eplb-worker ----------------------------------------------------------------------


@needs_mpi
@needs_worker
@needs_trace
def test_demo_qwen_4_ranks_balances_with_matching_outputs(tmp_path):
    rc, out, r = demo(tmp_path, "--ranks", "4", "--steps", "200", "--trace", QWEN, "--trace-dataset", "wikitext")
    assert rc == 0, out
    assert r["outputs_match"] and r["engine_steps"] == 200
    assert r["sidecar_exit_code"] == 0 and r["engine_exit_code"] == 0, out
    assert r["layers_committed"] > 0 and r["commit_step_disagreements"] == 0 and r["wrong_bytes"] == 0
    assert r["balancedness_live"] >= r["balancedness_static"] + 0.1, r


@needs_mpi
@needs_worker
@needs_trace
@pytest.mark.parametrize("fault", ["--kill-sidecar-at-step", "--stop-sidecar-at-step"])
def test_demo_sidecar_killed_or_stopped_during_migration(tmp_path, fault):
    rc, out, r = demo(tmp_path, "--ranks", "4", "--steps", "120", "--trace", QWEN, "--trace-dataset", "wikitext",
                      fault, "25")
    assert rc == 0, out
    assert r["outputs_match"] and r["engine_steps"] == 120 and r["engine_exit_code"] == 0
    assert r["commit_step_disagreements"] == 0 and r["wrong_bytes"] == 0 and r["placements_agree"]
    assert r["sidecar_exit_code"] != 0


@needs_mpi
@needs_worker
def test_demo_engine_rank_dies_sidecar_exits_nonzero(tmp_path):
    rc, out, r = demo(tmp_path, "--ranks", "2", "--steps", "400", "--kill-engine-at-step", "30")
    assert rc != 0 and r["engine_exit_code"] != 0
    assert r["sidecar_exit_code"] == 1, out


@needs_mpi
@needs_worker
@needs_trace
def test_demo_corrupted_transfer_applies_nothing(tmp_path):
    rc, out, r = demo(tmp_path, "--ranks", "4", "--steps", "60", "--trace", QWEN, "--trace-dataset", "wikitext",
                      sidecar_flags=["--fault", "corrupt-transfer-on-rank=1"])
    assert rc == 0, out  # the engine finished every step with matching outputs
    assert r["outputs_match"] and r["engine_steps"] == 60
    assert r["layers_committed"] == 0 and r["wrong_bytes"] == 0, "nothing applied"
    assert r["sidecar_exit_code"] == 1, out


@needs_mpi
@needs_worker
@pytest.mark.parametrize("beat", [0, 2**64 - 1, 2**63])
def test_a_heartbeat_that_never_moves_is_a_stopped_engine_whatever_its_value(beat):
    """A corrupt heartbeat (zero, or far in the future) must not keep the sidecar waiting: liveness
    is a heartbeat that changes, timed by the sidecar's own clock."""
    import numpy as np

    from eplb_client.region import EngineRegion, LayerTensor

    name = f"pytbeat{os.getpid()}"
    region = EngineRegion.create(name, 0, 1, 2, 3, 2, [[LayerTensor("w", np.zeros((3, 4), np.float32))]] * 2,
                                 np.array([[0, 1, 0], [1, 0, 1]], dtype=np.int32))
    region.publish()
    try:
        region.record(0, np.tile(np.arange(3, dtype=np.int64), (2, 1)))
        region._h[136 // 8] = beat  # no heartbeat thread: the word stays as set
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        p = subprocess.run(["mpirun", "-n", "1", WORKER, "run", "--engine", f"shm:{name}", "--engine-wait", "5",
                            "--engine-timeout", "1", "--steps", "50"], env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 1, p.stderr
        assert "has not beaten its heartbeat" in p.stderr, p.stderr
    finally:
        region.close()

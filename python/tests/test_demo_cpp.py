"""scripts/engine_demo.sh --engine cpp: the C++ reference engine (examples/cpp_engine, on the C API of
libeplb_client only) beside the fake sidecar and beside the real `eplb-worker run --engine shm:NAME`.

The engine is built once per session by scripts/build_cpp_engine.sh (mpicxx against
client/include/eplb_client.h and target/release/libeplb_client.a, which it builds with cargo when
missing), so these tests run wherever scripts/test.sh runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import test_demo
from test_demo import QWEN, needs_mpi, needs_trace, needs_worker

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

needs_mpicxx = pytest.mark.skipif(shutil.which("mpicxx") is None, reason="mpicxx not installed (scripts/lib/setup.sh)")


@pytest.fixture(scope="session")
def cpp_engine() -> str:
    """The engine's binary, built (or found up to date) by scripts/build_cpp_engine.sh."""
    env = dict(os.environ)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    p = subprocess.run([os.path.join(ROOT, "scripts", "build_cpp_engine.sh")], env=env, capture_output=True, text=True,
                       timeout=1800)
    assert p.returncode == 0, p.stderr
    path = os.path.join(ROOT, p.stdout.strip().splitlines()[-1])
    assert os.access(path, os.X_OK), path
    return path


def demo(tmp_path, engine: str, *flags: str, sidecar_flags=()):
    return test_demo.demo(tmp_path, *flags, sidecar_flags=sidecar_flags, engine_flags=("--engine", "cpp"),
                          env_extra={"EPLB_CPP_ENGINE": engine}, prefix="pytcpp",
                          extra_keys=("global_bytes_changed", "placements_agree"))


def test_engine_rejects_bad_flags(cpp_engine):
    """Bad input is exit 2 with a message, before any region exists (one rank, no mpirun needed
    for Open MPI's singleton start, but run under mpirun to be sure of the environment)."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for flags, want in ((["--top-k", "0"], "--top-k 0"), (["--steps", "x"], "not a non-negative integer"),
                        (["--trace", "/nonexistent.csv"], "cannot open"), (["--bogus", "1"], "unknown flag")):
        p = subprocess.run(["mpirun", "-n", "1", "--oversubscribe", cpp_engine, "--name", f"pytcppbad{os.getpid()}",
                            *flags], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (flags, p.stderr)
        assert want in p.stderr, (flags, p.stderr)


def test_demo_script_rejects_cpp_with_quant():
    p = subprocess.run([os.path.join(ROOT, "scripts", "engine_demo.sh"), "--engine", "cpp", "--quant", "nvfp4"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--quant none" in p.stderr, p.stderr


# ---- with the fake sidecar -----------------------------------------------------------------


@needs_mpi
@needs_mpicxx
def test_cpp_engine_with_fake_sidecar_applies_layers(tmp_path, cpp_engine):
    rc, out, r = demo(tmp_path, cpp_engine, "--sidecar", "fake", "--ranks", "2", "--steps", "40", "--interval-steps", "2")
    assert rc == 0, out
    assert r["engine_steps"] == 40 and r["outputs_match"] and r["engine_exit_code"] == 0, out
    assert r["layers_committed"] > 0 and r["commit_step_disagreements"] == 0 and r["placements_agree"], out
    assert r["wrong_bytes"] == 0 and r["global_bytes_changed"] == 0
    assert r["sidecar_exit_code"] == 0, out


@needs_mpi
@needs_mpicxx
def test_cpp_engine_catches_a_sidecar_that_writes_live_weights(tmp_path, cpp_engine):
    """The output check must be able to fail: a sidecar that breaks the contract by writing rank 0's
    live weights makes the EP forward pass differ from the reference, and the demo exit 1."""
    rc, out, r = demo(tmp_path, cpp_engine, "--sidecar", "fake", "--ranks", "2", "--steps", "40", "--interval-steps", "2",
                      sidecar_flags=["--write-live"])
    assert rc == 1, out
    assert not r["outputs_match"], out


@needs_mpi
@needs_mpicxx
def test_cpp_engine_rank_dies_fake_sidecar_exits_nonzero(tmp_path, cpp_engine):
    rc, out, r = demo(tmp_path, cpp_engine, "--sidecar", "fake", "--ranks", "2", "--steps", "400", "--kill-engine-at-step",
                      "10")
    assert rc != 0 and r["engine_exit_code"] != 0
    assert r["sidecar_exit_code"] == 1, out


# ---- with eplb-worker ----------------------------------------------------------------------


@needs_mpi
@needs_mpicxx
@needs_worker
def test_cpp_engine_beside_the_worker_2_ranks(tmp_path, cpp_engine):
    rc, out, r = demo(tmp_path, cpp_engine, "--ranks", "2", "--steps", "60", "--interval-steps", "5")
    assert rc == 0, out
    assert r["engine_steps"] == 60 and r["outputs_match"] and r["engine_exit_code"] == 0, out
    assert r["sidecar_exit_code"] == 0, out
    assert r["layers_committed"] > 0 and r["commit_step_disagreements"] == 0 and r["placements_agree"], out
    assert r["wrong_bytes"] == 0 and r["global_bytes_changed"] == 0, out


@needs_mpi
@needs_mpicxx
@needs_worker
@needs_trace
def test_cpp_engine_qwen_4_ranks_balances_with_matching_outputs(tmp_path, cpp_engine):
    """The issue's goal for the C++ engine: 4 ranks, the Qwen1.5 trace, outputs identical, layers
    committed, 0 wrong bytes, balancedness live >= static + 0.1."""
    rc, out, r = demo(tmp_path, cpp_engine, "--ranks", "4", "--steps", "200", "--trace", QWEN, "--trace-dataset",
                      "wikitext")
    assert rc == 0, out
    assert r["outputs_match"] and r["engine_steps"] == 200 and r["engine_exit_code"] == 0, out
    assert r["sidecar_exit_code"] == 0, out
    assert r["layers_committed"] > 0 and r["commit_step_disagreements"] == 0 and r["wrong_bytes"] == 0
    assert r["global_bytes_changed"] == 0
    assert r["balancedness_live"] >= r["balancedness_static"] + 0.1, r


@needs_mpi
@needs_mpicxx
@needs_worker
@pytest.mark.parametrize("fault", ["--kill-sidecar-at-step", "--stop-sidecar-at-step"])
def test_cpp_engine_sidecar_killed_or_stopped_during_migration(tmp_path, cpp_engine, fault):
    """The engine outlives its sidecar: every step runs and matches, every rank applied the same
    layers at the same steps, nothing half applied."""
    rc, out, r = demo(tmp_path, cpp_engine, "--ranks", "2", "--steps", "80", "--interval-steps", "5", fault, "25")
    assert rc == 0, out
    assert r["outputs_match"] and r["engine_steps"] == 80 and r["engine_exit_code"] == 0, out
    assert r["commit_step_disagreements"] == 0 and r["wrong_bytes"] == 0 and r["placements_agree"], out
    assert r["sidecar_exit_code"] != 0, out


# ---- the engine alone: its trace readers ------------------------------------------------------


def run_alone(cpp_engine: str, tmp_path, *flags: str, ranks: int = 2):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    report = tmp_path / "engine.json"
    name = f"pytcppalone{os.getpid()}-{tmp_path.name}"[:60]
    p = subprocess.run(["mpirun", "-n", str(ranks), "--oversubscribe", cpp_engine, "--name", name, "--report", str(report),
                        *flags], env=env, capture_output=True, text=True, timeout=300)
    left = [f for f in os.listdir("/dev/shm") if f.startswith((f"eplb-{name}-", f".eplb-{name}-"))]
    assert not left, f"left in /dev/shm: {left}"
    return p, (json.loads(report.read_text()) if report.exists() else {})


def test_engine_alone_follows_a_npy_trace(tmp_path, cpp_engine):
    """A .npy [steps][layers][experts] sets the shape; one hot expert a layer makes the static
    placement unbalanced (expert 2 has one slot, on rank 0; without a sidecar nothing moves:
    live == static)."""
    import numpy as np

    load = np.ones((3, 2, 6), np.float64)
    load[:, :, 2] = 1000.0
    path = tmp_path / "trace.npy"
    np.save(path, load)
    p, r = run_alone(cpp_engine, tmp_path, "--trace", str(path), "--steps", "6", "--tokens", "64")
    assert p.returncode == 0, p.stderr
    assert r["num_layers"] == 2 and r["num_experts"] == 6 and r["engine_steps"] == 6 and r["outputs_match"]
    assert r["layers_committed"] == 0 and r["wrong_bytes"] == 0 and r["global_bytes_changed"] == 0
    assert r["balancedness_static"] < 0.9 and r["balancedness_live"] == r["balancedness_static"], r


def test_engine_alone_follows_a_csv_trace_and_picks_the_dataset(tmp_path, cpp_engine):
    path = tmp_path / "trace.csv"
    rows = [",dataset,iteration,layer_idx," + ",".join(str(e) for e in range(4))]
    for i, (ds, it, layer) in enumerate([("a", 0, 0), ("a", 0, 1), ("b", 0, 0), ("b", 0, 1), ("b", 1, 0), ("b", 1, 1)]):
        rows.append(f"{i},{ds},{it},{layer},5,1,1,{100 if ds == 'b' else 1}")
    path.write_text("\n".join(rows) + "\n")
    p, r = run_alone(cpp_engine, tmp_path, "--trace", str(path), "--trace-dataset", "b", "--steps", "4", "--tokens", "32")
    assert p.returncode == 0, p.stderr
    assert r["num_layers"] == 2 and r["num_experts"] == 4 and r["outputs_match"] and r["trace_dataset"] == "b"
    p, _ = run_alone(cpp_engine, tmp_path, "--trace", str(path), "--trace-dataset", "c", "--steps", "4")
    assert p.returncode == 2 and "no dataset 'c'; it has a, b" in p.stderr, p.stderr


def test_engine_alone_rejects_a_2d_npy(tmp_path, cpp_engine):
    import numpy as np

    path = tmp_path / "flat.npy"
    np.save(path, np.ones((2, 6)))
    p, _ = run_alone(cpp_engine, tmp_path, "--trace", str(path), ranks=1)
    assert p.returncode == 2 and "want a non-empty [steps][layers][experts] array" in p.stderr, p.stderr

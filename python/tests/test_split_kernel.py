"""The split's CUDA kernel (python/eplb_client/split_kernel.cu) without a GPU: the same source
compiled for the CPU through split_kernel_cpu.h (`cc -O2 -shared -fPIC -x c`, one thread a block)
reproduces the golden quotas that Rust and numpy reproduce, and numpy's split on random cases, in
shared memory and in the global-scratch fallback; bad input, a scratch too small and too few
rounds are flagged not ok (never wrong quotas); the committed PTX was generated from this source.
On a machine with a CUDA GPU and torch, the PTX itself is launched and checked the same way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from eplb_client import split, split_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = json.load(open(os.path.join(HERE, "data", "split_golden.json")))["cases"]


def _groups() -> dict:
    groups: dict = {}
    for c in GOLDEN:
        groups.setdefault((len(c["counts"]), len(c["phy2log"]), c["slots_per_rank"]), []).append(c)
    return groups


@pytest.mark.parametrize("use_shared", [True, False])
def test_cpu_build_reproduces_the_golden_quotas(use_shared: bool) -> None:
    """Every golden case, the layers of one shape in one launch (block offsets exercised)."""
    assert len(GOLDEN) >= 100
    for (_, _, spr), cs in _groups().items():
        counts = np.array([c["counts"] for c in cs])
        phy2log = np.array([c["phy2log"] for c in cs])
        tokens = np.array([c["tokens"] for c in cs])
        q, t, ok = split_kernel.split_layers_cpu(counts, phy2log, spr, tokens, use_shared=use_shared)
        assert ok.all(), [c["name"] for c, o in zip(cs, ok) if not o]
        assert q.tolist() == [c["quotas"] for c in cs], [c["name"] for c in cs]
        assert t.tolist() == [c["max_load"] for c in cs]


def _random_layer(rng: np.random.Generator, e: int, g: int, spr: int, tokens: int) -> tuple:
    p = g * spr
    phy2log = np.concatenate([rng.permutation(e), rng.integers(0, e, p - e)])
    if rng.random() < 0.5:
        rng.shuffle(phy2log)
    else:  # the replicas of hot experts spread over GPUs, as the policies place them
        phy2log = phy2log[np.argsort(rng.permutation(p) % g, kind="stable")]
    load = 1.0 / (1 + rng.permutation(e)) ** rng.uniform(0.0, 1.5)
    counts = rng.multinomial(tokens, load / load.sum())
    if rng.random() < 0.2:
        counts[rng.integers(0, e, 3)] = 0
    return counts.astype(np.int64), phy2log.astype(np.int64)


def test_cpu_build_equals_numpy_on_random_cases() -> None:
    rng = np.random.default_rng(22)
    n = 0
    for _ in range(60):
        e = int(rng.integers(2, 40))
        g = int(rng.integers(2, 12))
        spr = int(rng.integers(1, 5))
        while g * spr < e:
            spr += 1
        layers = [_random_layer(rng, e, g, spr, int(rng.integers(0, 3000))) for _ in range(3)]
        counts = np.stack([c for c, _ in layers])
        phy2log = np.stack([p for _, p in layers])
        q, t, ok = split_kernel.split_layers_cpu(counts, phy2log, spr)
        assert ok.all()
        for i in range(len(layers)):
            qn, tn = split.split_layer(counts[i], int(counts[i].sum()), phy2log[i], spr)
            assert q[i].tolist() == qn.tolist(), (counts[i].tolist(), phy2log[i].tolist(), spr)
            assert int(t[i]) == tn
            n += 1
    assert n == 180


def test_cpu_build_equals_numpy_at_the_goal_shape_and_beyond_int32() -> None:
    """256 experts on 64 ranks (R = 320) and 32 ranks (R = 288); counts beyond 2^31 (int64)."""
    rng = np.random.default_rng(7)
    for g, spr, tokens in [(64, 5, 8 * 4096), (32, 9, 8 * 4096), (64, 5, 3 * 2**40)]:
        counts, phy2log = _random_layer(rng, 256, g, spr, tokens)
        q, t, ok = split_kernel.split_layers_cpu(counts[None], phy2log[None], spr)
        qn, tn = split.split_layer(counts, int(counts.sum()), phy2log, spr)
        assert bool(ok[0]) and q[0].tolist() == qn.tolist() and int(t[0]) == tn


def test_bad_input_is_flagged_not_ok_with_zero_quotas() -> None:
    good_c, good_p = [3, 2, 1], [0, 1, 2, 0]
    cases = [
        ([3, -2, 1], good_p, 2),      # a negative count
        (good_c, good_p, 7),          # counts not summing to the tokens
        (good_c, [0, 1, 0, 0], 6),    # expert 2 has tokens and no replica
        (good_c, [0, 1, 3, 0], 6),    # a slot out of range
        (good_c, [0, 1, -1, 2], 6),   # a negative slot
        (good_c, good_p, 6),          # valid (the control)
    ]
    counts = np.array([c for c, _, _ in cases])
    phy2log = np.array([p for _, p, _ in cases])
    tokens = np.array([t for _, _, t in cases])
    for use_shared in (True, False):
        q, t, ok = split_kernel.split_layers_cpu(counts, phy2log, 2, tokens, use_shared=use_shared)
        assert ok.tolist() == [False] * 5 + [True]
        assert (q[:5] == 0).all() and (t[:5] == 0).all()
        qn, tn = split.split_layer(good_c, 6, good_p, 2)
        assert q[5].tolist() == qn.tolist() and int(t[5]) == tn
    # a shape that does not divide: every layer not ok
    _, _, ok = split_kernel.split_layers_cpu(counts[:, :3], phy2log[:, :3], 2, tokens)
    assert not ok.any()


def test_scratch_too_small_and_too_few_rounds_are_flagged() -> None:
    c = GOLDEN[-1]
    counts, phy2log = np.array([c["counts"]]), np.array([c["phy2log"]])
    need = split_kernel.ws_bytes(counts.shape[1], phy2log.shape[1], c["slots_per_rank"])
    _, _, ok = split_kernel.split_layers_cpu(counts, phy2log, c["slots_per_rank"], use_shared=False,
                                             scratch_bytes=need - 16)
    assert not ok[0]
    _, _, ok = split_kernel.split_layers_cpu(counts, phy2log, c["slots_per_rank"], use_shared=False,
                                             scratch_bytes=need + 64)
    assert ok[0]
    # bounded rounds: some golden layers need more than 2, and are flagged rather than wrong
    flagged = 0
    for (_, _, spr), cs in _groups().items():
        q, t, ok = split_kernel.split_layers_cpu(np.array([c["counts"] for c in cs]),
                                                 np.array([c["phy2log"] for c in cs]), spr, max_rounds=2)
        for c, qq, o in zip(cs, q.tolist(), ok):
            if o:
                assert qq == c["quotas"], c["name"]
            else:
                flagged += 1
    assert flagged > 0


@pytest.mark.parametrize("use_shared", [True, False])
def test_the_launchers_argument_packing_runs_the_kernel(use_shared: bool) -> None:
    """kernel_params (the GPU launch's kernelParams) read back by the CPU build the way the
    driver reads them: the golden quotas come out, so every argument is in its place and type."""
    lib = split_kernel.cpu_library()
    for (e, p, spr), cs in _groups().items():
        counts = np.ascontiguousarray([c["counts"] for c in cs], dtype=np.int64)
        phy2log = np.ascontiguousarray([c["phy2log"] for c in cs], dtype=np.int64)
        tokens = np.ascontiguousarray([c["tokens"] for c in cs], dtype=np.int64)
        L = len(cs)
        quotas = np.full((L, p), -1, dtype=np.int64)
        max_load = np.full(L, -1, dtype=np.int64)
        ok = np.full(L, -1, dtype=np.int32)
        need = split_kernel.ws_bytes(e, p, spr)
        scratch = np.zeros(L * need + 1, dtype=np.uint8)
        values, params = split_kernel.kernel_params(
            counts.ctypes.data, phy2log.ctypes.data, tokens.ctypes.data, quotas.ctypes.data, max_load.ctypes.data,
            ok.ctypes.data, 0 if use_shared else scratch.ctypes.data, 0 if use_shared else need, e, p, spr,
            use_shared, split_kernel.MAX_ROUNDS)
        assert lib.split_layers_cpu_params(params, L, split_kernel.THREADS) == 0
        assert ok.tolist() == [1] * L
        assert quotas.tolist() == [c["quotas"] for c in cs] and max_load.tolist() == [c["max_load"] for c in cs]


def _threaded_main() -> int:
    """The golden cases and four layers of the goal shape with every block run by 2, 5, 32 or 64
    POSIX threads (the CPU build with -DSPLIT_CPU_THREADS): exit 0 when all equal the golden /
    numpy quotas and are ok, 1 otherwise (a barrier not reached by every thread would hang: the
    test runs this in a subprocess with a timeout)."""
    lib = split_kernel.cpu_library(threaded=True)
    failures = []

    def run(counts: np.ndarray, phy2log: np.ndarray, spr: int, threads: int, use_shared: bool) -> tuple:
        counts = np.ascontiguousarray(counts, dtype=np.int64)
        phy2log = np.ascontiguousarray(phy2log, dtype=np.int64)
        L, e = counts.shape
        p = phy2log.shape[1]
        tokens = counts.sum(1)
        quotas = np.full((L, p), -1, dtype=np.int64)
        max_load = np.full(L, -1, dtype=np.int64)
        ok = np.full(L, -1, dtype=np.int32)
        need = split_kernel.ws_bytes(e, p, spr)
        scratch = np.zeros(L * need + 1, dtype=np.uint8)
        _, params = split_kernel.kernel_params(
            counts.ctypes.data, phy2log.ctypes.data, tokens.ctypes.data, quotas.ctypes.data, max_load.ctypes.data,
            ok.ctypes.data, 0 if use_shared else scratch.ctypes.data, 0 if use_shared else need, e, p, spr,
            use_shared, split_kernel.MAX_ROUNDS)
        assert lib.split_layers_cpu_threads(params, L, threads) == 0
        return quotas, max_load, ok

    for threads, use_shared in [(2, True), (5, False), (32, True)]:
        for (_, _, spr), cs in _groups().items():
            q, t, ok = run(np.array([c["counts"] for c in cs]), np.array([c["phy2log"] for c in cs]), spr, threads,
                           use_shared)
            for c, qq, tt, o in zip(cs, q.tolist(), t.tolist(), ok.tolist()):
                if o != 1 or qq != c["quotas"] or tt != c["max_load"]:
                    failures.append(f"{threads} threads: {c['name']}")
    bench = json.load(open(os.path.join(HERE, "data", "split_bench_placements.json")))["placements"]
    rng = np.random.default_rng(3)
    for c in bench:
        load = np.array(c["expected"], dtype=np.float64)
        counts = rng.multinomial(8 * 4096, load / load.sum())[None]
        phy2log = np.array([c["phy2log"]])
        q, t, ok = run(counts, phy2log, c["slots_per_rank"], 64, True)
        qn, tn = split.split_layer(counts[0], int(counts[0].sum()), phy2log[0], c["slots_per_rank"])
        if ok[0] != 1 or q[0].tolist() != qn.tolist() or int(t[0]) != tn:
            failures.append(f"64 threads: {c['name']}")
    for f in failures:
        print("MISMATCH", f)
    return 1 if failures else 0


def test_parallel_sections_with_real_threads() -> None:
    """The kernel's parallel sections (the search's levels, the quotas) run concurrently by up to
    64 threads a block, meeting at __syncthreads as on a GPU: the same quotas, and no hang."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--threaded"], capture_output=True, text=True,
                       timeout=240, cwd=os.path.dirname(HERE))
    assert r.returncode == 0, r.stdout + r.stderr


def test_ws_bytes_is_the_kernels_formula() -> None:
    lib = split_kernel.cpu_library()
    for e, p, s in [(256, 320, 5), (256, 288, 9), (3, 4, 2), (128, 144, 9), (1, 1, 1)]:
        assert lib.split_ws_bytes_cpu(e, p, s) == split_kernel.ws_bytes(e, p, s)
    # the goal shape fits in the shared memory every GPU gives a block without opting in
    assert split_kernel.ws_bytes(256, 320, 5) <= split_kernel.SHARED_LIMIT


def test_committed_ptx_is_generated_from_this_source() -> None:
    ptx = open(split_kernel.PTX).read()
    first = ptx.splitlines()[0]
    want = f"source hash {split_kernel.source_hash(open(split_kernel.SOURCE, 'rb').read()):016x}"
    assert want in first, f"split_kernel.ptx is stale: run scripts/gen_split_ptx.py ({first} vs {want})"
    assert ".visible .entry split_layers_kernel(" in ptx
    # NVRTC 12.0's PTX ISA and compute_70: every CUDA 12 driver JIT-compiles it
    assert re.search(r"^\.version 8\.0$", ptx, re.M) and re.search(r"^\.target sm_70$", ptx, re.M)
    assert split_kernel.read_ptx().startswith(first.encode())


def test_source_hash_is_rusts_fnv1a() -> None:
    # FNV-1a 64 test vectors
    assert split_kernel.source_hash(b"") == 0xCBF29CE484222325
    assert split_kernel.source_hash(b"a") == 0xAF63DC4C8601EC8C


def _cuda_torch() -> Any:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the GPU launch is untested here")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the GPU launch is untested here (the CPU build above tests the logic)")
    return torch


def test_gpu_kernel_reproduces_the_golden_quotas() -> None:
    torch = _cuda_torch()
    for (_, _, spr), cs in _groups().items():
        counts = torch.tensor([c["counts"] for c in cs], device="cuda")
        phy2log = torch.tensor([c["phy2log"] for c in cs], device="cuda")
        q, t, ok = split_kernel.split_layers_kernel(counts, phy2log, spr)
        assert ok.all().item()
        assert q.tolist() == [c["quotas"] for c in cs] and t.tolist() == [c["max_load"] for c in cs]


def test_gpu_wrapper_falls_back_and_raises_on_bad_input() -> None:
    torch = _cuda_torch()
    with pytest.raises(split.SplitError, match="no replica"):
        split_kernel.split_layers_cuda(torch.tensor([[1, 2]], device="cuda"), torch.tensor([[0, 0]], device="cuda"), 1)
    q, t = split_kernel.split_layers_cuda(torch.tensor([[3, 2, 1]], device="cuda"),
                                          torch.tensor([[0, 1, 2, 0]], device="cuda"), 2)
    qn, tn = split.split_layer([3, 2, 1], 6, [0, 1, 2, 0], 2)
    assert q[0].tolist() == qn.tolist() and int(t[0]) == tn


if __name__ == "__main__" and sys.argv[1:] == ["--threaded"]:
    sys.exit(_threaded_main())

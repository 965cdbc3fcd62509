"""The GPU engine's pure parts without a GPU: the comparison of a static and a live run, the
Qwen3 recorder trace, and (only where torch is installed: skipped with the reason otherwise) the
expert path's exactness and its quantised tensors (``--quant``) on CPU torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eplb_engine import compare, loads


def report(steps=40, L=3, N=2, moe=None, pairs=None, fingerprints=None, commits=(), wrong=0):
    rng = np.random.default_rng(0)
    pairs = rng.integers(50, 150, size=(steps, L, N)) if pairs is None else pairs
    moe = np.ones((steps, L)) * 2.0 if moe is None else moe
    return {
        "moe_ms_sum_of_layer_max": list(moe.sum(axis=1)), "moe_ms_slowest_rank": list(moe.sum(axis=1)),
        "step_ms_rank0": [10.0] * steps, "pairs_static": pairs.tolist(), "pairs_live": pairs.tolist(),
        "fingerprints": fingerprints or [[7 * t + r for t in range(steps)] for r in range(N)],
        "commits": [list(c) for c in commits], "wrong_bytes": wrong, "applied_bytes_checked": 1024,
        "commit_step_disagreements": 0, "layers_committed": len(commits), "expert_bytes": 1024,
        "grouped_gemm": True, "applies": [{"stall_us": 250.0, "gpu_us": 180.0, "slots": [1, 2]}],
    }


def test_identical_outputs_and_the_speedup_against_the_ideal():
    static = report(pairs=np.tile([[[150, 50]]], (40, 3, 1)))  # balancedness 0.667: ideal 1.5
    live = report(moe=np.ones((40, 3)) * 1.6, commits=[(5, 0, 1), (7, 2, 1)])
    r = compare.compare(static, live)
    assert r["outputs_bitwise_identical"] and r["steps_with_different_outputs"] == []
    assert r["window"] == [30, 40], "after the last commit, at least the last quarter"
    assert r["ideal_speedup"] == pytest.approx(1.5)
    assert r["speedup"] == pytest.approx(2.0 / 1.6)
    assert r["fraction_of_ideal_speedup"] == pytest.approx((2.0 / 1.6 - 1) / 0.5)
    assert r["apply_stall_us_per_layer"]["median"] == 250.0


def test_one_different_step_fails_the_comparison(tmp_path):
    static = report()
    fp = [list(f) for f in static["fingerprints"]]
    fp[1][17] += 1
    live = report(fingerprints=fp)
    r = compare.compare(static, live, busy=report())
    assert not r["outputs_bitwise_identical"] and r["steps_with_different_outputs"] == [17]
    assert r["interference"]["step_slowdown"] == 0.0
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(static))
    b.write_text(json.dumps(live))
    assert compare.main([str(a), str(b)]) == 1
    b.write_text(json.dumps(report(wrong=8)))
    assert compare.main([str(a), str(b)]) == 1, "wrong applied bytes fail it too"
    b.write_text(json.dumps(report()))
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "c.json")]) == 0


def test_the_qwen3_recorder_json_is_one_iteration(tmp_path):
    p = tmp_path / "counts.json"
    p.write_text(json.dumps({"counts": [[1, 2, 3], [4, 5, 6]], "num_layers": 2}))
    a = loads.read_trace(str(p))
    assert a.shape == (1, 2, 3) and a[0, 1, 2] == 6
    p.write_text(json.dumps({"other": 1}))
    with pytest.raises(loads.LoadError, match="counts"):
        loads.read_trace(str(p))


def test_an_apply_copies_runs_of_consecutive_slots():
    from eplb_engine.gpu import slot_runs

    assert slot_runs(np.array([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 6), (7, 9)]
    assert slot_runs([]) == [] and slot_runs([4]) == [(4, 5)]


def test_the_expert_path_is_exact_on_integers_whatever_the_grouping():
    torch = pytest.importorskip("torch")
    from eplb_engine import gpu

    gpu.GROUPED.update(ok=False)  # the per-group path: CPU has no torch._grouped_mm
    H, F, S = 64, 32, 3
    g = torch.Generator().manual_seed(1)
    w13 = torch.randint(-7, 8, (S, 2 * F, H), generator=g).to(torch.bfloat16)
    w2 = torch.randint(-7, 8, (S, H, F), generator=g).to(torch.bfloat16)
    a = torch.randint(-15, 16, (10, H), generator=g).to(torch.bfloat16)
    act = lambda gu: gpu.int_act(gu, F, 40, 6)  # noqa: E731
    counts = [4, 0, 6]
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32)
    y = gpu.experts_forward(a, w13.transpose(1, 2), w2.transpose(1, 2), offs, counts, act)
    # Each row alone, in fp32 (exact on these integers): the same bits.
    slot = [0] * 4 + [2] * 6
    for i in range(10):
        gu = (a[i : i + 1].float() @ w13[slot[i]].float().T).to(torch.bfloat16)
        ref = (act(gu).float() @ w2[slot[i]].float().T).to(torch.bfloat16)
        assert torch.equal(y[i : i + 1], ref)


# ---- the quantised expert tensors (QuantExperts) on CPU torch --------------------------------

def _torch():
    return pytest.importorskip("torch", reason="torch is not installed: the GPU engine's tensor code needs it")


def _fill(qx, S, layer, experts):
    live = {t.name: qx.alloc(t, S) for t in qx.expert_layout}
    for s, e in enumerate(experts):
        for name, v in qx.expert(layer, e).items():
            live[name][s].copy_(v)
    live.update(qx.globals(layer))
    return live


@pytest.mark.parametrize("q", ["none", "fp8-block", "nvfp4"])
def test_gpu_tensors_are_separate_named_and_dequantise_like_the_cpu_engine(q):
    torch = _torch()
    from eplb_engine import gpu, model, quant

    H, F, S = 64, 32, 3
    qx = gpu.QuantExperts(q, H, F, 8, 0, torch.device("cpu"), block=16)
    live = _fill(qx, S, 1, [2, 7, 2])
    assert [t.name for t in qx.layout] == list(live)
    ptrs = {live[n].untyped_storage().data_ptr() for n in live}
    assert len(ptrs) == len(live), "every tensor its own allocation"
    for t in qx.layout:
        if t.kind == "expert":
            assert tuple(live[t.name].shape) == (S,) + t.shape
            assert live[t.name].stride(0) * live[t.name].element_size() == t.row_bytes + t.pad
    w13, w2 = qx.dequant(live)
    assert w13.dtype == torch.bfloat16 and tuple(w13.shape) == (S, 2 * F, H) and tuple(w2.shape) == (S, H, F)
    assert torch.equal(w13[0], w13[2]) and not torch.equal(w13[0], w13[1]), "a pure function of (layer, expert)"
    vals = w13.float()
    assert torch.equal(vals, vals.round()) and vals.abs().max() <= 7 and len(torch.unique(vals)) >= 9
    # The same bytes through the CPU engine's numpy decoder: the same weights.
    views = {t.name: live[t.name].contiguous().view(torch.uint8).numpy().view(t.np_dtype).reshape((S,) + t.shape)
             for t in qx.expert_layout}
    n13, n2 = quant.dequant(q, views, np.arange(S), model.ModelShape(1, 8, H, F, 2), 16)
    assert np.array_equal(n13, w13.float().transpose(1, 2).numpy())
    assert np.array_equal(n2, w2.float().transpose(1, 2).numpy())
    if q == "none":  # contract 1's engine's draw: its expert bytes were w13 then w2, bf16
        g = torch.Generator().manual_seed((1 * 1_000_003 + 7) & ((1 << 62) - 1))
        w = torch.randint(-7, 8, (2 * F * H + H * F,), generator=g, dtype=torch.int16).to(torch.bfloat16)
        assert torch.equal(w[: 2 * F * H].view(2 * F, H), w13[1])


@pytest.mark.parametrize("q", ["fp8-block", "nvfp4"])
def test_gpu_every_per_expert_tensor_matters_and_the_applied_check_sees_each(q):
    torch = _torch()
    from eplb_engine import gpu

    qx = gpu.QuantExperts(q, 64, 32, 16, 0, torch.device("cpu"), block=16)
    ref = [qx.expert(0, e) for e in range(16)]
    for t in qx.expert_layout:
        b = next(e for e in range(1, 16) if not torch.equal(gpu.row_bytes_of(ref[e][t.name]), gpu.row_bytes_of(ref[0][t.name])))
        live = {u.name: qx.alloc(u, 1) for u in qx.expert_layout}
        for u in qx.expert_layout:
            live[u.name][0].copy_(ref[0 if u.name == t.name else b][u.name])
        wrong = sum(int(torch.count_nonzero(gpu.row_bytes_of(live[u.name][0]) != gpu.row_bytes_of(ref[b][u.name])))
                    for u in qx.expert_layout)
        assert wrong > 0, t.name
        w13, w2 = qx.dequant(live)
        full = {u.name: qx.alloc(u, 1) for u in qx.expert_layout}
        for u in qx.expert_layout:
            full[u.name][0].copy_(ref[b][u.name])
        f13, f2 = qx.dequant(full)
        assert not (torch.equal(w13, f13) and torch.equal(w2, f2)), f"{t.name} left behind went unseen"


def test_gpu_input_scales_fold_into_the_grouped_gemms_exactly():
    torch = _torch()
    from eplb_engine import gpu

    gpu.GROUPED.update(ok=False)
    H, F, S = 64, 32, 3
    g = torch.Generator().manual_seed(2)
    w13 = torch.randint(-7, 8, (S, 2 * F, H), generator=g).to(torch.bfloat16)
    w2 = torch.randint(-7, 8, (S, H, F), generator=g).to(torch.bfloat16)
    a = torch.randint(-15, 16, (10, H), generator=g).to(torch.bfloat16)
    counts = [4, 0, 6]
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32)
    act = lambda gu: gpu.int_act(gu, F, 40, 6)  # noqa: E731
    plain = gpu.experts_forward(a, w13.transpose(1, 2), w2.transpose(1, 2), offs, counts, act)
    s13, s2 = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([2.0, 1.0, 0.5])
    rep = torch.tensor(counts)
    scaled = gpu.experts_forward(a, w13.transpose(1, 2), w2.transpose(1, 2), offs, counts, act,
                                 (s13, s2, s13.repeat_interleave(rep), s2.repeat_interleave(rep)))
    assert torch.equal(plain, scaled)


def test_deepseek_preset_fills_only_what_was_not_given():
    from eplb_engine import gpu

    args = gpu.apply_presets(gpu.parse_args(["--deepseek-v3", "--num-layers", "4"]), ["--deepseek-v3", "--num-layers", "4"])
    assert (args.quant, args.hidden, args.ffn, args.num_layers, args.slots_per_rank) == ("fp8-block", 7168, 2048, 4, 9)

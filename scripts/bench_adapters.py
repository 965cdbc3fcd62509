#!/usr/bin/env python3
"""Benchmarks of the adapters' engine-side cost on CPU tensors (docs/bench/adapters.md). Run in
an engine venv (torch and the engine importable), one process:

    target/venv-sglang/bin/python scripts/bench_adapters.py [--steps 3000] [--skip-apply]

1. The per-step cost inside the engine: ``end_step`` (snapshot of the engine's
   ``[layers, num_physical]`` int32 counts) + ``begin_step`` (record into the ring, the boundary,
   nothing pending), DeepSeek-V3 shape (58 MoE layers, EP 32: 9 slots a rank, 288 physical), one
   rank; once without the agreement (one rank needs none) and once with the Gloo all-reduce of a
   1-rank group (the call's own cost; across hosts add the round trip).
2. The apply of one FP8 DeepSeek-V3 layer (9 slots of 44,050,944 B, every slot changed) by the
   client at the boundary (staging -> live, the bytes the sidecar staged) against SGLang's own
   ``update_expert_weights_single_layer`` for the same change (local moves: its temp buffer and the
   copy back) and vLLM's ``rearrange_expert_weights_inplace`` when vLLM is importable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))


def stats(us):
    us = sorted(us)
    return f"median {statistics.median(us):.1f} us, p90 {us[int(len(us) * 0.9)]:.1f} us, n {len(us)}"


def per_step(torch, dist, steps: int) -> None:
    from eplb_client.adapters.core import Attachment, ExpertParam, gloo_agree

    L, S, E = 58, 9, 9
    P = S
    for agree_kind in ("none", "gloo"):
        layers = [[ExpertParam("w13_weight", torch.zeros(S, 64, dtype=torch.uint8)),
                   ExpertParam("w2_weight", torch.zeros(S, 32, dtype=torch.uint8))] for _ in range(L)]
        # The counts of a 32-rank job: [58, 288]; the region here is one rank's (num_physical 9)
        # in shape, so the counts are the same size as a real rank's view only in the ring copy:
        counts = torch.randint(0, 50, (L, P), dtype=torch.int32)
        agree = gloo_agree(dist.group.WORLD) if agree_kind == "gloo" else None
        att = Attachment(f"bench-step-{os.getpid()}-{agree_kind}", 0, 1, E, S, layers, np.tile(np.arange(S), (L, 1)),
                         commit=lambda ls, p: None, agree=agree)
        if agree is not None:
            att._agree = agree
        out = []
        for i in range(steps):
            t0 = time.perf_counter_ns()
            att.begin_step()
            att.end_step(counts)
            out.append((time.perf_counter_ns() - t0) / 1e3)
        att.detach()
        print(f"per-step (end_step + begin_step, nothing pending, 58 layers, agree {agree_kind}): "
              f"{stats(out[100:])}")


def full_counts(torch, dist, steps: int) -> None:
    """The same with a real rank's count view: num_physical 288 (32 ranks x 9): the region of
    rank 0 of 32 (the other ranks' regions need not exist for the engine side)."""
    from eplb_client.adapters.core import Attachment, ExpertParam

    L, S, W, E = 58, 9, 32, 256
    P = W * S
    layers = [[ExpertParam("w13_weight", torch.zeros(S, 64, dtype=torch.uint8)),
               ExpertParam("w2_weight", torch.zeros(S, 32, dtype=torch.uint8))] for _ in range(L)]
    counts = torch.randint(0, 50, (L, P), dtype=torch.int32)
    p2l = np.tile(np.arange(P) % E, (L, 1))
    # One rank of 32 with a stub agreement (the others' answers: nothing pending either).
    att = Attachment(f"bench-step32-{os.getpid()}", 0, W, E, S, layers, p2l, commit=lambda ls, p: None,
                     agree=lambda have: (have, have))
    out = []
    for i in range(steps):
        t0 = time.perf_counter_ns()
        att.begin_step()
        att.end_step(counts)
        out.append((time.perf_counter_ns() - t0) / 1e3)
    att.detach()
    print(f"per-step (end_step + begin_step, nothing pending, 58 layers x 288 physical, rank 0 of 32, "
          f"agreement stubbed): {stats(out[100:])}")


def apply_layer(torch, dist, repeat: int) -> None:
    from eplb_client.adapters.core import Attachment, ExpertParam

    S = 9
    H, I = 7168, 2048
    f8 = torch.float8_e4m3fn
    shapes = [("w13_weight", f8, (2 * I, H)), ("w2_weight", f8, (H, I)),
              ("w13_weight_scale_inv", torch.float32, (2 * I // 128, H // 128)),
              ("w2_weight_scale_inv", torch.float32, (H // 128, I // 128))]

    def make():
        return {n: torch.randint(0, 255, (S,) + sh, dtype=torch.uint8).view(dt) if dt == f8
                else torch.rand((S,) + sh, dtype=dt) for n, dt, sh in shapes}

    ts = make()
    expert_bytes = sum(t[0].numel() * t.element_size() for t in ts.values())
    old = list(range(S))
    new = old[1:] + old[:1]  # every local slot changes (a local rotation)
    att = Attachment(f"bench-apply-{os.getpid()}", 0, 1, S, S, [[ExpertParam(n, t) for n, t in ts.items()]],
                     np.array([old]), commit=lambda ls, p: None, agree=None)
    region = att.region
    from eplb_client import region as R

    times = []
    for k in range(repeat):
        cur = np.array(region.placement().phy2log[0])
        nxt = np.roll(cur, -1)
        for n, t in ts.items():  # the sidecar's staging: slot s gets the expert nxt[s] (bytes of slot cur^-1)
            st = torch.from_numpy(region.staging_tensor(n)).view(t.dtype) if t.dtype != torch.float32 else \
                torch.from_numpy(region.staging_tensor(n))
            st.copy_(t.detach().roll(-1, dims=0))
        h = region._h
        seq = int(h[R._W_CMD_SEQ])
        h[R._W_CMD_SEQ] = seq + 1
        h[R._W_CMD_ID] = k + 1
        h[R._W_CMD_LAYER] = 0
        h[R._W_CMD_APPLY_STEP] = att.step
        h[R._W_CMD_EPOCH] = int(region.placement().epoch[0]) + 1
        region._cmd_row[:] = nxt
        region._cmd_mask[:] = 1
        h[R._W_CMD_SEQ] = seq + 2
        t0 = time.perf_counter_ns()
        applied = att.begin_step()
        times.append((time.perf_counter_ns() - t0) / 1e6)
        assert applied == [0], applied
        att.end_step(None)
    att.detach()
    print(f"apply, one FP8 DeepSeek-V3 layer ({S} slots x {expert_bytes} B, all changed), client at the boundary: "
          f"median {statistics.median(times):.1f} ms ({S * expert_bytes / statistics.median(times) / 1e6:.2f} GB/s), "
          f"runs {times}")

    try:
        from sglang.srt.eplb.expert_location_updater import update_expert_weights_single_layer
    except Exception as e:  # noqa: BLE001
        print(f"SGLang's mover not importable here: {e}")
    else:
        own = make()
        ws = [t.view(torch.uint8) if t.dtype == f8 else t for t in own.values()]
        temp = [torch.empty_like(w) for w in ws]
        times = []
        p2l = list(range(S))
        for k in range(repeat):
            nxt = p2l[1:] + p2l[:1]
            t0 = time.perf_counter_ns()
            update_expert_weights_single_layer(routed_experts_weights=ws, temp_buffers=temp,
                                               old_physical_to_logical_map=p2l, new_physical_to_logical_map=nxt,
                                               num_local_physical_experts=S, num_gpu_per_node=1, rank=0, world_size=1)
            times.append((time.perf_counter_ns() - t0) / 1e6)
            p2l = nxt
        print(f"apply, the same change with SGLang's update_expert_weights_single_layer (1 rank, CPU): "
              f"median {statistics.median(times):.1f} ms, runs {times}")
    try:
        from vllm.distributed.eplb.rebalance_execute import rearrange_expert_weights_inplace
    except Exception as e:  # noqa: BLE001
        print(f"vLLM's mover not importable here ({type(e).__name__})")
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from adapters_check import gloo_communicator

        own = make()
        ws = [[t.view(torch.uint8) if t.dtype == f8 else t for t in own.values()]]
        ws = [[w.view(S, -1) for w in ws[0]]]
        buf = [torch.empty_like(w) for w in ws[0]]
        times = []
        p2l = torch.arange(S)[None]
        for k in range(repeat):
            nxt = p2l.roll(-1, dims=1)
            t0 = time.perf_counter_ns()
            rearrange_expert_weights_inplace(p2l, nxt, ws, buf, dist.group.WORLD, gloo_communicator(torch))
            times.append((time.perf_counter_ns() - t0) / 1e6)
            p2l = nxt
        print(f"apply, the same change with vLLM's rearrange_expert_weights_inplace (1 rank, CPU): "
              f"median {statistics.median(times):.1f} ms, runs {times}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-apply", action="store_true")
    args = ap.parse_args()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, one process, torch threads 1")
    per_step(torch, dist, args.steps)
    full_counts(torch, dist, args.steps)
    if not args.skip_apply:
        apply_layer(torch, dist, args.repeat)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

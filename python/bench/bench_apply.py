"""The apply stall at a step boundary on one GPU: copying k staged experts into live slots in
place (``live[layer, s].copy_(staging[s])``, as ``eplb_engine.gpu`` does), waited for, for k = 1,
2, 4, 8 experts of 44 MiB (DeepSeek-V3's fp8 expert) and 36 MiB (Qwen3-235B's bf16 expert).
Baseline of the same run: one copy of the same bytes between two plain buffers.

    python python/bench/bench_apply.py [--reps 20]
"""

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    dev = torch.device("cuda", 0)
    rows = []
    for mib in (44.0, 36.0):
        eb = int(mib * 2**20) // 64 * 64
        live = torch.zeros((2, 9, eb), dtype=torch.uint8, device=dev)
        staging = torch.ones((9, eb), dtype=torch.uint8, device=dev)
        for k in (1, 2, 4, 8):
            slots = list(range(0, 2 * k, 2))[:k] if 2 * k <= 9 else list(range(k))  # scattered where possible
            stall, gpu, base = [], [], []
            for rep in range(a.reps + 2):
                torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter_ns()
                e0.record()
                for s in slots:
                    live[1, s].copy_(staging[s])
                e1.record()
                e1.synchronize()
                t1 = time.perf_counter_ns()
                b0, b1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                b0.record()
                live[0, :k].copy_(staging[:k])
                b1.record()
                b1.synchronize()
                if rep >= 2:
                    stall.append((t1 - t0) / 1e3)
                    gpu.append(e0.elapsed_time(e1) * 1e3)
                    base.append(b0.elapsed_time(b1) * 1e3)
            med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
            rows.append(dict(expert_mib=mib, experts=k, stall_us=med(stall), stall_max_us=max(stall), gpu_us=med(gpu),
                             one_copy_us=med(base), gb_per_s=k * eb / med(gpu) / 1e3))
            r = rows[-1]
            print(f"  {mib:5.1f} MiB x {k}: stall {r['stall_us']:8.1f} us (max {r['stall_max_us']:8.1f}), GPU {r['gpu_us']:8.1f} us "
                  f"({r['gb_per_s']:6.0f} GB/s), one copy of the same bytes {r['one_copy_us']:8.1f} us")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

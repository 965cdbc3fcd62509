#!/usr/bin/env python3
"""The PyTorch split on one GPU (issue 22): first checks `split_layers` against the golden cases
that Rust and numpy reproduce (exit 1 on any difference), then times it for 58 layers at once:
256 experts, 64 ranks, R = 320 (the golden cases' incremental and spread placements of that
shape), each layer's counts a multinomial sample of 8 x 4096 (token, k) pairs of a zipf-like load.
Prints microseconds a layer (median over the repetitions of the whole call / layers).

    python3 scripts/bench_split_gpu.py [--device cuda] [--layers 58] [--reps 20]

Needs only python/ (eplb_client) and torch; no build of the Rust side.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eplb_client import split  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=8 * 4096)
    a = p.parse_args()
    dev = torch.device(a.device)
    golden = json.load(open(os.path.join(HERE, "..", "python", "tests", "data", "split_golden.json")))["cases"]
    groups = {}
    for c in golden:
        groups.setdefault((len(c["counts"]), len(c["phy2log"]), c["slots_per_rank"]), []).append(c)
    bad = 0
    for (_, _, spr), cs in groups.items():
        q, t = split.split_layers(torch.tensor([c["counts"] for c in cs], device=dev),
                                  torch.tensor([c["phy2log"] for c in cs], device=dev), spr)
        for c, qq, tt in zip(cs, q.cpu().tolist(), t.cpu().tolist()):
            if qq != c["quotas"] or tt != c["max_load"]:
                bad += 1
                print(f"MISMATCH {c['name']}: max load {tt} vs {c['max_load']}", file=sys.stderr)
    print(f"golden: {len(golden) - bad}/{len(golden)} cases identical to Rust and numpy on {dev}")
    if bad:
        return 1
    rng = np.random.default_rng(0)
    e = 256
    load = 1.0 / (1 + rng.permutation(e))
    load /= load.sum()
    for name in ["incremental-g64-t8192", "spread-g64-t8192"]:
        c = next(c for c in golden if c["name"] == name)
        spr = c["slots_per_rank"]
        counts = torch.tensor(np.stack([rng.multinomial(a.tokens, load) for _ in range(a.layers)]), device=dev)
        phy2log = torch.tensor([c["phy2log"]] * a.layers, device=dev)
        times = []
        for r in range(a.reps + 3):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            q, t = split.split_layers(counts, phy2log, spr)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r >= 3:
                times.append(time.perf_counter() - t0)
        # spot check one layer against numpy
        qn, tn = split.split_layer(counts[0].cpu().numpy(), int(counts[0].sum()), c["phy2log"], spr)
        same = q[0].cpu().tolist() == qn.tolist()
        times.sort()
        us = times[len(times) // 2] * 1e6 / a.layers
        print(f"{name.split('-')[0]} placement, E=256 G=64 R=320, layers={a.layers}: {us:.1f} us/layer "
              f"(median of {a.reps}; min {times[0] * 1e6 / a.layers:.1f}); layer 0 equals numpy: {same}")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

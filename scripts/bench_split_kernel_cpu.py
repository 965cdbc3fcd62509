#!/usr/bin/env python3
"""The split kernel's CPU build (python/eplb_client/split_kernel.cu through split_kernel_cpu.h,
`cc -O2`, one thread a block, the blocks one after the other) on the shapes of the GPU bench:
256 experts on 64 ranks (R = 320) and 32 ranks (R = 288), the Rust bench's incremental and spread
placements (python/tests/data/split_bench_placements.json), 58 layers of 8 x 4096 (token, k) pairs
sampled from that bench's expected load (the same generator and seed as scripts/bench_split_gpu.py).
Checks every layer against numpy's `split_layer` (exit 1 on any difference), then prints the
median over --reps calls of one call's wall time / layers (one CPU core; the kernel's logic, not
its GPU speed: there the layers run in parallel, one block each).

    python3 scripts/bench_split_kernel_cpu.py [--layers 58] [--reps 21]

Needs numpy and a C compiler (cc); no torch, no GPU.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import numpy as np  # noqa: E402

from eplb_client import split, split_kernel  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--tokens", type=int, default=8 * 4096)
    a = p.parse_args()
    bench = json.load(open(os.path.join(HERE, "..", "python", "tests", "data", "split_bench_placements.json")))
    rng = np.random.default_rng(0)
    print("| shape | placement | layers | median us/layer | min us/layer | equal to numpy |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for c in bench["placements"]:
        spr = c["slots_per_rank"]
        load = np.array(c["expected"], dtype=np.float64)
        load /= load.sum()
        counts = np.stack([rng.multinomial(a.tokens, load) for _ in range(a.layers)]).astype(np.int64)
        phy2log = np.array([c["phy2log"]] * a.layers, dtype=np.int64)
        q, t, ok = split_kernel.split_layers_cpu(counts, phy2log, spr)  # also builds the library
        same = bool(ok.all())
        for i in range(a.layers):
            qn, tn = split.split_layer(counts[i], int(counts[i].sum()), phy2log[i], spr)
            same = same and q[i].tolist() == qn.tolist() and int(t[i]) == tn
        bad += not same
        us = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            split_kernel.split_layers_cpu(counts, phy2log, spr)
            us.append((time.perf_counter() - t0) * 1e6 / a.layers)
        us.sort()
        print(f"| E=256 G={c['num_gpus']} R={len(c['phy2log'])} | {c['name'].split('-')[0]} | {a.layers} | "
              f"{us[len(us) // 2]:.1f} | {us[0]:.1f} | {same} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

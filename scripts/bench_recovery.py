#!/usr/bin/env python3
"""Recovery after an abrupt shift of the hot experts: the BENCHMARKS.md table of issue 11.

For each case, a 640-step trace: a steady load A (one shared dataset's mean distribution per
layer) for 320 steps, then B = A with every layer's experts relabelled (the hot experts move),
every step's counts a multinomial sample of `tokens` assignments a layer. `eplb-worker simulate`
runs the default manager on it (only the competition's cost-model flags); a fresh DeepSeek plan
of B (its exact expected shares, `plan --policy deepseek`) is scored on the same sampled steps
after the jump (`simulate --init-placement ... --enable-eplb false`). Printed: the mean
balancedness of both over steps J+128..J+160, J+160..J+192 and the last 32 steps.

    scripts/bench_recovery.py [--bin target/release/eplb-worker] [--out DIR]
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_drift_trace as drift  # noqa: E402

JUMP, STEPS = 320, 640
COST = ["--expert-bytes", "88080384", "--migration-gbps", "900", "--step-ms", "14.6484375"]
# family (or a qwen3_sglang_recorder file), tokens a layer a step, GPUs, seed
CASES = [
    ("counts30b_qwen3-30b-a3b.json", 16384, 32, 1),
    ("counts235b_qwen3-235b-a22b-fp8.json", 16384, 64, 2),
    ("switch128", 4096, 16, 1),
    ("switch128", 4096, 32, 1),
    ("switch128", 2048, 16, 3),
    ("qwen15", 4096, 4, 1),
    ("qwen15", 4096, 6, 1),
    ("qwen15", 1024, 6, 1),
    ("qwen15", 2048, 4, 5),
    ("qwen15", 8192, 6, 7),
    ("olmoe", 16384, 8, 1),
    ("olmoe", 4096, 16, 4),
]


def base_load(source: str, shared: str, rng: np.random.Generator) -> np.ndarray:
    """A steady load `[layers, experts]` (shares)."""
    if source.endswith(".json"):
        counts = np.array(json.load(open(os.path.join(shared, "qwen3_sglang_recorder", source)))["counts"], float)
        return counts + 0.5
    comps = drift.components(source, shared, rng)
    return comps[rng.integers(len(comps))].mean(0)


def write_traces(source: str, tokens: int, seed: int, shared: str, out: str) -> tuple[dict[str, str], int]:
    rng = np.random.default_rng(seed)
    a = base_load(source, shared, rng)
    a = a / a.sum(1, keepdims=True)
    b = np.stack([row[rng.permutation(len(row))] for row in a])
    trace = np.stack([[rng.multinomial(tokens, (a if t < JUMP else b)[l]) for l in range(len(a))] for t in range(STEPS)])
    paths = {k: f"{out}.{k}.npy" for k in ("trace", "post", "expected")}
    np.save(paths["trace"], trace.astype(np.uint32))
    np.save(paths["post"], trace[JUMP:].astype(np.uint32))
    np.save(paths["expected"], (b * 1e9)[None])
    return paths, a.shape[1]


def balancedness(report: str) -> np.ndarray:
    return np.array(json.load(open(report))["cases"][0]["balancedness_per_step"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="target/release/eplb-worker")
    p.add_argument("--out", default="/tmp/eplb-bench-recovery")
    p.add_argument("--shared", default=None, help="the shared traces folder")
    a = p.parse_args()
    shared = drift.shared_dir(a)
    os.makedirs(a.out, exist_ok=True)
    run = lambda *args: subprocess.run([a.bin, *args], check=True, capture_output=True)
    windows = [(128, 160), (160, 192), (STEPS - JUMP - 32, STEPS - JUMP)]
    print("| load | tokens | EP | " + " | ".join(f"J+{x}..J+{y}: eplb / fresh DeepSeek" for x, y in windows) + " |")
    print("|---|---|---|" + "---|" * len(windows))
    for source, tokens, gpus, seed in CASES:
        name = f"{a.out}/{source.split('.')[0]}-t{tokens}-ep{gpus}-s{seed}"
        paths, experts = write_traces(source, tokens, seed, shared, name)
        g, r = str(gpus), str(experts + gpus)
        run("plan", "--load", paths["expected"], "--num-replicas", r, "--num-gpus", g, "--policy", "deepseek",
            "--output", f"{name}.deepseek.json")
        run("simulate", "--trace", paths["trace"], "--num-gpus", g, "--num-redundant-experts", g, *COST,
            "--report", f"{name}.eplb.json")
        run("simulate", "--trace", paths["post"], "--num-gpus", g, "--num-redundant-experts", g, *COST,
            "--init-placement", f"{name}.deepseek.json", "--enable-eplb", "false", "--report", f"{name}.fresh.json")
        ours, fresh = balancedness(f"{name}.eplb.json"), balancedness(f"{name}.fresh.json")
        cells = []
        for x, y in windows:
            o, f = ours[JUMP + x : JUMP + y].mean(), fresh[x:y].mean()
            cells.append(f"{o:.4f} / {f:.4f} ({o - f:+.4f})")
        print(f"| {source.split('.')[0]} | {tokens} | {gpus} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

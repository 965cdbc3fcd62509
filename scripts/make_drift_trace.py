#!/usr/bin/env python3
"""Realistic drifting MoE load traces: `.npy` `[steps][layers][experts]` (uint32 token counts).

Every step's counts are a multinomial sample of `--tokens` (token, expert) assignments a layer
from a *mixture* of real per-dataset expert distributions (the shared traces):

* `qwen15`: Qwen1.5-MoE, 12 layers x 60 experts, datasets bookcorpus / wikitext / wmt19 / random
  (`harmoeny_qwen15moe_switch/expert_freq_qwen_policy_datasets.csv`, 20 iterations each);
* `switch128`: Switch-base-128, the 6 encoder layers x 128 experts, the same datasets
  (`expert_freq_switch128_datasets.csv`, 30 iterations each);
* `olmoe`: OLMoE-1B-7B, 3 layers x 64 experts, domains arxiv / book / c4 / github / wikipedia /
  tulu (`olmoe_mixtral_expert_counts_layers0_7_15.json`, summed);
* `qwen3`: Qwen3-30B-A3B, 48 layers x 128 experts (`counts30b_qwen3-30b-a3b.json`, summed); its
  components are the recorded distribution under fixed random relabellings of the experts (a
  workload with other hot experts).

A dataset with iterations follows them slowly (each iteration lasts `--iteration-steps` steps,
interpolated linearly), so a component itself drifts. The mixture weights are a softmax of
logits that random-walk (`--drift`, per step) and jump (`--jumps` times at random steps: new
logits, and with probability 1/2 one component's experts are relabelled: an abrupt shift of
the hot experts). Seeded, so a trace is reproducible.

    scripts/make_drift_trace.py --family switch128 --steps 4096 --seed 1 --out /tmp/sw.npy
    scripts/make_drift_trace.py ... --expected-out /tmp/sw-expected.npy   # for `simulate --oracle`
"""

import argparse
import csv
import json
import os
import sys

import numpy as np

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "traces")


def shared_dir(args):
    for d in [args.shared, SHARED, "/work/shared/traces"]:
        if d and os.path.isdir(d):
            return d
    sys.exit("error: the shared traces are not found; pass --shared DIR (the folder with harmoeny_qwen15moe_switch/)")


def harmoeny(path, layers):
    """{dataset: array [iterations, layers, experts]} from a per-iteration CSV."""
    rows = {}
    with open(path) as f:
        r = csv.reader(f)
        header = next(r)
        first = header.index("0")
        for row in r:
            ds, it, layer = row[1], int(row[2]), int(row[3])
            if layer in layers:
                rows.setdefault(ds, {}).setdefault(it, {})[layer] = [float(x) for x in row[first:]]
    out = {}
    for ds, its in rows.items():
        out[ds] = np.array([[its[i][l] for l in layers] for i in sorted(its)], dtype=np.float64)
    return out


def components(family, d, rng):
    """A list of arrays [iterations, layers, experts] (probabilities per layer)."""
    if family == "qwen15":
        c = harmoeny(os.path.join(d, "harmoeny_qwen15moe_switch", "expert_freq_qwen_policy_datasets.csv"), range(12))
        comps = [c[k] for k in sorted(c)]
    elif family == "switch128":
        c = harmoeny(os.path.join(d, "harmoeny_qwen15moe_switch", "expert_freq_switch128_datasets.csv"), range(6))
        comps = [c[k] for k in sorted(c)]
    elif family == "olmoe":
        j = json.load(open(os.path.join(d, "olmoe_mixtral", "olmoe_mixtral_expert_counts_layers0_7_15.json")))
        comps = []
        for domain, layers in sorted(j["olmoe"]["expert_counts"].items()):
            m = np.zeros((3, 64))
            for l, counter in enumerate(layers):
                items = counter.items() if isinstance(counter, dict) else enumerate(counter)
                for e, n in items:
                    m[l, int(e)] = float(n)
            comps.append(m[None])
    elif family == "qwen3":
        j = json.load(open(os.path.join(d, "qwen3_sglang_recorder", "counts30b_qwen3-30b-a3b.json")))
        base = np.array(j["counts"], dtype=np.float64)
        comps = [base[None]] + [base[:, rng.permutation(base.shape[1])][None] for _ in range(3)]
    else:
        sys.exit(f"error: unknown family {family}")
    out = []
    for c in comps:
        c = c + 0.5  # no expert is never chosen
        out.append(c / c.sum(axis=2, keepdims=True))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=["qwen15", "switch128", "olmoe", "qwen3"])
    p.add_argument("--steps", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=8192, help="(token, expert) assignments a layer a step")
    p.add_argument("--drift", type=float, default=0.02, help="step of the logits' random walk, per step")
    p.add_argument("--jumps", type=int, default=3, help="abrupt shifts over the trace")
    p.add_argument("--iteration-steps", type=int, default=128, help="steps one recorded iteration lasts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared", default=None, help="the shared traces folder")
    p.add_argument("--out", required=True)
    p.add_argument("--expected-out", default=None,
                   help="also write the expected counts every step was sampled from (float64, same shape): "
                        "`simulate --oracle` plans on them")
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    comps = components(a.family, shared_dir(a), rng)
    n = len(comps)
    _, layers, experts = comps[0].shape
    logits = rng.normal(0, 1.5, n)
    jump_at = set(rng.choice(np.arange(a.steps // 8, a.steps), size=min(a.jumps, a.steps // 2), replace=False).tolist())
    perms = [np.arange(experts) for _ in range(n)]
    out = np.zeros((a.steps, layers, experts), dtype=np.uint32)
    expected = np.zeros((a.steps, layers, experts)) if a.expected_out else None
    for t in range(a.steps):
        if t in jump_at:
            logits = rng.normal(0, 2.0, n)
            if rng.random() < 0.5:
                c = int(rng.integers(n))
                perms[c] = rng.permutation(experts)
        logits = logits + rng.normal(0, a.drift, n) * np.sqrt(n)
        w = np.exp(logits - logits.max())
        w /= w.sum()
        mix = np.zeros((layers, experts))
        for c in range(n):
            its = comps[c].shape[0]
            x = t / a.iteration_steps
            i0 = int(x) % its
            i1 = (i0 + 1) % its
            f = x - int(x)
            dist = (1 - f) * comps[c][i0] + f * comps[c][i1]
            mix += w[c] * dist[:, perms[c]]
        for l in range(layers):
            out[t, l] = rng.multinomial(a.tokens, mix[l] / mix[l].sum())
            if expected is not None:
                expected[t, l] = a.tokens * mix[l] / mix[l].sum()
    np.save(a.out, out)
    if expected is not None:
        np.save(a.expected_out, expected)
    print(f"{a.out}: {a.steps} steps x {layers} layers x {experts} experts, {n} components, jumps at {sorted(jump_at)}",
          file=sys.stderr)


if __name__ == "__main__":
    main()

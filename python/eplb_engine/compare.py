"""Compares reports of ``python -m eplb_engine.gpu``: the same engine, trace and tokens, run
without a sidecar (static placement) and with ``eplb-worker`` beside it (live), and optionally a
static run with a migration benchmark running beside it on the same GPUs (interference).

    python -m eplb_engine.compare static.json live.json [--interference busy.json] [--out cmp.json]

* outputs: every rank's 64-bit fingerprint of every layer's combined output, step by step;
* the MoE time of a step over the steps after the live run's last layer switch (at least the last
  quarter), static vs live, and the ideal speed-up 1 / balancedness_static over the same steps.
  CUDA events around the expert GEMMs of every layer on every rank; the step's MoE time is the
  sum over layers of the slowest rank's time in that layer (expert parallelism waits for it at
  every layer's collective), the measure 1 / balancedness (a mean over layers of max / mean) is
  the ideal of. The slowest rank's sum over all layers is reported too: it hides imbalance that
  alternates between ranks from layer to layer;
* the apply stall of every layer switch (the engine's in-place copy, waited for);
* interference: how much longer a static step (and its MoE time) takes while migrations run.
Exit 1 when the outputs differ or a report shows wrong bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

import numpy as np

from .loads import balancedness


def _stats(a) -> Dict[str, float]:
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    return {"count": int(a.size), "median": float(np.median(a)), "mean": float(a.mean()),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def compare(static: Dict, live: Dict, busy: Optional[Dict] = None, warmup: int = 10) -> Dict:
    steps = min(len(static["moe_ms_slowest_rank"]), len(live["moe_ms_slowest_rank"]))
    fs, fl = np.array(static["fingerprints"], dtype=object), np.array(live["fingerprints"], dtype=object)
    differ = [t for t in range(steps) if any(fs[r][t] != fl[r][t] for r in range(len(fs)))]
    last_commit = max([c[0] for c in live["commits"]], default=-1)
    start = max(last_commit + 1, steps - steps // 4, warmup)
    win = slice(start, steps)
    ms_static = np.array(static["moe_ms_sum_of_layer_max"][win])
    ms_live = np.array(live["moe_ms_sum_of_layer_max"][win])
    sr_static = np.array(static["moe_ms_slowest_rank"][win])
    sr_live = np.array(live["moe_ms_slowest_rank"][win])
    pairs_static, pairs_live = np.array(static["pairs_static"])[win], np.array(live["pairs_live"])[win]
    bal_static = balancedness(np.array(static["pairs_static"])[win])
    bal_live = balancedness(np.array(live["pairs_live"])[win])
    ideal = 1.0 / bal_static
    speedup = float(np.median(ms_static) / np.median(ms_live))
    speedup_sr = float(np.median(sr_static) / np.median(sr_live))
    # What the placements achieved on the token-expert pairs alone (a GEMM time proportional to
    # them would give this speed-up).
    pairs_speedup = float(pairs_static.max(axis=2).sum(axis=1).mean() / pairs_live.max(axis=2).sum(axis=1).mean())
    applies = live.get("applies", [])
    out = {
        "steps": steps,
        "outputs_bitwise_identical": not differ,
        "steps_with_different_outputs": differ[:20],
        "wrong_bytes_live": live["wrong_bytes"],
        "applied_bytes_checked": live.get("applied_bytes_checked", 0),
        "commit_step_disagreements": live["commit_step_disagreements"],
        "layers_committed": live["layers_committed"],
        "last_commit_step": last_commit,
        "window": [start, steps],
        "balancedness_static": bal_static,
        "balancedness_live": bal_live,
        "ideal_speedup": ideal,
        "moe_ms_static": _stats(ms_static),
        "moe_ms_live": _stats(ms_live),
        "speedup": speedup,
        "fraction_of_ideal_speedup": (speedup - 1.0) / (ideal - 1.0) if ideal > 1.0 else None,
        "pairs_speedup": pairs_speedup,
        "moe_ms_slowest_rank_all_layers_static": _stats(sr_static),
        "moe_ms_slowest_rank_all_layers_live": _stats(sr_live),
        "speedup_slowest_rank_all_layers": speedup_sr,
        "apply_stall_us_per_layer": _stats([a["stall_us"] for a in applies]),
        "apply_gpu_us_per_layer": _stats([a["gpu_us"] for a in applies]),
        "apply_experts_per_layer": _stats([len(a["slots"]) for a in applies]),
        "expert_bytes": live["expert_bytes"],
        "grouped_gemm": bool(static["grouped_gemm"] and live["grouped_gemm"]),
    }
    if busy is not None:
        n = min(steps, len(busy["step_ms_rank0"]))
        w = slice(warmup, n)
        base_step = np.median(static["step_ms_rank0"][w])
        busy_step = np.median(busy["step_ms_rank0"][w])
        base_moe = np.median(static["moe_ms_sum_of_layer_max"][w])
        busy_moe = np.median(busy["moe_ms_sum_of_layer_max"][w])
        out["interference"] = {
            "step_ms_alone": float(base_step), "step_ms_beside_migrations": float(busy_step),
            "step_slowdown": float(busy_step / base_step - 1.0),
            "moe_ms_alone": float(base_moe), "moe_ms_beside_migrations": float(busy_moe),
            "moe_slowdown": float(busy_moe / base_moe - 1.0),
            "outputs_bitwise_identical": all(busy["fingerprints"][r][:n] == static["fingerprints"][r][:n]
                                             for r in range(len(static["fingerprints"]))),
        }
    # The live run's own steps while it was still switching layers, against the same static steps.
    if last_commit > warmup:
        w = slice(warmup, last_commit + 1)
        out["step_ms_while_rebalancing"] = {"static": float(np.median(static["step_ms_rank0"][w])),
                                            "live": float(np.median(live["step_ms_rank0"][w]))}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eplb_engine.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("static")
    p.add_argument("live")
    p.add_argument("--interference", help="a static run with migrations running beside it")
    p.add_argument("--out", help="write the comparison as JSON")
    a = p.parse_args(argv)
    load = lambda path: json.load(open(path))  # noqa: E731
    r = compare(load(a.static), load(a.live), load(a.interference) if a.interference else None)
    s, l = r["moe_ms_static"], r["moe_ms_live"]
    print(f"# outputs bitwise identical at every step: {r['outputs_bitwise_identical']} ({r['steps']} steps) | "
          f"wrong bytes {r['wrong_bytes_live']} of {r['applied_bytes_checked']} applied | layers committed "
          f"{r['layers_committed']} (last at step {r['last_commit_step']})")
    print(f"# steps {r['window'][0]}..{r['window'][1]}: MoE ms a step (slowest rank of each layer), median static "
          f"{s['median']:.3f} live {l['median']:.3f}: speed-up {r['speedup']:.3f}, ideal 1/balancedness_static "
          f"{r['ideal_speedup']:.3f} (balancedness static {r['balancedness_static']:.4f}, live {r['balancedness_live']:.4f}; "
          f"on the pairs alone {r['pairs_speedup']:.3f}); slowest rank over all layers: speed-up "
          f"{r['speedup_slowest_rank_all_layers']:.3f}")
    st = r["apply_stall_us_per_layer"]
    if st.get("count"):
        print(f"# apply stall per layer: median {st['median']:.1f} us, max {st['max']:.1f} us "
              f"({r['apply_experts_per_layer']['median']:.0f} experts of {r['expert_bytes'] / 2**20:.1f} MiB a layer)")
    if "interference" in r:
        i = r["interference"]
        print(f"# interference: step {i['step_ms_alone']:.2f} -> {i['step_ms_beside_migrations']:.2f} ms "
              f"({100 * i['step_slowdown']:+.1f}%), MoE {i['moe_ms_alone']:.3f} -> {i['moe_ms_beside_migrations']:.3f} ms "
              f"({100 * i['moe_slowdown']:+.1f}%)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)
    return 0 if r["outputs_bitwise_identical"] and r["wrong_bytes_live"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

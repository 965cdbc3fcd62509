#!/usr/bin/env python3
"""Quality benchmark of the placement policies on the shared real traces, measured by `plan`.

Drift: on the Qwen1.5-MoE per-iteration trace, for every iteration t >= 1 plan on iteration t
and judge the plan on iteration t+1 (`--eval-iteration`). The incremental policy starts from its
own plan of t-1 (`--previous`); DeepSeek plans fresh, and its moves are the copies that differ
between its consecutive fresh plans. Static: fresh plans of the summed Qwen3 loads.

Prints Markdown tables (DeepSeek beside incremental, same run). Usage:
  scripts/bench_policy.sh [--shared DIR] [--bin PATH] [--reps N] [--move-cost X]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plan(args, extra, out):
    cmd = [args.bin, "plan", *extra, "--output", out]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    with open(out) as f:
        return json.load(f)["metrics"]


def drift(args, tmp):
    trace = os.path.join(args.shared, "traces/harmoeny_qwen15moe_switch/expert_freq_qwen_policy_datasets.csv")
    steps = 20
    print("### Drift: Qwen1.5-MoE per-iteration trace (60 experts, 12 layers), plan on t, judged on t+1\n")
    print(f"Iterations t = 1..{steps - 2} (iteration 0 is the fresh seed plan of both). `moved`: expert copies")
    print("moved over all transitions and layers; `bal t+1`: mean next-step balancedness.\n")
    print("| dataset | shape | deepseek moved | incremental moved | ratio | deepseek bal t+1 | incremental bal t+1 | diff |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for dataset in ["wikitext", "wmt19"]:
        for gpus, slots in [(4, 64), (6, 66)]:
            shape = ["--num-replicas", str(slots), "--num-gpus", str(gpus)]
            base = ["--load", trace, "--dataset", dataset, *shape]
            moved = {"deepseek": 0, "incremental": 0}
            bal = {"deepseek": [], "incremental": []}
            for policy in ["deepseek", "incremental"]:
                prev = None
                for t in range(0, steps - 1):
                    out = os.path.join(tmp, f"{dataset}_{gpus}_{policy}_{t}.json")
                    extra = [*base, "--policy", policy, "--iteration", str(t), "--eval-iteration", str(t + 1)]
                    if policy == "incremental" and args.move_cost is not None:
                        extra += ["--move-cost", str(args.move_cost)]
                    if prev is not None:
                        extra += ["--previous", prev]
                    m = plan(args, extra, out)
                    if t >= 1:
                        moved[policy] += m["copies_moved"]
                        bal[policy].append(m["eval"]["balancedness"])
                    prev = out
            d, i = statistics.mean(bal["deepseek"]), statistics.mean(bal["incremental"])
            ratio = moved["incremental"] / max(1, moved["deepseek"])
            ok &= ratio <= 0.25 and i >= d - 0.002
            print(f"| {dataset} | EP{gpus}, {slots} slots | {moved['deepseek']} | {moved['incremental']} | "
                  f"{ratio:.3f} | {d:.4f} | {i:.4f} | {i - d:+.4f} |")
    print(f"\nTargets (ratio <= 0.25, bal >= deepseek - 0.002): {'met' if ok else 'NOT met'}\n")
    return ok


def static(args, tmp):
    print("### Static: fresh plans of the summed Qwen3 loads\n")
    print(f"`plan ms`: median `metrics.plan_seconds` of {args.reps} runs (the policy alone, all cores).\n")
    print("| model | shape | deepseek bal | incremental bal | deepseek plan ms | incremental plan ms |")
    print("|---|---|---|---|---|---|")
    ok = True
    d = os.path.join(args.shared, "traces/qwen3_sglang_recorder")
    for name, path in [("Qwen3-235B", "counts235b_qwen3-235b-a22b-fp8.json"), ("Qwen3-30B", "counts30b_qwen3-30b-a3b.json")]:
        for gpus, slots, need in [(32, 160, 0.995), (64, 192, 0.97)]:
            res = {}
            for policy in ["deepseek", "incremental"]:
                times, b = [], None
                for _ in range(args.reps):
                    m = plan(args, ["--load", os.path.join(d, path), "--num-replicas", str(slots),
                                    "--num-gpus", str(gpus), "--policy", policy], os.path.join(tmp, "static.json"))
                    times.append(m["plan_seconds"] * 1e3)
                    b = m["balancedness"]
                res[policy] = (b, statistics.median(times))
            if name == "Qwen3-235B":
                ok &= res["incremental"][0] >= need
            print(f"| {name} | EP{gpus}, R={slots} | {res['deepseek'][0]:.4f} | {res['incremental'][0]:.4f} | "
                  f"{res['deepseek'][1]:.2f} | {res['incremental'][1]:.2f} |")
    print(f"\nTargets (Qwen3-235B: >= 0.995 at EP32, >= 0.97 at EP64): {'met' if ok else 'NOT met'}\n")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=os.environ.get("EPLB_SHARED", os.path.join(ROOT, "../shared")))
    p.add_argument("--bin", default=os.path.join(ROOT, "target/release/eplb-worker"))
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--move-cost", type=float, default=None)
    p.add_argument("--only", choices=["drift", "static"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ok = True
        if args.only != "static":
            ok &= drift(args, tmp)
        if args.only != "drift":
            ok &= static(args, tmp)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

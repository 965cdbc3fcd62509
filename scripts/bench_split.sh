#!/usr/bin/env bash
# The split tables of docs/bench/split.md (issue 22): Switch-128-like drifting traces
# (scripts/make_drift_trace.py, tokens multinomially sampled), `simulate` with the default manager
# (only the cost-model flags), policy incremental (the default) and spread, dispatched even and split.
#
#   scripts/bench_split.sh [OUT_DIR]        # needs numpy and a release build
#   CASES="41 4096 16 32" scripts/bench_split.sh   # seed tokens GPUs..., one case a line
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/eplb-bench-split}
mkdir -p "$out"
bin=${EPLB_BIN:-target/release/eplb-worker}
py=${PYTHON:-python3}
cost=(--expert-bytes 88080384 --migration-gbps 900 --step-ms 14.6484375)
cases=("31 4096 16 32" "31 16384 16" "41 4096 16 32" "41 16384 16")
if [ -n "${CASES:-}" ]; then mapfile -t cases <<<"$CASES"; fi
echo "| trace | EP | policy | even: step bal | split: step bal | split: dispatch modeled s | changed slots |"
echo "|---|---|---|---|---|---|---|"
for c in "${cases[@]}"; do
  read -r seed tokens gpus <<<"$c"
  trace="$out/switch128-s$seed-t$tokens.npy"
  [ -f "$trace" ] || "$py" scripts/make_drift_trace.py --family switch128 --steps 4096 --seed "$seed" \
    --tokens "$tokens" --out "$trace" 2>/dev/null
  for g in $gpus; do
    for policy in incremental spread; do
      for d in even split; do
        RUST_LOG=error "$bin" simulate --trace "$trace" --num-gpus "$g" --num-redundant-experts "$g" "${cost[@]}" \
          --policy "$policy" --dispatch "$d" --report "$out/s$seed-t$tokens-ep$g-$policy-$d.json" >/dev/null
      done
      "$py" - "$out/s$seed-t$tokens-ep$g-$policy" "switch128 seed $seed, $tokens tok" "$g" "$policy" <<'PY'
import json, sys
p = sys.argv[1]
e = json.load(open(p + "-even.json"))["cases"][0]
s = json.load(open(p + "-split.json"))["cases"][0]
assert e["changed_slots"] == s["changed_slots"]  # the dispatch does not change the placements
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {e['mean_step_balancedness']:.4f} | **{s['mean_step_balancedness']:.4f}** | {s['dispatch_modeled_seconds']:.2f} | {s['changed_slots']} |")
PY
    done
  done
done

#!/usr/bin/env bash
# The `simulate` tables of BENCHMARKS.md: drifting, jumping, sampled traces (scripts/make_drift_trace.py)
# scored in the competition's cost model, the default manager (only the cost-model flags set)
# beside DeepSeek re-planned every 32/128/256/1024 steps and the hindsight floor.
#
#   scripts/bench_simulate.sh [OUT_DIR]      # needs numpy (pip install numpy) and a release build
#   EPLB_BIN=/path/to/eplb-worker scripts/bench_simulate.sh   # another build (e.g. an older commit)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/eplb-bench-simulate}
mkdir -p "$out"
bin=${EPLB_BIN:-target/release/eplb-worker}
steps=4096
cost=(--expert-bytes 88080384 --migration-gbps 900 --step-ms 14.6484375)
base=(--baseline deepseek@32 --baseline deepseek@128 --baseline deepseek@256 --baseline deepseek@1024 --floor)
# family seed tokens GPUs...
cases=(
  "switch128 1 8192 16 32"
  "switch128 2 8192 16 32"
  "qwen15 1 8192 4 6"
  "qwen15 2 8192 4 6"
  "qwen15 3 2048 4"
  "olmoe 1 8192 8 16"
  "olmoe 2 65536 8"
  "qwen3 1 8192 32"
  # New seeds and token counts (the half-judging change was compared on them too).
  "switch128 11 4096 16"
  "qwen15 12 4096 4"
  "qwen15 13 2048 6"
  "olmoe 14 8192 8"
  "olmoe 15 16384 16"
  "olmoe 16 4096 8"
  "qwen3 17 16384 32"
  # Held out: measured once, after the change was fixed.
  "switch128 21 8192 32"
  "qwen15 22 4096 6"
  "olmoe 23 8192 16"
  "olmoe 24 32768 8"
  "qwen3 25 8192 32"
)
echo "| trace | EP | DeepSeek@32 | @128 | @256 | @1024 | eplb (default) | floor | gap closed | eplb changed slots |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for c in "${cases[@]}"; do
  read -r family seed tokens gpus <<<"$c"
  trace="$out/$family-s$seed-t$tokens.npy"
  [ -f "$trace" ] || python3 scripts/make_drift_trace.py --family "$family" --steps $steps --seed "$seed" \
    --tokens "$tokens" --out "$trace" 2>/dev/null
  for g in $gpus; do
    report="$out/$family-s$seed-t$tokens-ep$g.json"
    "$bin" simulate --trace "$trace" --num-gpus "$g" --num-redundant-experts "$g" "${cost[@]}" "${base[@]}" \
      --report "$report" >/dev/null
    python3 - "$report" "$family seed $seed, $tokens tok" "$g" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
t = {c["name"]: c for c in r["cases"]}
m = lambda n: t[n]["modeled_seconds"]
best = min(m(f"deepseek@{n}") for n in (32, 128, 256, 1024))
closed = (best - m("eplb")) / (best - m("floor")) * 100
print(f"| {sys.argv[2]} | {sys.argv[3]} | " + " | ".join(f"{m(f'deepseek@{n}'):.2f}" for n in (32, 128, 256, 1024))
      + f" | **{m('eplb'):.2f}** | {m('floor'):.2f} | {closed:.0f}% | {t['eplb']['changed_slots']} |")
EOF
  done
done

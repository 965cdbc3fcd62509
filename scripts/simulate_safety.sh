#!/usr/bin/env bash
# The safety net of a refactor of the Manager/Policy (issue 23, item 2): `simulate` on the shared
# real traces (Qwen3 30B/235B, Qwen1.5-MoE, Switch-128, and a 160-step concatenation of the
# Qwen1.5 datasets so that the time mode has steps to act on) with every manager mode (time, xLLM
# rounds every N steps, rounds every S seconds of the simulated clock, a fixed --move-cost),
# every policy (deepseek, incremental = the default, spread), both dispatches (even, split), a
# deepseek@N baseline and the floor. The JSON reports' score fields (nothing wall-clock) go to
# OUT/NAME.json; with a second directory, prints the diff of the two (empty: bit-identical).
#
#   scripts/simulate_safety.sh target/safety-before          # record (release build needed)
#   scripts/simulate_safety.sh target/safety-after target/safety-before   # record and diff
#   EPLB_BIN=/path/to/eplb-worker TRACES=/path/to/traces scripts/simulate_safety.sh OUT
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/simulate_safety.sh OUT_DIR [BEFORE_DIR]}
before=${2:-}
bin=${EPLB_BIN:-target/release/eplb-worker}
traces=${TRACES:-$(cd .. && pwd)/shared/traces}
[ -d "$traces" ] || traces=/work/shared/traces
py=${PYTHON:-python3}
mkdir -p "$out/traces"
# A longer trace with a time axis, numpy-free: the 4 Qwen1.5 datasets one after the other, twice.
qcsv="$traces/harmoeny_qwen15moe_switch/expert_freq_qwen_policy_datasets.csv"
"$py" - "$qcsv" "$out/traces/qwen15_cycle.npy" <<'PY'
import csv, struct, sys
rows: dict = {}
with open(sys.argv[1]) as f:
    r = csv.reader(f)
    next(r)
    for row in r:
        rows.setdefault((row[1], int(row[2])), {})[int(row[3])] = [int(float(x)) for x in row[4:]]
steps = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1]))] * 2
layers, experts = len(steps[0]), len(steps[0][0])
header = "{'descr': '<u4', 'fortran_order': False, 'shape': (%d, %d, %d), }" % (len(steps), layers, experts)
header += " " * (63 - (10 + len(header)) % 64) + "\n"
with open(sys.argv[2], "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
    for s in steps:
        for layer in range(layers):
            f.write(struct.pack("<%dI" % experts, *s[layer]))
PY
# name | trace | shape flags
cases=(
  "qwen3_30b|$traces/qwen3_sglang_recorder/counts30b_qwen3-30b-a3b.json|--num-gpus 8"
  "qwen3_235b|$traces/qwen3_sglang_recorder/counts235b_qwen3-235b-a22b-fp8.json|--num-gpus 16 --num-redundant-experts 16 --num-nodes 2 --num-groups 8"
  "qwen15|$qcsv|--num-gpus 4"
  "qwen15_wmt19|$qcsv|--num-gpus 4 --trace-dataset wmt19"
  "switch128|$traces/harmoeny_qwen15moe_switch/expert_freq_switch128_datasets.csv|--num-gpus 8"
  "qwen15_cycle|$out/traces/qwen15_cycle.npy|--num-gpus 4 --num-redundant-experts 8"
)
modes=(
  "time|"
  "time_lps2|--eplb-layers-per-step 2"
  "time_movecost|--move-cost 0.002"
  "rounds_steps|--eplb-update-interval-steps 4 --eplb-window-steps 4 --eplb-update-threshold 0.99"
  "rounds_seconds|--eplb-update-interval 0.05 --eplb-min-improvement 0.01 --eplb-layers-per-step 0"
)
cost=(--expert-bytes 88080384 --migration-gbps 900 --step-ms 14.6484375 --baseline deepseek@4 --floor)
n=0
for c in "${cases[@]}"; do
  IFS='|' read -r name trace shape <<<"$c"
  for m in "${modes[@]}"; do
    IFS='|' read -r mode mflags <<<"$m"
    for policy in deepseek incremental spread; do
      for dispatch in even split; do
        id="${name}.${mode}.${policy}.${dispatch}"
        # shellcheck disable=SC2086
        RUST_LOG=error "$bin" simulate --trace "$trace" $shape "${cost[@]}" $mflags --policy "$policy" \
          --dispatch "$dispatch" --report "$out/$id.full.json" >/dev/null
        # The score fields only (no paths, no wall clock): every case's numbers, and the header.
        jq -S 'del(.trace)' "$out/$id.full.json" >"$out/$id.json"
        rm "$out/$id.full.json"
        n=$((n + 1))
      done
    done
  done
done
echo "# simulate_safety: $n reports in $out" >&2
if [ -n "$before" ]; then
  echo "# diff of the score fields, $before vs $out (empty: bit-identical):" >&2
  diff -r -x traces "$before" "$out" && echo "# no difference in $n reports" >&2
fi

#!/usr/bin/env bash
# Issue 19's one-GPU goal: the DeepSeek-V3-shaped FP8 table on ONE GPU (one engine rank and one
# worker rank): 58 layers x 4 tensors (w13_weight, w2_weight fp8 e4m3, w13_weight_scale_inv,
# w2_weight_scale_inv fp32; H 7168, I 2048: 44,050,944 bytes an expert), 9 slots, every tensor
# its own PyTorch allocation, shared through CUDA IPC. The worker forces a sequence of placements
# inside the rank (slot permutations and replica changes; balance cannot change on one rank) and
# stages, verifies and applies them as usual.
#
#   scripts/bench_gpu_attach.sh [--steps S] [--layers L] [--force-every N] [--tokens T] [--top-k K]
#                               [--out DIR] [--timeout SECONDS] [--no-baseline] [-- EXTRA eplb-worker run FLAGS]
#
# The worker runs `eplb-worker run --force-moves N` (every N steps one layer, the layers in turn,
# gets a new placement inside the rank: its 9 slots rotated, every other time a redundant replica
# replaced; --force-every N, default 2).
#
# Prints: the engine's attach time (region created, one IPC handle exported per distinct
# allocation, published), the handles and tensors, the worker's own open time (from its report),
# the apply stall per layer (the whole at_step_boundary that applied: agreement, the device
# copies of every per-expert tensor, waited for), layers committed, wrong bytes of every applied
# slot (every per-expert tensor regenerated and compared), global bytes changed, the staging
# memory, and (unless --no-baseline) whether the outputs were bitwise identical to the same engine
# without the worker at every step (a 64-bit fingerprint of every layer's output each step).
# The forward pass computes --tokens tokens a step (default 256, top-2): a 44 MB expert's full
# batch is not needed to check the outputs; every layer's slots are dequantised every step.
#
# Needs: one NVIDIA GPU, python3 with torch, mpi4py and numpy (python/ of this checkout is put on
# PYTHONPATH), Open MPI, and the built worker (target/release/eplb-worker, or EPLB_WORKER=path).
# Exit 0 only if both runs ended well, nothing wrong was applied, no global byte changed, and the
# outputs were identical.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=60 layers=58 every=2 tokens=256 topk=2 out="" limit=540 baseline=1 name="dsv3-$$"
extra=()
while (($#)); do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --force-every) every=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --top-k) topk=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --timeout) limit=$2; shift 2 ;;
    --no-baseline) baseline=0; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 0 ;;
    *) echo "bench_gpu_attach.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in "$steps" "$layers" "$every" "$tokens" "$topk" "$limit"; do
  [[ $v =~ ^[0-9]+$ ]] || { echo "bench_gpu_attach.sh: '$v' is not a number" >&2; exit 2; }
done
PY=${EPLB_PYTHON:-python3}
WORKER=${EPLB_WORKER:-target/release/eplb-worker}
[ -x "$WORKER" ] || { echo "bench_gpu_attach.sh: $WORKER not found (cargo build --release, or EPLB_WORKER)" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "bench_gpu_attach.sh: no nvidia-smi: this needs an NVIDIA GPU" >&2; exit 2; }
"$PY" -c "import torch, mpi4py, numpy" 2>/dev/null || { echo "bench_gpu_attach.sh: $PY lacks torch, mpi4py or numpy" >&2; exit 2; }
[ -n "$out" ] || out=$(mktemp -d "${TMPDIR:-/tmp}/eplb-dsv3.XXXXXX")
mkdir -p "$out"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
unset PYTORCH_CUDA_ALLOC_CONF PYTORCH_ALLOC_CONF || true
export OMPI_MCA_btl_vader_backing_directory=$out
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none -n 1 -x NCCL_NVLS_ENABLE -x PYTHONPATH
     -x PYTHONUNBUFFERED -x CUDA_VISIBLE_DEVICES -x RUST_LOG)

# The worker's one-GPU forced-moves mode.
"$WORKER" run --help 2>&1 | grep -q -- '--force-moves' || {
  echo "bench_gpu_attach.sh: $WORKER run has no --force-moves: build the contract-2 worker (cargo build --release)" >&2; exit 2; }
force=(--force-moves "$every")

engine=(-m eplb_engine.gpu --deepseek-v3 --num-layers "$layers" --steps "$steps" --tokens "$tokens" --top-k "$topk"
        --log-every 10)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for n in "$name" "$name-static"; do "$PY" -m eplb_client cleanup "$n" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rc=0
echo "# bench_gpu_attach: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), DeepSeek-V3 FP8 table," \
     "$layers layers, $steps steps, results in $out"

if [ "$baseline" = 1 ]; then
  echo "# static: ${mpi[*]} $PY ${engine[*]} --name $name-static"
  timeout -k 10 "$limit" "${mpi[@]}" "$PY" "${engine[@]}" --name "$name-static" --report "$out/static.json" \
    >"$out/static.log" 2>&1 || { echo "# the static run failed:"; tail -n 30 "$out/static.log"; rc=1; }
fi

echo "# live: engine ${mpi[*]} $PY ${engine[*]} --name $name --wait-sidecar 300"
timeout -k 10 "$limit" "${mpi[@]}" "$PY" "${engine[@]}" --name "$name" --wait-sidecar 300 --report "$out/live.json" \
  >"$out/live.log" 2>&1 &
epid=$!
pids+=("$epid")
side=("${mpi[@]}" "$WORKER" run --engine "shm:$name" --transport nccl --steps "$steps" "${force[@]}"
      --report "$out/sidecar.json" "${extra[@]}")
echo "# live: worker ${side[*]}"
timeout -k 10 "$limit" "${side[@]}" >"$out/sidecar.log" 2>&1 &
spid=$!
pids+=("$spid")
erc=0; wait "$epid" || erc=$?
src=0; wait "$spid" || src=$?
if [ "$erc" != 0 ] || [ "$src" != 0 ]; then
  echo "# live run: engine exit $erc, worker exit $src"; tail -n 30 "$out/live.log"; tail -n 30 "$out/sidecar.log"; rc=1
fi

"$PY" - "$out" "$baseline" <<'EOF' || rc=1
import json, os, sys
out, baseline = sys.argv[1], sys.argv[2] == "1"
load = lambda n: json.load(open(os.path.join(out, n))) if os.path.exists(os.path.join(out, n)) else None  # noqa: E731
live, static, side = load("live.json"), load("static.json"), load("sidecar.json")
if live is None:
    print("# no engine report"); sys.exit(1)
st = live["apply_stall_us"]
ap = [a["stall_us"] for a in live["applies"]]
gpu = [a["gpu_us"] for a in live["applies"]]
med = lambda a: sorted(a)[len(a) // 2] if a else 0.0  # noqa: E731
print(f"# device {live['device']}: {live['num_layers']} layers x {live['tensors_per_layer']} tensors, "
      f"{live['slots_per_rank']} slots, expert_bytes {live['expert_bytes']}")
print(f"# attach (engine: region created, IPC handles exported, published): {max(live['attach_s']):.3f} s | "
      f"ipc_handles {live['ipc_handles'][0]} for {live['ipc_tensors']} tensors | weights generated in "
      f"{max(live['weights_generated_s']):.1f} s | staging {live['staging_bytes']} bytes | "
      f"client backend {live.get('client_backend')}")
if side:
    keys = {k: v for k, v in side.items() if any(w in k for w in ("open", "attach", "ipc", "handle", "globals"))}
    print(f"# worker report: {json.dumps(keys)}")
log = os.path.join(out, "sidecar.log")
if os.path.exists(log):
    for line in open(log, errors="replace"):
        if any(w in line.lower() for w in ("ipc", "handle", "opened", "attach")):
            print(f"# worker log: {line.rstrip()[:300]}")
print(f"# apply stall a layer (at_step_boundary that applied): {st.get('count', 0)} applies, median "
      f"{st.get('median', 0):.1f} us, p99 {st.get('p99', 0):.1f} us, max {st.get('max', 0):.1f} us | the device copies "
      f"alone: median {med(ap):.1f} us wall, {med(gpu):.1f} us GPU")
print(f"# layers committed {live['layers_committed']} | wrong bytes {live['wrong_bytes']} of "
      f"{live['applied_bytes_checked']} applied bytes checked | global_bytes_changed {live['global_bytes_changed']}")
ok = live["wrong_bytes"] == 0 and live["global_bytes_changed"] == 0 and live["layers_committed"] >= 1
if baseline:
    if static is None:
        print("# no static report"); sys.exit(1)
    n = min(len(static["fingerprints"][0]), len(live["fingerprints"][0]))
    same = static["fingerprints"][0][:n] == live["fingerprints"][0][:n] and n == live["steps"]
    print(f"# outputs bitwise identical to the engine alone at every step: {same} ({n} steps)")
    ok = ok and same
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"attach_s": max(live["attach_s"]), "ipc_handles": live["ipc_handles"][0], "ipc_tensors": live["ipc_tensors"],
               "apply_stall_us": st, "layers_committed": live["layers_committed"], "wrong_bytes": live["wrong_bytes"],
               "global_bytes_changed": live["global_bytes_changed"], "staging_bytes": live["staging_bytes"],
               "device": live["device"], "ok": ok}, f, indent=1)
sys.exit(0 if ok else 1)
EOF
echo "# bench_gpu_attach: exit $rc"
exit $rc

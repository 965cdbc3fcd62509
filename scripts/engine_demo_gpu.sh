#!/usr/bin/env bash
# The engine sidecar on GPUs (`scripts/engine_demo.sh --gpu ...` runs this): the PyTorch reference
# engine (python -m eplb_engine.gpu, one rank per visible GPU, its expert weights in its own GPU
# memory, shared through CUDA IPC) and `eplb-worker run --engine shm:NAME --transport nccl`
# beside it. Needs NVIDIA GPUs, Open MPI, a python3 with torch and mpi4py, and the worker binary.
#
#   scripts/engine_demo.sh --gpu [--steps S] [--trace FILE [--trace-dataset D]] [--layers N]
#       [--hidden H] [--ffn F] [--tokens T] [--top-k K] [--slots-per-rank S] [--interval-steps N (0: time mode)]
#       [--baseline] [--interference] [--xcheck] [--out DIR] [--timeout SECONDS]
#       [--quant none|fp8-block|nvfp4] [--fp8-block B] [--dispatch even|split]
#       [--split-impl kernel|torch] [-- WORKER RUN FLAGS]
#
# --baseline      first the same engine alone (static placement), then compare step by step:
#                 outputs bitwise identical, MoE time of the slowest rank, ideal speed-up
# --interference  also the static engine while `eplb-worker bench-migrate` (44 MiB experts, NCCL)
#                 migrates back to back on the same GPUs: how much longer a step takes
# --xcheck        the expert math against transformers' Qwen3-MoE block (one GPU), first
# --quant Q       the experts' tensors as vLLM/SGLang store them (default none: bf16), each its own
#                 PyTorch allocation; the summary prints tensors_per_layer, ipc_handles and
#                 global_bytes_changed (must be 0)
# --dispatch D    which replica computes a pair: even ((token + layer) % replicas, default) or split
#                 (the exact min-max quotas of each step, on the GPU; the outputs are the same)
# --split-impl I  split's quotas from the CUDA kernel (eplb_client.split_kernel, default) or from
#                 the PyTorch split (torch); the same quotas
# SIDECAR_NCCL_MAX_NCHANNELS=N caps the NCCL channels (and so the SMs) of the sidecar and of the
# benchmark beside the engine.
# Every run is bounded by --timeout; results (JSON, logs) go to --out (default: a temporary folder).
# Exit 0 only if every run ended well, and (with --baseline) the outputs were bitwise identical
# and no applied byte was wrong.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=200 trace="" dataset="" layers=0 hidden=4096 ffn=1536 tokens=4096 topk=8 spr="" interval=20
baseline=0 interference=0 xcheck=0 out="" limit=300 name="gpu-$$" quant=none fp8_block=128 dispatch=even
split_impl=kernel
extra=()
while (($#)); do
  case "$1" in
    --gpu) shift ;;
    --steps) steps=$2; shift 2 ;;
    --trace) trace=$2; shift 2 ;;
    --trace-dataset) dataset=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --hidden) hidden=$2; shift 2 ;;
    --ffn) ffn=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --top-k) topk=$2; shift 2 ;;
    --slots-per-rank) spr=$2; shift 2 ;;
    --interval-steps) interval=$2; shift 2 ;;
    --baseline) baseline=1; shift ;;
    --interference) interference=1; shift ;;
    --xcheck) xcheck=1; shift ;;
    --out) out=$2; shift 2 ;;
    --timeout) limit=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --quant) quant=$2; shift 2 ;;
    --fp8-block) fp8_block=$2; shift 2 ;;
    --dispatch) dispatch=$2; shift 2 ;;
    --split-impl) split_impl=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "engine_demo.sh --gpu: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in "$steps" "$layers" "$hidden" "$ffn" "$tokens" "$topk" "$interval" "$limit" "$fp8_block" $spr; do
  [[ $v =~ ^[0-9]+$ ]] || { echo "engine_demo.sh --gpu: '$v' is not a number" >&2; exit 2; }
done
[[ $quant == none || $quant == fp8-block || $quant == nvfp4 ]] || { echo "engine_demo.sh --gpu: --quant none|fp8-block|nvfp4" >&2; exit 2; }
[[ $dispatch == even || $dispatch == split ]] || { echo "engine_demo.sh --gpu: --dispatch even|split" >&2; exit 2; }
[[ $split_impl == kernel || $split_impl == torch ]] || { echo "engine_demo.sh --gpu: --split-impl kernel|torch" >&2; exit 2; }
[ -z "$trace" ] || [ -r "$trace" ] || { echo "engine_demo.sh --gpu: cannot read trace $trace" >&2; exit 2; }
PY=${EPLB_PYTHON:-python3}
WORKER=${EPLB_WORKER:-target/release/eplb-worker}
[ -x "$WORKER" ] || { echo "engine_demo.sh --gpu: $WORKER not found (cargo build --release, or EPLB_WORKER)" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "engine_demo.sh --gpu: no nvidia-smi: this needs NVIDIA GPUs" >&2; exit 2; }
"$PY" -c "import torch, mpi4py" 2>/dev/null || { echo "engine_demo.sh --gpu: $PY lacks torch or mpi4py" >&2; exit 2; }
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
[ -n "$out" ] || out=$(mktemp -d "${TMPDIR:-/tmp}/eplb-gpu-demo.XXXXXX")
mkdir -p "$out"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
unset PYTORCH_CUDA_ALLOC_CONF || true
export OMPI_MCA_btl_vader_backing_directory=$out
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none -n "$gpus" -x NCCL_NVLS_ENABLE -x PYTHONPATH
     -x PYTHONUNBUFFERED -x RUST_LOG)

side_env=()
[ -z "${SIDECAR_NCCL_MAX_NCHANNELS:-}" ] || side_env=(-x "NCCL_MAX_NCHANNELS=$SIDECAR_NCCL_MAX_NCHANNELS")
engine=(-m eplb_engine.gpu --steps "$steps" --layers "$layers" --hidden "$hidden" --ffn "$ffn" --tokens "$tokens"
        --top-k "$topk" --log-every 50 --quant "$quant" --fp8-block "$fp8_block" --dispatch "$dispatch"
        --split-impl "$split_impl")
[ -z "$trace" ] || engine+=(--trace "$trace")
[ -z "$dataset" ] || engine+=(--trace-dataset "$dataset")
[ -z "$spr" ] || engine+=(--slots-per-rank "$spr")

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  "$PY" -m eplb_client cleanup "$name" >/dev/null 2>&1 || true
  for n in static busy; do "$PY" -m eplb_client cleanup "$name-$n" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rc=0
echo "# engine_demo --gpu: $gpus GPUs, $steps steps, results in $out"

if [ "$xcheck" = 1 ]; then
  timeout -k 10 "$limit" "$PY" -m eplb_engine.gpu --xcheck --report "$out/xcheck.json" >"$out/xcheck.log" 2>&1 || rc=1
  tail -n 3 "$out/xcheck.log"
fi

run_static() {  # run_static TAG: the engine alone
  echo "# static ($1): ${mpi[*]} $PY ${engine[*]} --name $name-$1"
  timeout -k 10 "$limit" "${mpi[@]}" "$PY" "${engine[@]}" --name "$name-$1" --report "$out/$1.json" \
    >"$out/$1.log" 2>&1 || { echo "# static run $1 failed:"; tail -n 20 "$out/$1.log"; rc=1; }
  grep '^# ' "$out/$1.log" | tail -n 6 || true
}
[ "$baseline" = 0 ] || run_static static

if [ "$interference" = 1 ]; then
  bench=(timeout -k 10 "$limit" "${mpi[@]}" "${side_env[@]}" "$WORKER" bench-migrate --expert-mib 44 --layers 58 --iters 1000000)
  echo "# beside: ${bench[*]}"
  "${bench[@]}" >"$out/bench.log" 2>&1 &
  bpid=$!
  pids+=("$bpid")
  # Until its first migration has been timed: the NCCL warm-up is over.
  for _ in $(seq 600); do grep -q 'GB/s\|busbw\|^ *[0-9]' "$out/bench.log" 2>/dev/null && break; sleep 0.1; done
  sleep 3
  run_static busy
  if kill -0 "$bpid" 2>/dev/null; then echo "# the migrations ran during the whole busy run"; else
    echo "# warning: bench-migrate ended before the busy run did:"; tail -n 5 "$out/bench.log"; fi
  kill -TERM "$bpid" 2>/dev/null || true
  wait "$bpid" 2>/dev/null || true
fi

echo "# live: engine ${mpi[*]} $PY ${engine[*]} --name $name --wait-sidecar 120"
timeout -k 10 "$limit" "${mpi[@]}" "$PY" "${engine[@]}" --name "$name" --wait-sidecar 120 --report "$out/live.json" \
  >"$out/live.log" 2>&1 &
epid=$!
pids+=("$epid")
# --interval-steps 0: the default manager (decisions in time, the step time measured from the
# engine's reported MoE times); N: xLLM rounds every N steps.
rounds=()
[ "$interval" = 0 ] || rounds=(--eplb-update-interval-steps "$interval")
side=("${mpi[@]}" "${side_env[@]}" "$WORKER" run --engine "shm:$name" --transport nccl --steps "$steps"
      "${rounds[@]}" --report "$out/sidecar.json" "${extra[@]}")
echo "# live: sidecar ${side[*]}"
timeout -k 10 "$limit" "${side[@]}" >"$out/sidecar.log" 2>&1 &
spid=$!
pids+=("$spid")
erc=0; wait "$epid" || erc=$?
src=0; wait "$spid" || src=$?
grep '^# ' "$out/live.log" | tail -n 6 || true
grep -v INFO "$out/sidecar.log" | tail -n 12 || true
if [ "$erc" != 0 ] || [ "$src" != 0 ]; then
  echo "# live run: engine exit $erc, sidecar exit $src"; tail -n 30 "$out/live.log"; tail -n 30 "$out/sidecar.log"; rc=1
fi
if [ "$baseline" = 1 ] && [ -f "$out/static.json" ] && [ -f "$out/live.json" ]; then
  cmp=("$PY" -m eplb_engine.compare "$out/static.json" "$out/live.json" --out "$out/compare.json")
  [ ! -f "$out/busy.json" ] || cmp+=(--interference "$out/busy.json")
  "${cmp[@]}" || rc=1
fi
echo "# engine_demo --gpu: exit $rc"
exit $rc

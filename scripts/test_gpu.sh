#!/usr/bin/env bash
# GPU tests, kept outside CI (CI has no GPU). Needs 2 or more NVIDIA GPUs and Open MPI:
#
#   scripts/test_gpu.sh [BINARY]
#
# 1. bench-migrate moves experts with NCCL between all GPUs, and every staged and live byte verifies;
# 2. a flipped staged byte on one rank is caught: nothing is committed, the live weights still
#    verify, and the run exits nonzero;
# 3. a store larger than the GPU exits 2 before the NCCL set-up; a rank hung at its migration ends
#    the job within --timeout, named, with nothing committed;
# 4. `run --transport nccl` end to end, with 0 wrong bytes; with BIG=1 also at DeepSeek-V3 size
#    (58 layers, 8 experts + 1 redundant slot per GPU, 44 MiB experts: 22.4 GiB per GPU);
# 4. where python3 has torch and mpi4py: the PyTorch engine with CUDA IPC weights beside
#    `run --engine shm --transport nccl` (scripts/engine_demo.sh --gpu): layers switched, outputs
#    bitwise identical to the same engine without a sidecar, 0 wrong bytes; the transformers
#    cross-check where transformers is installed.
set -euo pipefail
bin=${1:-target/release/eplb-worker}
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
export NCCL_NVLS_ENABLE=0
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -x RUST_LOG)
tmp=$(mktemp -d)
fail=0
check() { if eval "$2"; then echo "ok   $1"; else echo "FAIL $1"; fail=1; fi; }

"${mpi[@]}" -n "$gpus" "$bin" bench-migrate --expert-mib 1,3 --layers 3 --iters 3 --report "$tmp/r.json" >"$tmp/out1" 2>&1 || true
cat "$tmp/out1"
check "bench-migrate: every byte verifies on $gpus GPUs" \
  "python3 -c \"import json,sys; r=json.load(open('$tmp/r.json'))['results']; sys.exit(0 if r and all(x['wrong_bytes']==0 for x in r) and any(x['recv_experts']>0 for x in r) else 1)\""

set +e
"${mpi[@]}" -n "$gpus" "$bin" bench-migrate --expert-mib 1 --iters 1 --fault-corrupt-rank 1 >"$tmp/out2" 2>&1
rc=$?
set -e
cat "$tmp/out2"
check "a corrupted staged byte fails the run" "[ $rc -ne 0 ]"
check "it is reported as a verification failure" "grep -q 'failed verification' '$tmp/out2'"
check "the live weights still verify after the abort" "grep -q 'verify with 0 wrong bytes' '$tmp/out2'"

set +e
timeout -k 5 120 "${mpi[@]}" -n "$gpus" "$bin" run --transport nccl --num-layers 200 --expert-bytes $((1 << 30)) \
  --steps 2 >"$tmp/out3" 2>&1
rc=$?
set -e
grep -i "error" "$tmp/out3" | head -n 3
check "a store larger than the GPU exits 2 before the NCCL set-up" "[ $rc -eq 2 ] && grep -q 'GPU memory' '$tmp/out3'"

# A rank that hangs where its first migration starts: its peers wait in NCCL (the stream and
# ncclCommGetAsyncError) or MPI, time out, name it and end the job; nothing is committed.
set +e
t0=$(date +%s)
timeout -k 5 120 "${mpi[@]}" -n "$gpus" "$bin" run --transport nccl --eplb-update-interval-steps 5 --timeout 5 \
  --fault hang-transfer-on-rank=1 --report "$tmp/hang.json" >"$tmp/out4" 2>&1
rc=$?
secs=$(($(date +%s) - t0))
set -e
grep -E "error|did not" "$tmp/out4" | head -n 4
check "a rank hung at its migration: exit 1 within --timeout + 30 s (took $secs s)" "[ $rc -eq 1 ] && [ $secs -le 35 ]"
check "it is named, the report says failed, nothing was committed" \
  "grep -q 'rank(s) 1 did not answer' '$tmp/out4' && python3 -c \"import json,sys; r=json.load(open('$tmp/hang.json')); sys.exit(0 if r['status']=='failed' and r['layers_updated']==0 else 1)\""

run_e2e() {
  local name=$1
  shift
  set +e
  "${mpi[@]}" -n "$gpus" "$bin" run --transport nccl --report "$tmp/$name.json" "$@" >"$tmp/$name.out" 2>&1
  local rc=$?
  set -e
  grep -v "INFO" "$tmp/$name.out" | tail -n 25
  check "run --transport nccl ($name) exits 0" "[ $rc -eq 0 ]"
  check "run --transport nccl ($name): plans agreed, experts moved, 0 wrong bytes, live weights verified" \
    "python3 -c \"import json,sys; r=json.load(open('$tmp/$name.json')); sys.exit(0 if r['transport']=='nccl' and r['plans_agreed'] and r['experts_moved']>0 and r['wrong_bytes']==0 and r['wrong_live_bytes']==0 and r['balancedness_live']>r['balancedness_static'] else 1)\""
  if [ -n "${OUT:-}" ]; then cp "$tmp/$name.json" "$tmp/$name.out" "$OUT/" 2>/dev/null || true; fi
}
run_e2e small --steps 40 --eplb-update-interval-steps 10 --verify-live-every-step
if [ "${BIG:-0}" = 1 ]; then
  run_e2e big --num-layers 58 --num-experts $((8 * gpus)) --num-redundant-experts "$gpus" \
    --expert-bytes $((44 * 1024 * 1024)) --steps 120 --eplb-update-interval-steps 30 --eplb-layers-per-step 4
fi
if python3 -c "import torch, mpi4py" 2>/dev/null; then
  xcheck=()
  if python3 -c "import transformers" 2>/dev/null; then xcheck=(--xcheck); fi
  set +e
  EPLB_WORKER="$bin" scripts/engine_demo.sh --gpu --steps 80 --layers 4 --hidden 1024 --ffn 512 --tokens 2048 \
    --interval-steps 10 --baseline "${xcheck[@]}" --out "$tmp/gpuengine" --timeout 200 -- --eplb-min-improvement 0.01 \
    >"$tmp/gpuengine.out" 2>&1
  rc=$?
  set -e
  grep '^#' "$tmp/gpuengine.out" | tail -n 12
  check "engine_demo.sh --gpu exits 0" "[ $rc -eq 0 ]"
  check "GPU engine: layers switched through CUDA IPC, outputs bitwise identical, 0 wrong bytes" \
    "python3 -c \"import json,sys; r=json.load(open('$tmp/gpuengine/compare.json')); sys.exit(0 if r['outputs_bitwise_identical'] and r['layers_committed']>0 and r['wrong_bytes_live']==0 else 1)\""
  if [ ${#xcheck[@]} -gt 0 ]; then
    check "GPU engine: expert math within tolerance of transformers' Qwen3-MoE block" \
      "python3 -c \"import json,sys; sys.exit(0 if json.load(open('$tmp/gpuengine/xcheck.json'))['ok'] else 1)\""
  fi
else
  echo "skip the GPU engine: python3 lacks torch or mpi4py"
fi
exit $fail

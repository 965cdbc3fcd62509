#!/usr/bin/env bash
# GPU tests, kept outside CI (CI has no GPU). Needs 2 or more NVIDIA GPUs and Open MPI:
#
#   scripts/test_gpu.sh [BINARY]
#
# 1. bench-migrate moves experts with NCCL between all GPUs, and every staged and live byte verifies;
# 2. a flipped staged byte on one rank is caught: nothing is committed, the live weights still
#    verify, and the run exits nonzero;
# 3. `run --transport nccl` end to end (when the binary has it), with 0 wrong bytes.
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

if "$bin" run --help >/dev/null 2>&1; then
  set +e
  "${mpi[@]}" -n "$gpus" "$bin" run --transport nccl --steps 40 --eplb-update-interval-steps 10 \
    --report "$tmp/run.json" >"$tmp/out3" 2>&1
  rc=$?
  set -e
  tail -n 30 "$tmp/out3"
  check "run --transport nccl exits 0" "[ $rc -eq 0 ]"
  check "run --transport nccl: plans agreed, experts moved, 0 wrong bytes" \
    "python3 -c \"import json,sys; r=json.load(open('$tmp/run.json')); sys.exit(0 if r['plans_agreed'] and r['experts_moved']>0 and r['wrong_bytes']==0 else 1)\""
fi
exit $fail

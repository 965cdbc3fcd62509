#!/usr/bin/env bash
# NCCL tuning sweep for the GPU executor: bench-migrate under several NCCL settings and group or
# piece sizes, on the same machine in one go; prints the per-rank GB/s of each.
#
#   GPUS=2 scripts/tune_nccl.sh [BINARY]
set -uo pipefail
bin=${1:-target/release/eplb-worker}
gpus=${GPUS:-2}
sizes=${SIZES:-16,44,64}
export NCCL_NVLS_ENABLE=0
base=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -n "$gpus")
# run NAME "EXTRA bench-migrate ARGS" [VAR=VALUE ...]
run() {
  local name=$1 extra=$2
  shift 2
  echo "## $name"
  local pass=()
  for kv in "$@"; do pass+=(-x "$kv"); done
  # shellcheck disable=SC2086
  "${base[@]}" "${pass[@]}" "$bin" bench-migrate --expert-mib "$sizes" --iters 10 $extra 2>&1 | grep -E "^ +[0-9]"
}
run "default (buffers registered with NCCL)" ""
run "buffers not registered" "--register false"
run "not registered, P2P_NVL_CHUNKSIZE=1M BUFFSIZE=8M" "--register false" NCCL_P2P_NVL_CHUNKSIZE=1048576 NCCL_BUFFSIZE=8388608
run "not registered, P2P_NVL_CHUNKSIZE=2M BUFFSIZE=16M" "--register false" NCCL_P2P_NVL_CHUNKSIZE=2097152 NCCL_BUFFSIZE=16777216
run "not registered, MIN_P2P_NCHANNELS=32 MIN_NCHANNELS=32" "--register false" NCCL_MIN_P2P_NCHANNELS=32 NCCL_MIN_NCHANNELS=32
run "not registered, pieces of 4 MiB" "--register false --chunk-mib 4"
run "not registered, one expert per rank per group" "--register false --group-mib 1"

#!/usr/bin/env bash
# GPU executor benchmark (issue 4): eplb's NCCL migration against PyTorch's batch_isend_irecv and
# the cudaMemcpyPeer ceiling, on the identical transfer pattern, plus a DeepSeek-V3-sized full
# rebalance. Run on a machine with 2 or more NVIDIA GPUs, PyTorch and Open MPI:
#
#   scripts/bench_gpu.sh [BINARY] [OUTDIR]
#
# BINARY defaults to target/release/eplb-worker, OUTDIR to ./bench-gpu-out. Set GPUS to use fewer
# GPUs than are visible, LOAD to plan from a load file (plan formats), SIZES for the sweep.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-target/release/eplb-worker}
out=${2:-bench-gpu-out}
mkdir -p "$out"
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
sizes=${SIZES:-4,16,44,64}
iters=${ITERS:-10}
load_args=()
if [ -n "${LOAD:-}" ]; then load_args=(--load "$LOAD"); fi

# NVLink multicast stays off on shared machines; never NCCL_P2P_USE_CUDA_MEMCPY (it hangs there).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -x NCCL_DEBUG -x RUST_LOG)

echo "# $(date -u +%FT%TZ) $(hostname): $gpus GPU(s)"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
nvidia-smi topo -m | head -n $((gpus + 1)) || true

echo "## eplb bench-migrate (NCCL), $gpus ranks"
"${mpi[@]}" -n "$gpus" "$bin" bench-migrate --expert-mib "$sizes" --iters "$iters" "${load_args[@]}" \
  --pattern-out "$out/pattern_$gpus.json" --report "$out/eplb_$gpus.json"

echo "## PyTorch batch_isend_irecv, $gpus ranks, same pattern"
torchrun --standalone --nproc-per-node "$gpus" "$here/bench_torch_p2p.py" nccl "$out/pattern_$gpus.json" \
  --expert-mib "$sizes" --iters "$iters" --json "$out/torch_$gpus.json" 2>&1 | grep -v "^W[0-9]* " || true

echo "## cudaMemcpyPeer ceiling, $gpus GPUs, same pattern"
python3 "$here/bench_torch_p2p.py" peer "$out/pattern_$gpus.json" --expert-mib "$sizes" --iters "$iters" \
  --json "$out/peer_$gpus.json"

if [ "${FULL:-1}" = 1 ]; then
  echo "## full rebalance: 58 layers x 9 slots x 44 MiB per GPU, layer by layer, $gpus ranks"
  "${mpi[@]}" -n "$gpus" "$bin" bench-migrate --expert-mib 44 --layers 58 --iters 2 "${load_args[@]}" \
    --report "$out/full_$gpus.json"
  echo "## PyTorch, same full rebalance"
  torchrun --standalone --nproc-per-node "$gpus" "$here/bench_torch_p2p.py" nccl "$out/pattern_$gpus.json" \
    --expert-mib 44 --layers 58 --iters 2 --json "$out/torch_full_$gpus.json" 2>&1 | grep -v "^W[0-9]* " || true
fi

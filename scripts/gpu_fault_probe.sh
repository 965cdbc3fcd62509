#!/usr/bin/env bash
# GPU fault probe (2 GPUs, kept out of CI): a rank stopped with SIGSTOP during `run --transport nccl
# --timeout 5`; prints the processes every 5 s, then continues and kills what is left.
#   OUT=DIR scripts/gpu_fault_probe.sh [BINARY]
set -u
B=${1:-target/release/eplb-worker}
OUT=${OUT:-$(mktemp -d)}
export NCCL_NVLS_ENABLE=0
mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -n 2 $B run --transport nccl --steps 100000 --step-ms 5 --timeout 5 --report $OUT/stop.json > $OUT/stop.out 2>&1 &
mp=$!
sleep 6
pid=$(pgrep -f "eplb-worker run --transport nccl --steps 100000" | sort -n | tail -1)
kill -STOP "$pid"; echo "stopped pid $pid at $(date +%T.%N)"
for i in 1 2 3 4; do sleep 5; echo "--- +$((i*5)) s"; ps -eo pid,stat,etime,wchan:20,cmd | grep -E "eplb-worker|mpirun|orted" | grep -v grep | cut -c1-150; done
for p in $(pgrep -f "eplb-worker run --transport nccl"); do echo "== stack of $p"; cat /proc/$p/stack 2>/dev/null | head -5; ls /proc/$p/task | wc -l; done
timeout 40 bash -c "while kill -0 $mp 2>/dev/null; do sleep 0.2; done"; echo "after 60s total: waited_rc=$?"
ps -eo pid,stat,cmd | grep -E "eplb-worker|mpirun" | grep -v grep | cut -c1-120
kill -CONT "$pid" 2>/dev/null; sleep 3; echo "after SIGCONT:"; ps -eo pid,stat,cmd | grep -E "eplb-worker|mpirun" | grep -v grep | cut -c1-120
pkill -9 -f eplb-worker; wait $mp; echo "mpirun rc=$?"

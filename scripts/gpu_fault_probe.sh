#!/usr/bin/env bash
# GPU fault probe (2 GPUs, kept out of CI): rank STOP_RANK (default 1) sent SIGNAL (default STOP)
# 6 s into `run --transport nccl --timeout 5 RUN_ARGS` (TRANSPORT=host: the same on the CPU path).
# Prints every process's threads (state, wait channel, kernel stack, and gdb backtraces when gdb is
# there) while the job should be ending, then continues the stopped rank and kills what is left.
#   OUT=DIR [STOP_RANK=1] [SIGNAL=STOP|KILL] [RUN_ARGS="--steps 100000 --step-ms 5"] \
#     scripts/gpu_fault_probe.sh [BINARY]
set -u
B=${1:-target/release/eplb-worker}
OUT=${OUT:-$(mktemp -d)}
STOP_RANK=${STOP_RANK:-1}
TRANSPORT=${TRANSPORT:-nccl}
SIGNAL=${SIGNAL:-STOP}
RUN_ARGS=${RUN_ARGS:---steps 100000 --step-ms 5}
export NCCL_NVLS_ENABLE=0 RUST_LOG=${RUST_LOG:-warn,eplb::failure=debug}
start=$(date +%s.%N)
mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -x RUST_LOG -n 2 "$B" run \
    --transport "$TRANSPORT" $RUN_ARGS --timeout 5 --report "$OUT/stop.json" > "$OUT/stop.out" 2>&1 &
mp=$!
sleep 6
rank_pid() { for p in $(pgrep -f "eplb-worker run --transport"); do
    tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$1" && echo "$p"; done; }
pid=$(rank_pid "$STOP_RANK")
kill -"$SIGNAL" "$pid"; echo "SIG$SIGNAL to rank $STOP_RANK (pid $pid) at +$(awk -v s="$start" -v n="$(date +%s.%N)" "BEGIN{printf \"%.1f\", n-s}") s"
threads() {
    for p in $(pgrep -f "eplb-worker run --transport"); do
        echo "== pid $p rank $(tr '\0' '\n' < /proc/$p/environ | sed -n 's/^OMPI_COMM_WORLD_RANK=//p') $(cut -d' ' -f3 /proc/$p/stat)"
        for t in /proc/$p/task/*; do
            printf '  tid %s %s %-24s %s\n' "${t##*/}" "$(cut -d' ' -f3 "$t/stat")" "$(cat "$t/wchan")" \
                "$(head -3 "$t/stack" 2>/dev/null | awk '{print $2}' | tr '\n' ' ')"
        done
    done
}
for i in 1 2 3; do sleep 5; echo "--- +$((i*5)) s after the stop"; ps -eo pid,stat,etime,cmd | grep -E "eplb-worker|mpirun" | grep -v grep | cut -c1-140; done
threads
if command -v gdb >/dev/null; then
    for p in $(pgrep -f "eplb-worker run --transport"); do
        [ "$p" = "$pid" ] && continue
        echo "== gdb backtraces of pid $p"; timeout 60 gdb -p "$p" -batch -ex 'thread apply all bt 12' 2>&1 | grep -E '^#|^Thread' | cut -c1-160 | head -80
    done
else echo "(no gdb here)"; fi
timeout 20 bash -c "while kill -0 $mp 2>/dev/null; do sleep 0.2; done"; echo "mpirun still running after the wait: $([ $? = 0 ] && echo no || echo yes)"
kill -CONT "$pid" 2>/dev/null; sleep 3; echo "after SIGCONT:"; ps -eo pid,stat,cmd | grep -E "eplb-worker|mpirun" | grep -v grep | cut -c1-120
pkill -9 -f "eplb-worker run --transport"; wait $mp; echo "mpirun rc=$? at +$(awk -v s="$start" -v n="$(date +%s.%N)" "BEGIN{printf \"%.1f\", n-s}") s"
echo "--- job output"; cat "$OUT/stop.out" | cut -c1-300 | tail -30
echo "--- report status: $(grep -o '"status": *"[a-z]*"' "$OUT/stop.json")"

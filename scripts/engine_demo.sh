#!/usr/bin/env bash
# The engine sidecar demo on CPU: the reference MoE engine (python/eplb_engine, N ranks under
# mpirun) and `eplb-worker run --engine shm:NAME` (N ranks under a second mpirun) beside it,
# talking through /dev/shm/eplb-NAME-RANK (docs/engine-contract.md).
#
#   scripts/engine_demo.sh [--ranks N] [--steps S] [--trace FILE [--trace-dataset D]]
#                          [--kill-sidecar-at-step K] [--stop-sidecar-at-step K] [--kill-engine-at-step K]
#                          [--report OUT.json] [--timeout SECONDS] [--interval-steps N] [--sidecar worker|fake]
#                          [--name NAME] [--quant none|fp8-block|nvfp4] [--fp8-block B] [--dispatch even|split]
#                          [--engine python|cpp] [-- EXTRA eplb-worker run FLAGS]
#
# Exits 0 only if the engine finished every step and every step's output matched the reference
# forward pass on every rank. Every process is bounded by --timeout; nothing is left running or in
# /dev/shm. Builds target/release/eplb-worker if it is missing (or EPLB_WORKER=path), and uses
# python3 if it has the package, else the project's venv (scripts/pyvenv.sh; or EPLB_PYTHON=path).
# --sidecar fake runs the Python fake sidecar of python/tests instead of eplb-worker (one process
# for all ranks; for the client's tests).
# --gpu: the PyTorch engine on every visible GPU with CUDA IPC weights and `--transport nccl`
# (scripts/engine_demo_gpu.sh; its --help lists its flags).
# --dispatch: which replica computes a pair (even: (token + layer) % replicas; split: the exact min-max
# quotas of each step, python/eplb_client/split.py, issue 22); the outputs are the same either way.
# --quant: the engine's expert tensors as vLLM/SGLang store them (none: bf16 w13_weight, w2_weight;
# fp8-block: fp8 weights + fp32 block scales, --fp8-block the block edge (default 128); nvfp4:
# packed fp4 weights, fp8 block scales, scale_2, and global input scales that must never move).
# --engine cpp: the C++ reference engine on the C API (examples/cpp_engine, docs/cpp-engine.md; built by
# scripts/build_cpp_engine.sh, or EPLB_CPP_ENGINE=path) instead of the Python one; --quant none and
# --dispatch even only.
set -euo pipefail
cd "$(dirname "$0")/.."
for a in "$@"; do [ "$a" != --gpu ] || exec scripts/engine_demo_gpu.sh "$@"; done

name="demo-$$" ranks=4 steps=200 trace="" dataset="" kill_at="" stop_at="" engine_kill_at="" report="" limit=600 sidecar=worker interval=10
quant=none fp8_block=128 dispatch=even engine=python
extra=()
while (($#)); do
  case "$1" in
    --ranks) ranks=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --trace) trace=$2; shift 2 ;;
    --trace-dataset) dataset=$2; shift 2 ;;
    --kill-sidecar-at-step) kill_at=$2; shift 2 ;;
    --stop-sidecar-at-step) stop_at=$2; shift 2 ;;
    --kill-engine-at-step) engine_kill_at=$2; shift 2 ;;
    --report) report=$2; shift 2 ;;
    --timeout) limit=$2; shift 2 ;;
    --sidecar) sidecar=$2; shift 2 ;;
    --interval-steps) interval=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --quant) quant=$2; shift 2 ;;
    --fp8-block) fp8_block=$2; shift 2 ;;
    --dispatch) dispatch=$2; shift 2 ;;
    --engine) engine=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "engine_demo.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in "$ranks" "$steps" $kill_at $stop_at $engine_kill_at "$limit" "$interval" "$fp8_block"; do
  [[ $v =~ ^[0-9]+$ ]] || { echo "engine_demo.sh: '$v' is not a number" >&2; exit 2; }
done
[[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "engine_demo.sh: --name: only [A-Za-z0-9_.-]" >&2; exit 2; }
[[ $sidecar == worker || $sidecar == fake ]] || { echo "engine_demo.sh: --sidecar worker|fake" >&2; exit 2; }
[[ $quant == none || $quant == fp8-block || $quant == nvfp4 ]] || { echo "engine_demo.sh: --quant none|fp8-block|nvfp4" >&2; exit 2; }
[[ $dispatch == even || $dispatch == split ]] || { echo "engine_demo.sh: --dispatch even|split" >&2; exit 2; }
[[ $engine == python || $engine == cpp ]] || { echo "engine_demo.sh: --engine python|cpp" >&2; exit 2; }
if [ "$engine" = cpp ] && { [ "$quant" != none ] || [ "$dispatch" != even ]; }; then
  echo "engine_demo.sh: --engine cpp has --quant none and --dispatch even only" >&2
  exit 2
fi
[ -z "$trace" ] || [ -r "$trace" ] || { echo "engine_demo.sh: cannot read trace $trace" >&2; exit 2; }

WORKER=${EPLB_WORKER:-target/release/eplb-worker}
# Nothing installed by hand: python3 if it has the package, else the project's venv (made or
# reused by scripts/pyvenv.sh), and the worker built when it is missing.
# The C++ engine needs Python only for the client's tools (cleanup, wait-step) and the summary.
PY=${EPLB_PYTHON:-python3}
need="import eplb_client, eplb_engine, mpi4py"
[ "$engine" = python ] || need="import eplb_client"
if [ -z "${EPLB_PYTHON:-}" ] && ! "$PY" -c "$need" 2>/dev/null; then
  PY=$(scripts/pyvenv.sh) || { echo "engine_demo.sh: scripts/pyvenv.sh failed (or set EPLB_PYTHON)" >&2; exit 1; }
fi
if ! "$PY" -c "$need" 2>/dev/null; then
  echo "engine_demo.sh: $PY lacks eplb_client/mpi4py: pip install -e 'python[engine]' (or unset EPLB_PYTHON)" >&2
  exit 2
fi
if [ "$engine" = cpp ]; then
  CPP_ENGINE=${EPLB_CPP_ENGINE:-}
  if [ -z "$CPP_ENGINE" ]; then
    CPP_ENGINE=$(scripts/build_cpp_engine.sh) || { echo "engine_demo.sh: scripts/build_cpp_engine.sh failed" >&2; exit 1; }
  fi
  [ -x "$CPP_ENGINE" ] || { echo "engine_demo.sh: $CPP_ENGINE is not an executable (EPLB_CPP_ENGINE)" >&2; exit 2; }
fi
if [ "$sidecar" = worker ] && [ -z "${EPLB_WORKER:-}" ] && [ ! -x "$WORKER" ]; then
  (. scripts/lib/setup.sh && eplb_setup && cargo build --release >&2) || exit 1
fi
if [ "$sidecar" = worker ] && [ ! -x "$WORKER" ]; then
  echo "engine_demo.sh: $WORKER not found: cargo build --release (or set EPLB_WORKER)" >&2
  exit 2
fi
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export OPENBLAS_NUM_THREADS=1

work=$(mktemp -d "${TMPDIR:-/tmp}/eplb-demo.XXXXXX")
# Open MPI's shared-memory segments of both jobs go here, not into /dev/shm, so that a killed
# rank leaves nothing behind there.
export OMPI_MCA_btl_vader_backing_directory=$work
engine_pid="" sidecar_pid=""

stop_job() {  # stop_job PID: TERM, then KILL after 5 s (timeout(1)'s group)
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  stop_job "$sidecar_pid"
  stop_job "$engine_pid"
  wait 2>/dev/null || true
  # Regions of ranks that were killed (crash leftovers of this run's name only).
  for _ in $(seq 50); do
    "$PY" -m eplb_client cleanup "$name" >/dev/null 2>&1 || true
    compgen -G "/dev/shm/eplb-$name-*" >/dev/null || compgen -G "/dev/shm/.eplb-$name-*" >/dev/null || break
    sleep 0.1
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mpi=(mpirun -n "$ranks" --oversubscribe)
if [ "$engine" = cpp ]; then
  engine_cmd=("$CPP_ENGINE")
  engine_args=(--name "$name" --steps "$steps" --wait-sidecar 120 --report "$work/engine.json")
else
  engine_cmd=("$PY")
  engine_args=(-m eplb_engine --name "$name" --steps "$steps" --wait-sidecar 120 --report "$work/engine.json"
               --quant "$quant" --fp8-block "$fp8_block" --dispatch "$dispatch")
fi
[ -z "$trace" ] || engine_args+=(--trace "$trace")
[ -z "$dataset" ] || engine_args+=(--trace-dataset "$dataset")
[ -z "$engine_kill_at" ] || engine_args+=(--die-at-step "$engine_kill_at" --die-rank $((ranks - 1)))

echo "# engine_demo: $ranks engine ranks + $ranks sidecar ranks, $steps steps, regions /dev/shm/eplb-$name-*"
echo "# engine:  ${mpi[*]} ${engine_cmd[*]} ${engine_args[*]}"
timeout -k 10 "$limit" "${mpi[@]}" "${engine_cmd[@]}" "${engine_args[@]}" >"$work/engine.log" 2>&1 &
engine_pid=$!
if [ "$sidecar" = worker ]; then
  side=("${mpi[@]}" "$WORKER" run --engine "shm:$name" --steps "$steps" --eplb-update-interval-steps "$interval"
        --report "$work/sidecar.json" "${extra[@]}")
else
  side=("$PY" python/tests/fake_sidecar.py --name "$name" --ranks "$ranks" --every "$interval" "${extra[@]}")
fi
echo "# sidecar: ${side[*]}"
timeout -k 10 "$limit" "${side[@]}" >"$work/sidecar.log" 2>&1 &
sidecar_pid=$!

# Faults: at engine step K, SIGKILL / SIGSTOP the sidecar rank beside engine rank 1 (its pid is in
# that rank's region).
victim_rank=$((ranks > 1 ? 1 : 0))
stopped=""
for spec in "kill:$kill_at" "stop:$stop_at"; do
  what=${spec%%:*} at=${spec#*:}
  [ -n "$at" ] || continue
  if victim=$("$PY" -m eplb_client wait-step "$name" "$victim_rank" "$at" --timeout "$limit" 2>>"$work/engine.log"); then
    if [ "$what" = kill ]; then
      echo "# engine step $at: SIGKILL sidecar rank $victim_rank (pid $victim)"
      kill -KILL "$victim" 2>/dev/null || true
    else
      echo "# engine step $at: SIGSTOP sidecar rank $victim_rank (pid $victim)"
      kill -STOP "$victim" 2>/dev/null || true
      stopped=$victim
    fi
  fi
done

engine_rc=0
wait "$engine_pid" || engine_rc=$?
engine_pid=""
# The sidecar ends by itself once every engine rank finished (or died); a stopped rank never
# does: end it (SIGKILL works on a stopped process), then its mpirun ends the others.
if [ -n "$stopped" ]; then kill -KILL "$stopped" 2>/dev/null || true; fi
sidecar_rc=0
for _ in $(seq 600); do kill -0 "$sidecar_pid" 2>/dev/null || break; sleep 0.1; done
stop_job "$sidecar_pid"
wait "$sidecar_pid" || sidecar_rc=$?
sidecar_pid=""

sed 's/^/  engine | /' "$work/engine.log" | grep -v '^  engine | $' | tail -n 40
sed 's/^/ sidecar | /' "$work/sidecar.log" | tail -n 40

"$PY" - "$work/engine.json" "$work/sidecar.json" "$steps" "$engine_rc" "$sidecar_rc" "${report:-/dev/null}" <<'EOF'
import json, os, sys
engine_path, sidecar_path, steps, engine_rc, sidecar_rc, out = sys.argv[1:]
e = json.load(open(engine_path)) if os.path.exists(engine_path) else {}
s = json.load(open(sidecar_path)) if os.path.exists(sidecar_path) else {}
r = {
    "engine_steps": e.get("engine_steps", 0),
    "outputs_match": bool(e.get("outputs_match", False)),
    "layers_committed": e.get("layers_committed", 0),
    "commit_step_disagreements": e.get("commit_step_disagreements"),
    "wrong_bytes": e.get("wrong_bytes"),
    "quant": e.get("quant"),
    "tensors_per_layer": e.get("tensors_per_layer"),
    "expert_bytes": e.get("expert_bytes"),
    "global_bytes_changed": e.get("global_bytes_changed"),
    "sidecar_globals_unchanged": s.get("globals_unchanged"),
    "balancedness_static": e.get("balancedness_static"),
    "balancedness_live": e.get("balancedness_live"),
    "sidecar_exit_code": int(sidecar_rc),
    "engine_exit_code": int(engine_rc),
    "placements_agree": e.get("placements_agree"),
    "sidecar_wrong_bytes": s.get("wrong_bytes"),
    "sidecar_layers_updated": s.get("layers_updated"),
    "client_us_median": e.get("client_us_median"),
    "boundary_us": e.get("boundary_us"),
    "boundary_us_no_apply": e.get("boundary_us_no_apply"),
    "apply_us": e.get("apply_us"),
    "commits": e.get("commits"),
}
if out != "/dev/null":
    with open(out, "w") as f:
        json.dump(r, f, indent=1)
print(f"# engine_demo: engine exit {engine_rc}, sidecar exit {sidecar_rc}, steps {r['engine_steps']}/{steps}, "
      f"outputs match {r['outputs_match']}, layers committed {r['layers_committed']}, "
      f"commit step disagreements {r['commit_step_disagreements']}, wrong bytes {r['wrong_bytes']}")
print(f"# quant {r['quant']}: tensors_per_layer {r['tensors_per_layer']}, expert_bytes {r['expert_bytes']}, "
      f"global_bytes_changed {r['global_bytes_changed']}"
      + ("" if r["sidecar_globals_unchanged"] is None else f" (the sidecar's hash: globals unchanged {r['sidecar_globals_unchanged']})"))
if e:
    print(f"# balancedness: static {r['balancedness_static']:.4f}, live {r['balancedness_live']:.4f}")
ok = r["outputs_match"] and r["engine_steps"] == int(steps) and int(engine_rc) == 0 and r["global_bytes_changed"] == 0
sys.exit(0 if ok else 1)
EOF

#!/usr/bin/env bash
# The engine adapters (python/eplb_client/adapters/) against the engines' REAL code, on CPU:
# SGLang 0.5.23 and vLLM 0.33.0, each in its own Python 3.11 virtual environment under target/
# (their torch pins differ: 2.14.1 and 2.14.0). The environments are cached: the first run
# downloads about 4.3 GB each (a few minutes), later runs only check the marker file.
#
#   scripts/test_adapters.sh [--report R.json] [--install-only] [--engine sglang|vllm]
#
# Per engine and per quant scheme (bf16, fp8-block, nvfp4), 4 ranks over Gloo: a placement change
# applied once with the engine's own mover and once through the adapter and
# `eplb-worker run --engine shm:NAME`; bitwise-identical tensors, untouched globals and shared rows,
# the engine's map tensors equal to its own, and recorded loads equal to the engine's own count.
#
# A failed install prints "SKIP" with the reason and exits 0, unless EPLB_REQUIRE_ADAPTERS=1 (then
# it exits 1). A failed check always exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

report=""
install_only=0
engines="sglang vllm"
while [ $# -gt 0 ]; do
  case "$1" in
    --report) report=$2; shift 2 ;;
    --install-only) install_only=1; shift ;;
    --engine) engines=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY311=${PYTHON311:-python3.11}
declare -A pin=([sglang]="sglang==0.5.23" [vllm]="vllm==0.33.0")

# Creates target/venv-$1 with the engine's pinned wheel and eplb_client (editable); idempotent:
# target/venv-$1/.eplb-installed holds the pin once the install has finished.
install_engine() {
  local engine=$1 venv=target/venv-$1
  local marker=$venv/.eplb-installed
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "${pin[$engine]}" ] && [ -x "$venv/bin/python" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e python >/dev/null
    return 0
  fi
  rm -rf "$venv"
  "$PY311" -m venv "$venv" || return 1
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir --upgrade pip || return 1
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir "${pin[$engine]}" || return 1
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e python || return 1
  echo "${pin[$engine]}" >"$marker"
}

declare -A installed
for engine in $engines; do
  t0=$(date +%s)
  if install_engine "$engine" >"target/venv-$engine.log" 2>&1; then
    installed[$engine]=1
    echo "# $engine: target/venv-$engine ready (${pin[$engine]}, $(( $(date +%s) - t0 )) s)"
  else
    installed[$engine]=0
    echo "SKIP $engine: installing ${pin[$engine]} into target/venv-$engine failed (log: target/venv-$engine.log):" >&2
    tail -5 "target/venv-$engine.log" >&2 || true
    if [ "${EPLB_REQUIRE_ADAPTERS:-0}" = 1 ]; then
      echo "error: EPLB_REQUIRE_ADAPTERS=1 and the $engine install failed" >&2
      exit 1
    fi
  fi
done
[ "$install_only" = 1 ] && exit 0

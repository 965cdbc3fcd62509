#!/usr/bin/env bash
# The engine adapters (python/eplb_client/adapters/) against the engines' REAL code, on CPU:
# SGLang 0.5.23 and vLLM 0.33.0, each in its own Python 3.11 virtual environment under target/
# (their torch pins differ: 2.14.1 and 2.14.0). The environments are cached: the first run
# downloads about 4.3 GB each (a few minutes), later runs only check the marker file.
#
#   scripts/test_adapters.sh [--report R.json] [--install-only] [--engine sglang|vllm]
#
# Environment: EPLB_WORKER (default target/release/eplb-worker), EPLB_ADAPTERS_SIDECAR=fake (the
# Python fake sidecar of python/tests instead of the worker), EPLB_ADAPTERS_STEPS (300),
# EPLB_ADAPTERS_QUANTS (bf16,fp8,nvfp4), EPLB_REQUIRE_ADAPTERS=1 (a failed install fails).
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
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#'; exit 0 ;;
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
    "$venv/bin/python" -c "import pytest" 2>/dev/null ||
      "$venv/bin/python" -m pip install -q --disable-pip-version-check pytest >/dev/null
    return 0
  fi
  rm -rf "$venv"
  "$PY311" -m venv "$venv" || return 1
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir --upgrade pip || return 1
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir "${pin[$engine]}" || return 1
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e python || return 1
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir pytest || return 1
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

# ---- the checks ------------------------------------------------------------------------------
sidecar=${EPLB_ADAPTERS_SIDECAR:-worker}   # "fake": python/tests/fake_sidecar.py (no eplb-worker needed)
steps=${EPLB_ADAPTERS_STEPS:-300}
quants=${EPLB_ADAPTERS_QUANTS:-bf16,fp8,nvfp4}
worker=${EPLB_WORKER:-target/release/eplb-worker}
if [ "$sidecar" = worker ] && [ ! -x "$worker" ]; then
  echo "error: $worker is missing: cargo build --release (or EPLB_WORKER=path)" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
mkdir -p target/adapters
rc=0
parts=()
for engine in $engines; do
  out=target/adapters/$engine.json
  rm -f "$out"
  if [ "${installed[$engine]}" != 1 ]; then
    echo "{\"skipped\": \"installing ${pin[$engine]} failed (target/venv-$engine.log)\"}" >"$out"
    parts+=("$engine=$out")
    continue
  fi
  t0=$(date +%s)
  echo "# $engine: pytest python/tests/test_adapters_core.py (the adapters' core, torch on CPU)"
  if ! (cd python && "../target/venv-$engine/bin/python" -m pytest -q -p no:cacheprovider tests/test_adapters_core.py); then
    rc=1
    echo "FAILED $engine: python/tests/test_adapters_core.py" >&2
  fi
  if [ "$engine" = sglang ]; then
    echo "# sglang: the plugin through SGLang's own load_plugins (entry point, SGLANG_PLUGINS=eplb, HookRegistry)"
    if ! SGLANG_PLUGINS=eplb "target/venv-$engine/bin/python" - 2>>"target/adapters/$engine.log" <<'PY'
import sys
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
load_plugins()
want = {"sglang.srt.eplb.expert_distribution._ExpertDistributionRecorderReal._on_forward_pass_end",
        "sglang.srt.model_executor.model_runner.ModelRunner.forward",
        "sglang.srt.model_executor.model_runner.ModelRunner.initialize"}
import sglang.srt.model_executor.model_runner as mr
missing = want - set(HookRegistry._patched)
if missing or not hasattr(mr.ModelRunner.forward, "__wrapped__"):
    sys.exit(f"the eplb plugin's hooks were not applied: {sorted(missing)}")
print("# sglang: plugin loaded, 3 hooks applied")
PY
    then
      rc=1
      echo "FAILED sglang: the plugin did not load (target/adapters/sglang.log)" >&2
    fi
  fi
  echo "# $engine: scripts/adapters_check.py --engine $engine --quants $quants --sidecar $sidecar --steps $steps"
  if ! timeout -k 10 3600 "target/venv-$engine/bin/python" scripts/adapters_check.py --engine "$engine" \
      --quants "$quants" --sidecar "$sidecar" --worker "$worker" --steps "$steps" --out "$out" 2>"target/adapters/$engine.log"; then
    rc=1
    echo "FAILED $engine (log: target/adapters/$engine.log)" >&2
  fi
  echo "# $engine: $(( $(date +%s) - t0 )) s"
  parts+=("$engine=$out")
done

python3 - "$report" "${parts[@]}" <<'PY'
import json, sys
report, parts = sys.argv[1], sys.argv[2:]
keys = ["engine_version", "layers_moved", "bytes_identical", "maps_identical", "globals_untouched", "loads_identical"]
out = {}
for part in parts:
    engine, path = part.split("=", 1)
    try:
        data = json.load(open(path))
    except (OSError, ValueError) as e:
        data = {"skipped": f"no result: {e}"}
    if "skipped" in data:
        out[engine] = data
        print(f"SKIP {engine}: {data['skipped']}")
        continue
    out[engine] = {}
    for quant, rep in data.items():
        out[engine][quant] = {k: rep.get(k) for k in keys}
        for extra in ("sidecar", "slots_changed", "replica_counts_changed", "worker", "notes", "error", "diffs"):
            if rep.get(extra):
                out[engine][quant][extra] = rep[extra]
        flags = " ".join(f"{k}={rep.get(k)}" for k in keys)
        print(f"{'ok' if rep.get('ok') else 'FAILED'} {engine} {quant}: {flags}" + (f" error: {rep['error']}" if rep.get("error") else ""))
if report:
    json.dump(out, open(report, "w"), indent=1)
    print(f"# report: {report}")
PY
if [ "${EPLB_REQUIRE_ADAPTERS:-0}" = 1 ]; then
  for engine in $engines; do
    if [ "${installed[$engine]}" != 1 ]; then rc=1; fi
  done
fi
exit "$rc"

#!/usr/bin/env bash
# The Python side of the engine sidecar (python/): installs the package with its test deps into a
# virtual environment under target/pyvenv and runs its pytest suite (the client, the reference
# engine under mpirun beside a fake sidecar, and, once target/release/eplb-worker has
# `--engine shm:NAME`, scripts/engine_demo.sh with the real worker). scripts/test.sh calls it.
#
#   scripts/test_python.sh [PYTEST ARGS]
#
# The virtual environment and mpi4py: scripts/pyvenv.sh.
#
# The client has two backends (issue 21): the compiled core (libeplb_client, built here; the
# default "auto" takes it when it loads) and the pure-Python writer. The whole suite runs with the
# default (tests/test_region.py fails if the library does not load), then the client's own tests
# run again with EPLB_CLIENT_BACKEND=python. Arguments: the first run only.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
py=$(scripts/pyvenv.sh)
cargo build --release --locked -p eplb-client --lib

rc=0
(cd python && timeout -k 10 2400 "$py" -m pytest -q "$@") || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests in python/" >&2
  exit 1
fi
if [ "$rc" -eq 0 ] && [ $# -eq 0 ]; then
  echo "# the client's tests again, on the pure-Python backend (EPLB_CLIENT_BACKEND=python)" >&2
  (cd python && EPLB_CLIENT_BACKEND=python timeout -k 10 1200 "$py" -m pytest -q tests/test_region.py \
    tests/test_ipc_region.py tests/test_torch_client.py tests/test_adapters_core.py tests/test_step_end.py) || rc=$?
fi
exit "$rc"

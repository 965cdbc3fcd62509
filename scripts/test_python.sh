#!/usr/bin/env bash
# The Python side of the engine sidecar (python/): installs the package with its test deps into a
# virtual environment under target/pyvenv and runs its pytest suite (the client, the reference
# engine under mpirun beside a fake sidecar, and, once target/release/eplb-worker has
# `--engine shm:NAME`, scripts/engine_demo.sh with the real worker). scripts/test.sh calls it.
#
#   scripts/test_python.sh [PYTEST ARGS]
#
# The virtual environment and mpi4py: scripts/pyvenv.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
py=$(scripts/pyvenv.sh)

rc=0
(cd python && timeout -k 10 2400 "$py" -m pytest -q "$@") || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests in python/" >&2
  exit 1
fi
exit "$rc"

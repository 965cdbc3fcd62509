#!/usr/bin/env bash
# The Python side of the engine sidecar (python/): installs the package with its test deps into a
# virtual environment under target/pyvenv and runs its pytest suite (the client, the reference
# engine under mpirun beside a fake sidecar, and, once target/release/eplb-worker has
# `--engine shm:NAME`, scripts/engine_demo.sh with the real worker). scripts/test.sh calls it.
#
#   scripts/test_python.sh [PYTEST ARGS]
#
# mpi4py: its binary wheel (seconds) loads the system Open MPI's libmpi at run time; where that
# import fails, mpi4py is built from source against the system Open MPI (about 8 minutes on the
# 2-vCPU dev machine).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
venv=target/pyvenv
PY=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e 'python[test]'
if ! "$venv/bin/python" -c "from mpi4py import MPI; MPI.Get_library_version()" >/dev/null 2>&1; then
  echo "# mpi4py's wheel does not load the system MPI: building mpi4py from source"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-binary mpi4py mpi4py
fi
echo "# $("$venv/bin/python" -c "from mpi4py import MPI; print('mpi4py', __import__('mpi4py').__version__, 'on', MPI.Get_library_version().splitlines()[0])")"

rc=0
(cd python && timeout -k 10 2400 "../$venv/bin/python" -m pytest -q "$@") || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests in python/" >&2
  exit 1
fi
exit "$rc"

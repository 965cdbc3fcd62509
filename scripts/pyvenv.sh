#!/usr/bin/env bash
# The Python of the engine sidecar's tests: a virtual environment under target/pyvenv holding the
# package (python[test]: eplb_client, eplb_engine, numpy, mpi4py, pytest). Creates or updates it,
# then prints its python on stdout (everything else goes to stderr):
#
#   py=$(scripts/pyvenv.sh)
#
# mpi4py: its binary wheel (seconds) loads the system Open MPI's libmpi at run time; where that
# import fails, mpi4py is built from source against the system Open MPI (about 8 minutes on the
# 2-vCPU dev machine). Used by scripts/test_python.sh and tests/slurm.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/pyvenv
PY=${PYTHON:-python3}
{
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e 'python[test]'
  if ! "$venv/bin/python" -c "from mpi4py import MPI; MPI.Get_library_version()" >/dev/null 2>&1; then
    echo "# mpi4py's wheel does not load the system MPI: building mpi4py from source"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-binary mpi4py mpi4py
  fi
  "$venv/bin/python" -c "from mpi4py import MPI; import mpi4py; print('# mpi4py', mpi4py.__version__, 'on', MPI.Get_library_version().strip(chr(0)).splitlines()[0])"
} >&2
echo "$PWD/$venv/bin/python"

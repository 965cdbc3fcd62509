#!/usr/bin/env bash
# The test command of the README: installs what the build needs on a fresh Debian/Ubuntu machine
# (Open MPI and libclang for rsmpi's bindgen), builds, and runs the whole test suite.
#
#   scripts/test.sh            # everything
#   scripts/test.sh golden     # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
missing=()
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
command -v mpicc >/dev/null 2>&1 || missing+=(libopenmpi-dev)
# libclang itself (libclang.so / libclang-N.so), not libclang-cpp, which some images carry alone.
compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null || compgen -G "/usr/lib/*/libclang-[0-9]*.so*" >/dev/null \
  || missing+=(libclang-dev)
if ((${#missing[@]})); then
  echo "# installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Slurm tests (tests/slurm.rs) need slurm-wlm and munge; CI (EPLB_REQUIRE_SLURM=1) installs
# them, elsewhere those tests skip when they are missing (scripts/slurm_local.sh install adds them).
if [ "${EPLB_REQUIRE_SLURM:-}" = 1 ]; then
  $sudo scripts/slurm_local.sh install
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install Rust first (https://rustup.rs)" >&2
  exit 1
fi

# Open MPI refuses to start as root unless told; CI and containers run as root.
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

cargo build --release --locked
cargo test --release --locked "$@"

# The engine sidecar's Python side (python/: the client, the reference engine, the demo beside the
# worker just built): a virtual environment under target/pyvenv, then pytest. Whole runs only.
if [ $# -eq 0 ]; then
  scripts/test_python.sh
fi

# shellcheck shell=bash
# What scripts/test.sh and scripts/demo.sh share: install what the build needs on a fresh
# Debian/Ubuntu machine (Open MPI, libclang for rsmpi's bindgen), check for cargo, and let Open MPI
# start as root. Source it from a script that runs in the repository root:
#
#   . scripts/lib/setup.sh
#   eplb_setup              # installs what is missing, checks cargo, exports the root variables
#   $EPLB_SUDO some-command # sudo when not root, nothing when root

EPLB_SUDO=""
if [ "$(id -u)" -ne 0 ]; then EPLB_SUDO="sudo"; fi

# Installs the apt packages of the build that are missing (nothing when all are there).
eplb_install_build_deps() {
  local missing=()
  command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
  # the split kernel's CPU build (python/tests/test_split_kernel.py compiles it with cc)
  command -v cc >/dev/null 2>&1 || missing+=(gcc)
  command -v mpicc >/dev/null 2>&1 || missing+=(libopenmpi-dev)
  # libclang itself (libclang.so / libclang-N.so), not libclang-cpp, which some images carry alone.
  compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null || compgen -G "/usr/lib/*/libclang-[0-9]*.so*" >/dev/null \
    || missing+=(libclang-dev)
  # A C compiler for libeplb_client's C tests (client/tests/c_smoke.rs, tests/capi.rs).
  command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
  # Python's headers: the client's C extension (python/setup.py: eplb_client._fast, the step in
  # one call), which the tests require in the repository.
  "${PYTHON:-python3}" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    2>/dev/null || missing+=(python3-dev)
  if ((${#missing[@]})); then
    echo "# installing ${missing[*]}"
    $EPLB_SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $EPLB_SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Fails with a clear message when Rust is not installed.
eplb_require_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust first (https://rustup.rs)" >&2
    exit 1
  fi
}

# Open MPI refuses to start as root unless told; CI and containers run as root.
eplb_mpi_root_env() {
  if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
}

eplb_setup() {
  eplb_install_build_deps
  eplb_require_cargo
  eplb_mpi_root_env
}

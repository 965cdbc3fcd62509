#!/usr/bin/env bash
# The test command of the README: installs what the build needs on a fresh Debian/Ubuntu machine
# (Open MPI and libclang for rsmpi's bindgen), builds, and runs the whole test suite.
#
#   scripts/test.sh            # everything
#   scripts/test.sh golden     # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/setup.sh
eplb_install_build_deps
# The Slurm tests (tests/slurm.rs) need slurm-wlm and munge; CI (EPLB_REQUIRE_SLURM=1) installs
# them, elsewhere those tests skip when they are missing (scripts/slurm_local.sh install adds them).
if [ "${EPLB_REQUIRE_SLURM:-}" = 1 ]; then
  $EPLB_SUDO scripts/slurm_local.sh install
fi
eplb_require_cargo
eplb_mpi_root_env

cargo build --release --locked
cargo build --release --locked -p eplb-client   # target/release/libeplb_client.{so,a}
cargo test --release --locked "$@"

# The engine sidecar's Python side (python/: the client, the reference engine, the demo beside the
# worker just built): a virtual environment under target/pyvenv, then pytest. Whole runs only.
if [ $# -eq 0 ]; then
  # libeplb_client (client/): its header is current, its C smoke test; then the loom model
  # checker over the ring seqlock and the mailbox (docs/c-api.md), in target dirs of their own
  # (RUSTFLAGS would rebuild the main one): the real orderings pass, and weakened ones
  # (--cfg loom_weak) must be caught (those tests expect the checker's "ORDERING BUG").
  cargo test --release --locked -p eplb-client
  RUSTFLAGS="--cfg loom" cargo test --release --locked -p eplb-client --test loom --target-dir target/loom
  RUSTFLAGS="--cfg loom --cfg loom_weak" cargo test --release --locked -p eplb-client --test loom --target-dir target/loom-weak
  scripts/test_python.sh
fi

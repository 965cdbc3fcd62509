#!/usr/bin/env bash
# The lints of CI (.ci/run runs them after the tests): every one runs, then the failures are named.
#
#   cargo fmt --check                                   (rustfmt.toml: max_width 120)
#   cargo clippy --release --workspace --all-targets -- -D warnings
#   RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps (broken intra-doc links, bad doc markup)
#   ruff check python/  and  mypy                       (configured in python/pyproject.toml)
#
# On a fresh Debian/Ubuntu machine with Rust it installs what it needs: the build's apt packages
# (clippy and rustdoc compile mpi-sys, whose bindgen needs libclang), rustfmt and clippy (rustup),
# and ruff and mypy into the project's venv (target/pyvenv, python[dev]). Exit 1 if any lint fails.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/setup.sh
eplb_install_build_deps
eplb_require_cargo
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
py=$(scripts/pyvenv.sh)
"$py" -m pip install -q --disable-pip-version-check -e 'python[dev]' >&2

failed=()
lint() {  # lint NAME COMMAND...: runs it, remembers NAME if it fails
  local name=$1
  shift
  echo "# lint: $name" >&2
  if ! "$@"; then failed+=("$name"); fi
}
lint "cargo fmt --check" cargo fmt --check
lint "cargo clippy" cargo clippy --release --locked --workspace --all-targets -- -D warnings
lint "cargo doc" env RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --locked
lint "ruff" "$py" -m ruff check python
lint "mypy" bash -c 'cd python && "$0" -m mypy' "$py"

if ((${#failed[@]})); then
  echo "# lint: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "# lint: all passed" >&2

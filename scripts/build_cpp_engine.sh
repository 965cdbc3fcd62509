#!/usr/bin/env bash
# Builds the C++ reference engine (examples/cpp_engine/engine.cpp, docs/cpp-engine.md) with mpicxx
# against the C header client/include/eplb_client.h and the static library
# target/release/libeplb_client.a (built with `cargo build --release -p eplb-client` when it is
# missing). Prints the binary's path on stdout; rebuilds only when a source is newer.
#
#   scripts/build_cpp_engine.sh            # -> target/cpp_engine/eplb_cpp_engine
#   CXX=g++ scripts/build_cpp_engine.sh    # another compiler: MPI's flags from `mpicxx --showme`
set -euo pipefail
cd "$(dirname "$0")/.."

src=examples/cpp_engine/engine.cpp
header=client/include/eplb_client.h
lib=target/release/libeplb_client.a
out=target/cpp_engine/eplb_cpp_engine

if [ ! -f "$header" ]; then
  echo "build_cpp_engine.sh: $header not found (the C API: the client/ crate)" >&2
  exit 2
fi
if ! command -v mpicxx >/dev/null 2>&1; then
  (. scripts/lib/setup.sh && eplb_install_build_deps >&2) || exit 1
fi
if [ ! -f "$lib" ]; then
  (. scripts/lib/setup.sh && eplb_require_cargo && cargo build --release -p eplb-client >&2) || exit 1
fi
if [ -x "$out" ] && [ "$out" -nt "$src" ] && [ "$out" -nt "$header" ] && [ "$out" -nt "$lib" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$(dirname "$out")"
flags=(-std=c++17 -O2 -Wall -Wextra -DOMPI_SKIP_MPICXX -Iclient/include)
# The Rust static library's own system libraries (`cargo rustc -- --print native-static-libs`).
libs=(-lgcc_s -lutil -lrt -lpthread -lm -ldl)
if [ -n "${CXX:-}" ]; then
  read -r -a mpi_compile <<<"$(mpicxx --showme:compile)"
  read -r -a mpi_link <<<"$(mpicxx --showme:link)"
  "$CXX" "${flags[@]}" "${mpi_compile[@]}" "$src" "$lib" "${mpi_link[@]}" "${libs[@]}" -o "$out.tmp" >&2
else
  mpicxx "${flags[@]}" "$src" "$lib" "${libs[@]}" -o "$out.tmp" >&2
fi
mv "$out.tmp" "$out"
echo "$out"

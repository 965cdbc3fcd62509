#!/usr/bin/env bash
# The C client's cost to the engine a step, hot and cold (docs/bench/capi.md): builds
# libeplb_client and client/bench/bench.c against it, then runs it.
#
#   scripts/bench_capi.sh [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p eplb-client --lib >&2
out=target/capi-bench
mkdir -p "$out"
cc -O2 -std=c11 -D_DEFAULT_SOURCE -Wall -Wextra -Werror -I client/include -o "$out/bench" client/bench/bench.c \
  target/release/libeplb_client.a -lpthread -ldl -lm -lrt -lgcc_s -lc
"$out/bench" "$@"
"$out/bench" --cold --steps 500

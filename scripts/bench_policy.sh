#!/usr/bin/env bash
# Policy quality on the shared real traces (drift and static), measured by `eplb-worker plan`:
# builds the release binary, then prints the Markdown tables of BENCHMARKS.md.
#   scripts/bench_policy.sh [--shared DIR] [--reps N] [--move-cost X] [--only drift|static]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec python3 scripts/bench_policy.py "$@"

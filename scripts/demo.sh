#!/usr/bin/env bash
# The demo of the README, in one command on a fresh Debian/Ubuntu machine with Rust: installs what
# the build needs (as scripts/test.sh does), builds, runs 4 ranks balancing the built-in drifting
# load (the default manager: a layer switches when its better placement pays for its moves),
# writes the JSON report and the SVG charts.
#
#   scripts/demo.sh                                   # report and charts in target/demo/
#   scripts/demo.sh --step-ms 50 --metrics-port 9400  # extra flags go to `eplb-worker run`:
#                                                     # paced at 50 ms a step, /metrics served
#   EPLB_DEMO_DIR=/tmp/demo scripts/demo.sh           # another output folder
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/setup.sh
eplb_setup

out="${EPLB_DEMO_DIR:-target/demo}"
cargo build --release --locked
mkdir -p "$out"
# --oversubscribe: 4 ranks on fewer cores.
mpirun -n 4 --oversubscribe target/release/eplb-worker run --report "$out/report.json" "$@"
target/release/eplb-worker plot "$out/report.json" --output "$out"
# PNG copies when librsvg's converter is there (the SVG files are the charts).
if command -v rsvg-convert >/dev/null 2>&1; then
  for svg in "$out"/*.svg; do rsvg-convert -b white "$svg" -o "${svg%.svg}.png"; done
fi
echo "# demo: report $out/report.json, charts:" "$out"/*.svg

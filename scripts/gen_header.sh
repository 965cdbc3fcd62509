#!/usr/bin/env bash
# Regenerates client/include/eplb_client.h from the eplb-client crate (cbindgen, through the test
# that otherwise checks the committed header is current). Commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
EPLB_WRITE_HEADER=1 cargo test --release -p eplb-client --test header committed_header_is_current
echo "wrote client/include/eplb_client.h" >&2

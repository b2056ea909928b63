#!/usr/bin/env bash
# Storage-engine benchmark, release build: the cost of one fsync on the SR's file system, then
# VDI.snapshot / VDI.clone p50/p99 at 1 GiB and 2 TiB beside the physical floor (the two new
# children's BATs written and synced concurrently with their directory) measured in the same
# run, and the SR.attach time and RSS with 1,000 VDIs in an attached SR.
#   scripts/bench/core.sh            full run (BENCH_ITERS=100, BENCH_VDIS=1000)
#   scripts/bench/core.sh --smoke    seconds-long run (5 iterations, 50 VDIs)
# BENCH_DIR chooses where the SR lives (default: under target/, same disk as the build).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--smoke" ]; then
  export BENCH_ITERS=${BENCH_ITERS:-5} BENCH_VDIS=${BENCH_VDIS:-50}
fi
exec cargo bench -p ddstor --bench core

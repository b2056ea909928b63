#!/usr/bin/env bash
# Fuzz smoke run of the transport's frame codec and vchan ring (a few seconds per target).
# Needs cargo-fuzz (scripts/deps/transport.cargo) and nightly features via RUSTC_BOOTSTRAP=1.
# Findings are kept as named regression tests in transport/src (frame.rs, ring.rs).
set -uo pipefail
cd "$(dirname "$0")/../../transport/fuzz" || exit 1
export RUSTC_BOOTSTRAP=1
secs=${FUZZ_SECONDS:-5}
log=$(mktemp)
for target in frame_decode ring_hostile; do
  corpus=$(mktemp -d)
  echo "fuzz-transport: $target for ${secs}s"
  if ! cargo fuzz run "$target" "$corpus" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz-transport: $target FAILED (crash input under transport/fuzz/artifacts/$target)"
    rm -rf "$corpus" "$log"
    exit 1
  fi
  tail -n 2 "$log"
  rm -rf "$corpus"
done
rm -f "$log"
echo "fuzz-transport: ok"

#!/usr/bin/env bash
# Short fuzz phase for the agent's NBD server (agent/fuzz): request headers, and whole client
# sessions (handshake, options, transmission) against in-memory exports, a few seconds each,
# seeded from agent/fuzz/seeds/. Exits non-zero on any crash or hang.
# Needs cargo-fuzz (scripts/deps/*.cargo) and nightly features through RUSTC_BOOTSTRAP=1.
# No sanitizer: the server has no unsafe code, and an uninstrumented build is much faster.
set -euo pipefail
cd "$(dirname "$0")/../../agent"
export RUSTC_BOOTSTRAP=1
SECS=${FUZZ_SECS:-5}
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz (scripts/install-deps.sh does)" >&2; exit 1; }
cargo fuzz build -s none -O >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rc=0
for t in nbd_request nbd_session; do
  mkdir -p "$work/$t"
  cp fuzz/seeds/$t/* "$work/$t/"
  echo "fuzz-nbd: $t for ${SECS}s"
  if ! cargo fuzz run -s none -O "$t" "$work/$t" -- -max_total_time="$SECS" -timeout=25 -rss_limit_mb=2048 -print_final_stats=0 2>"$work/$t.log"; then
    tail -40 "$work/$t.log"; rc=1
  else
    grep -E "^#[0-9]+ *DONE" "$work/$t.log" | tail -1 || true
  fi
done
exit $rc

#!/usr/bin/env bash
# The README's test command: installs everything the tests need, builds once, runs every test.
#   1. scripts/install-deps.sh (Debian packages, cargo tools)
#   2. cargo build of every target (debug, plus release binaries for benches/Xen VM)
#   3. the whole workspace's tests (unit + end-to-end against real peers), in parallel
#   4. every extra phase in scripts/test.d/*.sh (fuzz smoke runs, Xen under qemu, …), in order
# Exits non-zero when any phase failed; the last line counts the phases.
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

passed=0 failed=0 failures=()
phase() { # name command...
  local name=$1; shift
  echo "=== test.sh: $name"
  local t0=$SECONDS
  if "$@"; then passed=$((passed + 1)); echo "=== test.sh: $name ok ($((SECONDS - t0)) s)"
  else failed=$((failed + 1)); failures+=("$name"); echo "=== test.sh: $name FAILED ($((SECONDS - t0)) s)"; fi
}

phase install-deps scripts/install-deps.sh
phase build cargo build --workspace --all-targets --locked
if [ "$failed" -eq 0 ]; then
  if cargo nextest --version >/dev/null 2>&1; then
    phase workspace-tests cargo nextest run --workspace --locked --no-fail-fast
  else
    phase workspace-tests cargo test --workspace --locked --no-fail-fast
  fi
  for f in scripts/test.d/*.sh; do
    [ -e "$f" ] || continue
    phase "$(basename "$f" .sh)" bash "$f"
  done
fi

echo "=== test.sh: failed phases: ${failures[*]:-none}"
echo "test.sh: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

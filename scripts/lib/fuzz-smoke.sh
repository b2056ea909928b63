#!/usr/bin/env bash
# Shared fuzz smoke runner for scripts/test.d phases: runs each cargo-fuzz target of one fuzz
# crate for a few seconds and fails (non-zero) on any crash, printing the log tail and where
# libFuzzer left the crashing input.
#
#   scripts/lib/fuzz-smoke.sh FUZZ_DIR LABEL TARGET[=SEED_DIR]...
#
# FUZZ_DIR is a cargo-fuzz crate (e.g. xs-registry/fuzz); a target's SEED_DIR (optional) is copied
# into a fresh corpus so the seeds themselves are never modified. Environment:
#   FUZZ_SECS   seconds per target (default 5)
#   FUZZ_FLAGS  cargo-fuzz build flags (default "-s none -O -a": no sanitizer, optimised, with
#               debug assertions and overflow checks (they found an overflow here) — fine for
#               crates without unsafe code on the fuzzed path; set "" for the ASan default)
# Needs cargo-fuzz (scripts/deps/*.cargo) and nightly features through RUSTC_BOOTSTRAP=1.
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 FUZZ_DIR LABEL TARGET[=SEED_DIR]..." >&2
  exit 2
fi
dir=$1 label=$2
shift 2
command -v cargo-fuzz >/dev/null || {
  echo "$label: cargo-fuzz missing: cargo install cargo-fuzz (scripts/install-deps.sh does)" >&2
  exit 1
}
cd "$dir" || exit 1
export RUSTC_BOOTSTRAP=1
secs=${FUZZ_SECS:-5}
# shellcheck disable=SC2206
flags=(${FUZZ_FLAGS--s none -O -a})
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! cargo fuzz build "${flags[@]}" >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log"
  echo "$label: building the fuzz targets in $dir FAILED"
  exit 1
fi
rc=0
for spec in "$@"; do
  target=${spec%%=*}
  corpus="$work/corpus-$target"
  mkdir -p "$corpus"
  if [ "$spec" != "$target" ]; then
    cp -r "${spec#*=}/." "$corpus/"
  fi
  echo "$label: $target for ${secs}s"
  if ! cargo fuzz run "${flags[@]}" "$target" "$corpus" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=0 >"$work/$target.log" 2>&1; then
    tail -n 40 "$work/$target.log"
    echo "$label: $target FAILED (crash input under $dir/artifacts/$target)"
    rc=1
  else
    grep -E "^Done [0-9]+ runs" "$work/$target.log" | tail -n 1 || true
  fi
done
[ $rc = 0 ] && echo "$label: ok"
exit $rc

#!/usr/bin/env bash
# Shared fuzz smoke runner for the scripts/test.d fuzz phases (vhd, transport, nbd, xs): builds
# every cargo-fuzz target of one fuzz crate in one cargo invocation, runs them a few seconds
# each, several at once, and fails (non-zero) on any crash, printing the log tail and where
# libFuzzer left the crashing input.
#
#   scripts/lib/fuzz-smoke.sh FUZZ_DIR LABEL TARGET[=SEED_DIR]...
#
# FUZZ_DIR is a cargo-fuzz crate (e.g. xs-registry/fuzz); a target's SEED_DIR (optional) is copied
# into a fresh corpus so the seeds themselves are never modified. Environment:
#   FUZZ_SECS        seconds per target (default 5)
#   FUZZ_FLAGS       cargo-fuzz build flags (default "-s none -O -a": no sanitizer, optimised,
#                    with debug assertions and overflow checks — fine for crates without unsafe
#                    code on the fuzzed path; "-O -a" for AddressSanitizer)
#   FUZZ_ARGS        extra libFuzzer arguments for every target (e.g. "-timeout=25")
#   FUZZ_JOBS        targets run at once (default: the number of CPUs)
#   FUZZ_TARGET_DIR  where the instrumented builds go (default <repo>/target/fuzz). Every fuzz
#                    crate built with the same FUZZ_FLAGS shares one directory below it, so the
#                    instrumented dependencies (tokio, serde, the ddstor crates…) are built once
#                    for all phases: the fuzz crates' Cargo.lock files pin the same versions.
#   FUZZ_CGU         codegen units of the instrumented build (default 16: cargo-fuzz's default
#                    of 1 makes the agent crate's build several times slower for a smoke run)
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
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$dir" || exit 1
dir=$(pwd)
export RUSTC_BOOTSTRAP=1
secs=${FUZZ_SECS:-5}
jobs=${FUZZ_JOBS:-$(nproc)}
# shellcheck disable=SC2206
flags=(${FUZZ_FLAGS--s none -O -a} --codegen-units "${FUZZ_CGU:-16}")
# shellcheck disable=SC2206
extra=(${FUZZ_ARGS-})
# One target directory per flag set: builds with other flags would overwrite each other's
# dependencies in place and rebuild them every time.
tdir="${FUZZ_TARGET_DIR:-$root/target/fuzz}/$(printf '%s' "${flags[*]}" | tr -c 'A-Za-z0-9' '_')"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
if ! cargo fuzz build "${flags[@]}" --target-dir "$tdir" >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log"
  echo "$label: building the fuzz targets in $dir FAILED"
  exit 1
fi
echo "$label: built in $((SECONDS - t0)) s (${flags[*]}, $tdir)"
bindir="$tdir/$(rustc -vV | sed -n 's/^host: //p')/release"

run_one() { # target corpus
  mkdir -p "$dir/artifacts/$1"
  "$bindir/$1" -artifact_prefix="$dir/artifacts/$1/" -max_total_time="$secs" \
    -rss_limit_mb=2048 -print_final_stats=0 "${extra[@]}" "$2" >"$work/$1.log" 2>&1
  echo $? >"$work/$1.rc"
}

targets=()
for spec in "$@"; do
  target=${spec%%=*}
  [ -x "$bindir/$target" ] || { echo "$label: no fuzz target $target in $dir"; exit 1; }
  corpus="$work/corpus-$target"
  mkdir -p "$corpus"
  if [ "$spec" != "$target" ]; then
    cp -r "${spec#*=}/." "$corpus/"
  fi
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
  echo "$label: $target for ${secs}s"
  run_one "$target" "$corpus" &
  targets+=("$target")
done
wait
rc=0
for target in "${targets[@]}"; do
  if [ "$(cat "$work/$target.rc" 2>/dev/null)" != 0 ]; then
    tail -n 40 "$work/$target.log"
    echo "$label: $target FAILED (crash input under $dir/artifacts/$target)"
    rc=1
  else
    echo "$label: $target: $(grep -E "^Done [0-9]+ runs" "$work/$target.log" | tail -n 1)"
  fi
done
[ $rc = 0 ] && echo "$label: ok"
exit $rc

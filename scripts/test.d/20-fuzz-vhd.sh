#!/usr/bin/env bash
# Short fuzz phase for the VHD engine: every cargo-fuzz target in vhd/fuzz runs a few seconds,
# seeded with small valid files made by the engine itself. Exits non-zero on any crash.
# Needs cargo-fuzz (scripts/deps/vhd.cargo) and nightly features through RUSTC_BOOTSTRAP=1.
# No sanitizer: the vhd crate has no unsafe code, and an uninstrumented build is much faster.
set -euo pipefail
cd "$(dirname "$0")/../../vhd"
export RUSTC_BOOTSTRAP=1
SECS=${FUZZ_SECS:-5}
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz (scripts/install-deps.sh does)" >&2; exit 1; }
cargo fuzz build -s none -O >/dev/null
D=../target/debug/ddstor
[ -x "$D" ] || (cd .. && cargo build -q -p ddstor)
seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds"/{footer,header,disk,locators}
$D vhd create "$seeds/a.vhd" --size 64K --block-size 4K >/dev/null
printf 'data%.0s' $(seq 1 300) | $D vhd write "$seeds/a.vhd" --offset 5000
$D vhd snapshot "$seeds/a.vhd" "$seeds/b.vhd" >/dev/null
printf 'child' | $D vhd write "$seeds/b.vhd" --offset 9000
for f in a b; do
  tail -c 512 "$seeds/$f.vhd" >"$seeds/footer/$f"
  dd if="$seeds/$f.vhd" bs=512 skip=1 count=2 status=none >"$seeds/header/$f"
  { printf '\001'; cat "$seeds/$f.vhd"; } >"$seeds/disk/$f"
done
printf '\000./base.vhd' >"$seeds/locators/macx"
printf '\000../outside.vhd' >"$seeds/locators/up"
printf '\000./link.vhd' >"$seeds/locators/link"
rc=0
for t in footer header disk locators; do
  echo "fuzz-vhd: $t for ${SECS}s"
  if ! cargo fuzz run -s none -O "$t" "$seeds/$t" -- -max_total_time="$SECS" -rss_limit_mb=2048 -print_final_stats=0 2>"$seeds/$t.log"; then
    tail -40 "$seeds/$t.log"; rc=1
  else
    grep -E "^#[0-9]+ *DONE" "$seeds/$t.log" | tail -1 || true
  fi
done
exit $rc

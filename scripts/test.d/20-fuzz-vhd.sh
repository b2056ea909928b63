#!/usr/bin/env bash
# Fuzz smoke run of the VHD engine (a few seconds per target, scripts/lib/fuzz-smoke.sh), seeded
# with small valid files made by the engine itself:
#   footer, header  the 512-byte footer and the dynamic header parsers
#   disk            whole files (BAT, bitmaps, reads) through the engine
#   locators        parent locator resolution (no escaping the SR)
# No sanitizer: the vhd crate has no unsafe code, and an uninstrumented build is much faster.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
D=$root/target/debug/ddstor
[ -x "$D" ] || (cd "$root" && cargo build -q -p ddstor)
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
"$root/scripts/lib/fuzz-smoke.sh" "$root/vhd/fuzz" fuzz-vhd \
  "footer=$seeds/footer" "header=$seeds/header" "disk=$seeds/disk" "locators=$seeds/locators"

#!/usr/bin/env bash
# Coalesce benchmark: merge throughput of a 256 MiB child into a 1 GiB parent
# (`ddstor vhd coalesce`, fsync included) beside a plain copy of the same number of bytes
# (`dd ... conv=fsync`) measured in the same run on the same disk; prints both and the ratio.
#   scripts/bench/gc.sh            full run (256 MiB child, 1 GiB parent)
#   scripts/bench/gc.sh --smoke    seconds-long run (32 MiB child, 128 MiB parent)
# BENCH_DIR chooses where the files live (default: target/bench-gc, same disk as the build).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=1G CHILD_MIB=256 PARENT_MIB=128
if [ "${1:-}" = "--smoke" ]; then SIZE=128M CHILD_MIB=32 PARENT_MIB=16; fi
cargo build --release -q -p ddstor
D=target/release/ddstor
DIR=${BENCH_DIR:-target/bench-gc}
rm -rf "$DIR" && mkdir -p "$DIR"
half=$((CHILD_MIB / 2))
head -c $((PARENT_MIB << 20)) /dev/urandom >"$DIR/parent.data"
head -c $((half << 20)) /dev/urandom >"$DIR/a.data"
head -c $((half << 20)) /dev/urandom >"$DIR/b.data"
$D vhd create "$DIR/p.vhd" --size "$SIZE" >/dev/null
$D vhd write "$DIR/p.vhd" --offset 0 --input "$DIR/parent.data"
$D vhd snapshot "$DIR/p.vhd" "$DIR/c.vhd" >/dev/null
# Half of the child over the parent's data (existing blocks), half over holes (new blocks).
$D vhd write "$DIR/c.vhd" --offset $(((PARENT_MIB / 2) << 20)) --input "$DIR/a.data"
$D vhd write "$DIR/c.vhd" --offset $(((PARENT_MIB * 3) << 20)) --input "$DIR/b.data"
cat "$DIR/a.data" "$DIR/b.data" >"$DIR/copy.src"
sync
now() { date +%s.%N; }
t0=$(now)
$D vhd coalesce "$DIR/c.vhd" --json >"$DIR/merge.json"
t1=$(now)
dd if="$DIR/copy.src" of="$DIR/copy.dst" bs=2M conv=fsync status=none
t2=$(now)
bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes_copied"])' "$DIR/merge.json")
python3 - "$bytes" "$t0" "$t1" "$t2" <<'PY'
import sys
b, t0, t1, t2 = int(sys.argv[1]), *map(float, sys.argv[2:])
m, c = b / (t1 - t0) / 2**20, b / (t2 - t1) / 2**20
print(f"merge (ddstor vhd coalesce): {b >> 20} MiB in {t1 - t0:.3f} s = {m:.1f} MiB/s")
print(f"plain copy (dd conv=fsync):  {b >> 20} MiB in {t2 - t1:.3f} s = {c:.1f} MiB/s")
print(f"ratio merge/copy: {m / c:.2f}x (goal >= 0.8x)")
PY
rm -rf "$DIR"

#!/usr/bin/env bash
# VHD engine benchmark: ddstor's vhd/ beside qemu on the same files, in one run.
#   - sequential (2 MiB) and random 4 KiB read of a full 1 GiB dynamic VHD:
#       ddstor `vhd bench` vs `qemu-img bench -f vpc -d 1` (sequential) and a qemu-io script (random)
#   - read throughput through chains of depth 1, 30 and 100 (goal: depth 100 >= 90% of depth 1)
#   - allocating-write throughput into an empty 1 GiB dynamic VHD (2 MiB and 64 KiB requests)
# Usage: scripts/bench/vhd.sh [SIZE_MIB (default 1024)] [WORKDIR]
# Set QUICK=1 for a seconds-long smoke run (64 MiB, depths 1/5/10).
set -euo pipefail
cd "$(dirname "$0")/../.."
MIB=${1:-1024}
DEPTHS="1 30 100"
if [ "${QUICK:-0}" = 1 ]; then MIB=64; DEPTHS="1 5 10"; fi
WORK=${2:-$(mktemp -d)}
trap '[ -z "${2:-}" ] && rm -rf "$WORK"' EXIT
command -v qemu-img >/dev/null || { echo "qemu-img missing: apt-get install qemu-utils" >&2; exit 1; }
# DDSTOR=path uses an already-built binary instead of building the release one.
if [ -n "${DDSTOR:-}" ]; then D=$DDSTOR; else cargo build --release -q -p ddstor; D=target/release/ddstor; fi
now() { date +%s.%N; }
rate() { awk -v b="$1" -v t="$2" 'BEGIN { printf "%.1f", b / t / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
json_field() { sed -E "s/.*\"$1\":([0-9.e+-]+).*/\1/"; }
row() { printf '%-44s %12s %12s %8s\n' "$@"; }

echo "workdir $WORK, disk ${MIB} MiB, $(qemu-img --version | head -1)"
head -c $((MIB << 20)) /dev/urandom >"$WORK/data.raw"
sync

# Allocating writes: raw -> dynamic VHD conversion, then bench writes into empty disks.
t0=$(now); $D vhd convert "$WORK/data.raw" "$WORK/full.vhd" --to vhd; t1=$(now)
q0=$(now); qemu-img convert -f raw -O vpc -o subformat=dynamic "$WORK/data.raw" "$WORK/qfull.vhd"; q1=$(now)
BYTES=$((MIB << 20))
row "test" "ddstor MiB/s" "qemu MiB/s" "ratio"
d=$(rate $BYTES "$(echo "$t1 - $t0" | bc)"); q=$(rate $BYTES "$(echo "$q1 - $q0" | bc)")
row "convert raw->dynamic VHD (alloc write)" "$d" "$q" "$(ratio "$d" "$q")"

for req in 2M 64K; do
  rm -f "$WORK/w.vhd" "$WORK/qw.vhd"
  $D vhd create "$WORK/w.vhd" --size ${MIB}M >/dev/null
  qemu-img create -q -f vpc -o subformat=dynamic,force_size=on "$WORK/qw.vhd" ${MIB}M
  dj=$($D vhd bench "$WORK/w.vhd" --write --size $req --json)
  d=$(echo "$dj" | json_field mib_per_s)
  count=$(echo "$dj" | json_field ops)
  reqb=$((BYTES / count))
  q0=$(now); qemu-img bench -q -w -f vpc -t writeback -d 1 -c "$count" -s "$reqb" -S "$reqb" "$WORK/qw.vhd" >/dev/null; qemu-io -f vpc -c flush "$WORK/qw.vhd"; q1=$(now)
  q=$(rate $BYTES "$(echo "$q1 - $q0" | bc)")
  row "allocating write, $req requests" "$(printf %.1f "$d")" "$q" "$(ratio "$d" "$q")"
done

# Reads of the full disk (page cache warm for both: read once first).
cat "$WORK/full.vhd" >/dev/null
d=$($D vhd bench "$WORK/full.vhd" --size 2M --json | json_field mib_per_s)
count=$((BYTES / (2 << 20)))
q0=$(now); qemu-img bench -q -f vpc -t writeback -d 1 -c "$count" -s 2M -S 2M "$WORK/full.vhd" >/dev/null; q1=$(now)
q=$(rate $BYTES "$(echo "$q1 - $q0" | bc)")
row "sequential read, 2 MiB requests" "$(printf %.1f "$d")" "$q" "$(ratio "$d" "$q")"

N4K=20000
dj=$($D vhd bench "$WORK/full.vhd" --size 4K --pattern rand --count $N4K --json)
d=$(echo "$dj" | json_field mib_per_s)
# qemu-io reads the same number of random 4 KiB requests from a command script (one process).
awk -v n=$N4K -v slots=$((BYTES / 4096)) 'BEGIN { srand(1); for (i = 0; i < n; i++) printf "read -q %d 4096\n", int(rand() * slots) * 4096 }' >"$WORK/rand.qio"
q0=$(now); qemu-io -f vpc -t writeback "$WORK/full.vhd" <"$WORK/rand.qio" >/dev/null; q1=$(now)
q=$(rate $((N4K * 4096)) "$(echo "$q1 - $q0" | bc)")
row "random read, 4 KiB requests ($N4K)" "$(printf %.1f "$d")" "$q" "$(ratio "$d" "$q")"

# Chain depth: full base + (depth-1) differencing layers, each with a few scattered writes.
echo
printf '%-44s %12s %12s\n' "chain depth (sequential 2 MiB reads)" "MiB/s" "vs depth 1"
maxd=$(echo $DEPTHS | tr ' ' '\n' | sort -n | tail -1)
prev="$WORK/full.vhd"
declare -A leaf
leaf[1]=$prev
head -c 65536 /dev/urandom >"$WORK/small"
for i in $(seq 2 "$maxd"); do
  $D vhd snapshot "$prev" "$WORK/l$i.vhd" >/dev/null
  $D vhd write "$WORK/l$i.vhd" --offset $(( (i * 7919 % (MIB / 2)) << 21 )) --input "$WORK/small"
  prev="$WORK/l$i.vhd"; leaf[$i]=$prev
done
base=""
for dep in $DEPTHS; do
  r=$($D vhd bench "${leaf[$dep]}" --size 2M --json | json_field mib_per_s)
  [ -z "$base" ] && base=$r
  printf '%-44s %12.1f %12s\n' "depth $dep" "$r" "$(ratio "$r" "$base")"
done

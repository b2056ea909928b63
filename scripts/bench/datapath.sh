#!/usr/bin/env bash
# Datapath benchmark: ddstor's NBD server versus `qemu-nbd -f vpc` on the same VHD, in one run.
#
#   scripts/bench/datapath.sh [SIZE]      SIZE of the VHD (default 1G; e.g. 64M for a smoke run)
#
# Prints, for each measure, ddstor's figure, qemu-nbd's, and the ratio (higher is better):
#   1. sequential read of the whole disk with nbdcopy (MiB/s)
#   2. 4 KiB reads at a pseudo-random stride with `qemu-img bench`, queue depth 1 and 16 (IOPS)
#   3. allocating writes into an empty dynamic VHD with `qemu-img bench -w`, 256 KiB, QD16 (MiB/s)
#   4. ddstor only: 4 KiB reads (QD16) through a chain of depth 100 versus the same data at depth 1
# Both servers serve from the page cache (the file was just written), over unix sockets.
# Each figure is the median of ROUNDS runs (default 3), the two servers taking turns, so a
# burst of other load on the machine hits both alike.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=${1:-1G}
ROUNDS=${ROUNDS:-3}

for t in qemu-img qemu-io qemu-nbd nbdcopy; do
  command -v "$t" >/dev/null || { echo "datapath.sh: $t missing (apt-get install qemu-utils libnbd-bin)" >&2; exit 1; }
done
if [ -z "${DDSTOR:-}" ]; then # DDSTOR=path/to/ddstor skips the release build
  cargo build --release -q -p ddstor
  DDSTOR=$PWD/target/release/ddstor
fi

W=$(mktemp -d /tmp/ddstor-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
serve_ddstor() { # file sock [args]
  local f=$1 s=$2; shift 2
  "$DDSTOR" nbd serve "$f" --socket "$s" "$@" & PIDS+=($!); wait_sock "$s"
}
serve_qemu() { # file sock [args]
  local f=$1 s=$2; shift 2
  qemu-nbd -f vpc -t -e 32 -k "$s" "$@" "$f" & PIDS+=($!); wait_sock "$s"
}
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); rm -f "$W"/*.sock; }
uri() { echo "nbd+unix:///?socket=$1"; }
now() { date +%s.%N; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }
row() { printf '%-44s %14s %14s %9s\n' "$1" "$2" "$3" "$(ratio "$2" "$3")"; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# pair LABEL CMD...: runs "CMD... A" and "CMD... B" ROUNDS times, alternating, and prints a
# row of the two medians (A = ddstor's socket, B = the peer's; set by the caller).
pair() {
  local label=$1; shift
  local a=() b=() i
  for i in $(seq "$ROUNDS"); do
    a+=("$("$@" "$A")")
    b+=("$("$@" "$B")")
  done
  row "$label" "$(printf '%s\n' "${a[@]}" | median)" "$(printf '%s\n' "${b[@]}" | median)"
}

# qemu-img bench: prints "Run completed in N seconds."; returns IOPS (or MiB/s with $4 = size).
bench_iops() { # uri depth count [extra...]
  local u=$1 d=$2 c=$3; shift 3
  local out secs
  out=$(qemu-img bench -f raw -d "$d" -c "$c" "$@" "$u" 2>&1) || { echo "$out" >&2; exit 1; }
  secs=$(sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
  awk -v c="$c" -v s="$secs" 'BEGIN { printf "%.0f", c / s }'
}

echo "datapath.sh: preparing a $SIZE dynamic VHD filled with data (in $W)"
"$DDSTOR" vhd create --size "$SIZE" "$W/full.vhd" >/dev/null
qemu-io -f vpc -c "write -P 0x5a 0 $SIZE" "$W/full.vhd" >/dev/null
BYTES=$(qemu-img info --output=json -f vpc "$W/full.vhd" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p' | head -1)
MIB=$((BYTES >> 20))
STEP=$((4096 * 7919)) # a prime number of 4 KiB pages: a pseudo-random walk over the disk
N1=$(( MIB >= 1024 ? 20000 : 4000 ))
N16=$(( MIB >= 1024 ? 100000 : 20000 ))

serve_ddstor "$W/full.vhd" "$W/d.sock" --read-only
serve_qemu "$W/full.vhd" "$W/q.sock" -r

printf '\n%-44s %14s %14s %9s\n' "measure ($MIB MiB VHD)" ddstor qemu-nbd ratio
seq_read() {
  local t0 t1
  t0=$(now); nbdcopy "$(uri "$1")" null: ; t1=$(now)
  awk -v m="$MIB" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", m / (b - a) }'
}
nbdcopy "$(uri "$W/d.sock")" null: ; nbdcopy "$(uri "$W/q.sock")" null:  # warm both
A=$W/d.sock B=$W/q.sock
pair "sequential read, nbdcopy (MiB/s)" seq_read
# bench_at DEPTH COUNT [args] SOCKET: IOPS of qemu-img bench on SOCKET.
bench_at() { local d=$1 c=$2; shift 2; local s=${*: -1}; bench_iops "$(uri "$s")" "$d" "$c" "${@:1:$#-1}"; }
pair "4K random read QD1, qemu-img bench (IOPS)" bench_at 1 "$N1" -s 4k -S $STEP
pair "4K random read QD16, qemu-img bench (IOPS)" bench_at 16 "$N16" -s 4k -S $STEP
stop_all

# Allocating writes: each run gives each server a new empty VHD; 256 KiB writes over the
# whole disk.
NW=$((BYTES / (256 << 10)))
alloc_write() { # which(d|q): MiB/s
  rm -f "$W/e.vhd"
  "$DDSTOR" vhd create --size "$SIZE" "$W/e.vhd" >/dev/null
  if [ "$1" = d ]; then serve_ddstor "$W/e.vhd" "$W/w.sock"; else serve_qemu "$W/e.vhd" "$W/w.sock"; fi
  awk -v i="$(bench_iops "$(uri "$W/w.sock")" 16 "$NW" -w -s 256k)" 'BEGIN { printf "%.0f", i * 256 / 1024 }'
  stop_all
}
A=d B=q
pair "allocating 256K writes QD16 (MiB/s)" alloc_write

# Chain depth: the filled disk under 99 empty differencing layers, versus the disk alone.
leaf="$W/full.vhd"
for i in $(seq 1 99); do
  "$DDSTOR" vhd snapshot "$leaf" "$W/s$i.vhd" >/dev/null
  leaf="$W/s$i.vhd"
done
serve_ddstor "$leaf" "$W/d.sock" --read-only
serve_ddstor "$W/full.vhd" "$W/q.sock" --read-only
printf '\n%-44s %14s %14s %9s\n' "ddstor chain depth" "depth 100" "depth 1" ratio
A=$W/d.sock B=$W/q.sock
pair "4K random read QD16 (IOPS)" bench_at 16 "$N16" -s 4k -S $STEP
pair "sequential read, nbdcopy (MiB/s)" seq_read
stop_all
echo
echo "goals: ratio >= 1.2x on reads, >= 2x on allocating writes; depth 100 close to depth 1"

#!/usr/bin/env bash
# GC benchmark (issue 7), one run, three parts, each beside a peer measured in the same run:
#  1. merge throughput: a 256 MiB allocated child merged into a 1 GiB parent (`ddstor vhd
#     coalesce`, fsync included) vs a plain copy of the same bytes (`dd conv=fsync`): ratio.
#  2. foreground I/O slowdown: `qemu-img bench` (reads, then writes) on an activated VDI's NBD
#     export of `ddstor serve`, alone and while `ddstor sr gc` merges a 256 MiB hidden layer of
#     another VDI of the same SR (default [gc] rate limit): ratio during/alone.
#  3. chain depth over time: 100 snapshot+destroy of a VDI with background GC on (1 s rounds),
#     depth printed every 10 snapshots.
#   scripts/bench/gc.sh            full run
#   scripts/bench/gc.sh --smoke    seconds-long run (small sizes)
# BENCH_DIR chooses where the files live (default: target/bench-gc, same disk as the build).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=1G CHILD_MIB=256 PARENT_MIB=128 SNAPS=100 BENCH_N=4000 FG_BYTES=$((512 << 20))
if [ "${1:-}" = "--smoke" ]; then
  SIZE=128M CHILD_MIB=32 PARENT_MIB=16 SNAPS=10 BENCH_N=500 FG_BYTES=$((64 << 20))
fi
command -v qemu-img >/dev/null || { echo "gc.sh needs qemu-img (apt-get install qemu-utils)" >&2; exit 1; }
cargo build --release -q -p ddstor
D=$PWD/target/release/ddstor
DIR=$(realpath -m "${BENCH_DIR:-target/bench-gc}")
AGENT=
cleanup() {
  [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null
  rm -rf "$DIR"
}
trap cleanup EXIT
rm -rf "$DIR" && mkdir -p "$DIR"
echo "load before: $(uptime)"
now() { date +%s.%N; }

# ---- 1. merge throughput vs plain copy ------------------------------------------------------
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
t0=$(now)
$D vhd coalesce "$DIR/c.vhd" --json >"$DIR/merge.json"
t1=$(now)
dd if="$DIR/copy.src" of="$DIR/copy.dst" bs=2M conv=fsync status=none
t2=$(now)
bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes_copied"])' "$DIR/merge.json")
echo "== 1. merge throughput (child ${CHILD_MIB} MiB allocated, parent ${SIZE})"
python3 - "$bytes" "$t0" "$t1" "$t2" <<'PY'
import sys
b, t0, t1, t2 = int(sys.argv[1]), *map(float, sys.argv[2:])
m, c = b / (t1 - t0) / 2**20, b / (t2 - t1) / 2**20
print(f"merge (ddstor vhd coalesce): {b >> 20} MiB in {t1 - t0:.3f} s = {m:.1f} MiB/s")
print(f"plain copy (dd conv=fsync):  {b >> 20} MiB in {t2 - t1:.3f} s = {c:.1f} MiB/s")
print(f"ratio merge/copy: {m / c:.2f}x (goal >= 0.8x)")
PY
rm -f "$DIR"/*.vhd "$DIR/copy.dst" "$DIR/parent.data" "$DIR/a.data" "$DIR/b.data"

# ---- an agent ----------------------------------------------------------------------------------
SOCK=$DIR/agent.sock
start_agent() { # $1 = on|off (background GC)
  printf '[gc]\nenabled = %s\ninterval_secs = 1\n' "$([ "$1" = on ] && echo true || echo false)" >"$DIR/agent.toml"
  "$D" serve --config "$DIR/agent.toml" --data-dir "$DIR/data" --unix "$SOCK" \
    --nbd-socket "$DIR/nbd.sock" --log info 2>>"$DIR/agent.log" &
  AGENT=$!
  for _ in $(seq 100); do "$D" call --unix "$SOCK" Query.query >/dev/null 2>&1 && return; sleep 0.1; done
  echo "ddstor serve did not start:" >&2; cat "$DIR/agent.log" >&2; exit 1
}
stop_agent() { kill "$AGENT"; wait "$AGENT" || true; AGENT=; }
call() { "$D" call --unix "$SOCK" "$@"; }
field() { python3 -c 'import json,sys; v=json.load(sys.stdin); print(v[sys.argv[1]] if isinstance(v, dict) else v)' "$1"; }
SR=$(python3 -c 'import uuid; print(uuid.uuid4())')
start_agent off
call SR.create "{\"sr\":\"$SR\",\"name_label\":\"bench\"}" >/dev/null
call SR.attach "{\"sr\":\"$SR\"}" >/dev/null
SRDIR=$DIR/data/$SR
new_vdi() { call VDI.create "{\"sr\":\"$SR\",\"vdi_info\":{\"name_label\":\"$1\",\"virtual_size\":$(($2))}}" | field vdi; }
snap() { call VDI.snapshot "{\"sr\":\"$SR\",\"vdi_info\":{\"vdi\":\"$1\"}}" | field vdi; }
destroy() { call VDI.destroy "{\"sr\":\"$SR\",\"vdi\":\"$1\"}" >/dev/null; }

# ---- 2. foreground I/O with and without a GC round ----------------------------------------------
FG=$(new_vdi fg "$FG_BYTES")
uri=$(call VDI.attach3 "{\"dp\":\"bench\",\"sr\":\"$SR\",\"vdi\":\"$FG\",\"vm\":\"vm\",\"read_write\":true}")
call VDI.activate3 "{\"dp\":\"bench\",\"sr\":\"$SR\",\"vdi\":\"$FG\",\"vm\":\"vm\"}" >/dev/null
name=$(python3 -c 'import re,sys; print(re.search(r"exportname=([^\"]+)", sys.argv[1]).group(1))' "$uri")
NBD="nbd+unix:///$name?socket=$DIR/nbd.sock"
qemu-img bench -f raw -w -c $((FG_BYTES >> 20)) -s 1M -d 4 "$NBD" >/dev/null # allocate it all: reads hit data
WORK=$(new_vdi work $(((CHILD_MIB + 64) << 20)))
make_gc_work() { # WORK ← H2 (CHILD_MIB allocated, hidden) ← H1 (hidden): one hidden merge to do
  head -c $((CHILD_MIB << 20)) /dev/urandom >"$DIR/w.data"
  destroy "$(snap "$WORK")"
  $D vhd write "$SRDIR/$WORK.vhd" --offset $((64 << 20)) --input "$DIR/w.data"
  destroy "$(snap "$WORK")"
  rm -f "$DIR/w.data"
  sync
}
bench() { # $1 = read|write → MiB/s of qemu-img bench (64 KiB requests, queue depth 8)
  local w=; [ "$1" = write ] && w=-w
  local t0 t1
  t0=$(now); qemu-img bench -f raw $w -c "$BENCH_N" -s 64k -d 8 -S 1M "$NBD" >/dev/null; t1=$(now)
  python3 -c "import sys; print(f'{$BENCH_N * 64 / 1024 / ($t1 - $t0):.1f}')"
}
echo "== 2. foreground I/O on an NBD export (qemu-img bench, $BENCH_N x 64 KiB, depth 8), alone vs during a GC round"
echo "   (3 alternating pairs per mode; median; the GC round merges ${CHILD_MIB} MiB of another VDI at the default [gc] rate limit)"
for mode in read write; do
  alone=() during=() notes=()
  for _ in 1 2 3; do
    sync; sleep 0.5
    alone+=("$(bench $mode)")
    make_gc_work
    t0=$(now)
    "$D" sr --unix "$SOCK" gc "$SR" --json >"$DIR/gc.json" 2>/dev/null &
    gcpid=$!
    sleep 0.2
    during+=("$(bench $mode)")
    running=no; kill -0 $gcpid 2>/dev/null && running=yes
    wait $gcpid
    t1=$(now)
    notes+=("$(field bytes_copied <"$DIR/gc.json"):$t0:$t1:$running")
  done
  python3 - "$mode" "${alone[*]}" "${during[*]}" "${notes[*]}" <<'PY'
import statistics, sys
mode = sys.argv[1]
alone = [float(x) for x in sys.argv[2].split()]
during = [float(x) for x in sys.argv[3].split()]
notes = [n.split(":") for n in sys.argv[4].split()]
a, d = statistics.median(alone), statistics.median(during)
gc = ", ".join(f"{int(b) >> 20} MiB in {float(t1) - float(t0):.2f} s (overlapped: {r})" for b, t0, t1, r in notes)
print(f"{mode:5}: alone {a:7.1f} MiB/s   during GC {d:7.1f} MiB/s   ratio {d / a:.2f}x")
print(f"       runs alone {alone}  during {during}; GC rounds: {gc}")
PY
done
call VDI.deactivate "{\"dp\":\"bench\",\"sr\":\"$SR\",\"vdi\":\"$FG\",\"vm\":\"vm\"}" >/dev/null
call VDI.detach "{\"dp\":\"bench\",\"sr\":\"$SR\",\"vdi\":\"$FG\",\"vm\":\"vm\"}" >/dev/null
stop_agent

# ---- 3. chain depth over time under snapshot/delete load ---------------------------------------
start_agent on
call SR.attach "{\"sr\":\"$SR\"}" >/dev/null
depth() {
  call Query.diagnostics '{}' | python3 -c '
import json, re, sys
t = json.load(sys.stdin)
m = re.search(r"VDI " + sys.argv[1] + r" .*?chain \[([^\]]*)\]", t)
print(m.group(1).count(",") + 1 if m else "?")' "$1"
}
echo "== 3. chain depth of a VDI under $SNAPS snapshot+destroy (background GC, 1 s rounds)"
printf '%10s %8s %8s\n' snapshots seconds depth
T0=$(now)
printf '%10s %8.1f %8s\n' 0 0 "$(depth "$FG")"
for i in $(seq "$SNAPS"); do
  destroy "$(snap "$FG")"
  if [ $((i % 10)) -eq 0 ]; then
    printf '%10s %8.1f %8s\n' "$i" "$(python3 -c "print($(now) - $T0)")" "$(depth "$FG")"
  fi
done
sleep 3
printf '%10s %8.1f %8s   (3 s after the last one)\n' "$SNAPS" "$(python3 -c "print($(now) - $T0)")" "$(depth "$FG")"
stop_agent
echo "load after: $(uptime)"

#!/usr/bin/env bash
# Benchmark of the agent's call path: VDI.stat calls per second and p50/p99 latency through
# `ddstor serve`, over the unix socket and over vchan-sim (simulated grant/event-channel ring with
# the test xenstored), measured in the same run, with their ratio.
#
#   scripts/bench/agent.sh [CALLS] [CONCURRENCY]      (defaults: 20000 calls, 1 and 16 in flight)
#
# Release build. Prints one line per transport and concurrency, then the ratio vchan/unix.
set -euo pipefail
cd "$(dirname "$0")/../.."
CALLS=${1:-20000}
CONCS=${2:-"1 16"}
cargo build --release --bin ddstor >/dev/null
BIN=$PWD/target/release/ddstor
W=$(mktemp -d "${TMPDIR:-/tmp}/ddstor-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

wait_for() { # command...
  for _ in $(seq 1 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "bench: timed out waiting for: $*" >&2; return 1
}

SOCK=$W/run/agent.sock
serve=(serve --data-dir "$W/data" --unix "$SOCK")
vchan_args=()
if "$BIN" serve --help | grep -q -- '--xenstore-socket'; then
  mkdir -p "$W/sim"
  XS=$W/xenstored.sock
  "$BIN" xenstored --socket "$XS" --domain 1 2>"$W/xenstored.log" &
  pids+=($!)
  wait_for test -S "$XS"
  serve+=(--xen sim --xen-sim-dir "$W/sim" --domid 1 --vchan-client 0 --vchan-port bench
          --xenstore on --xenstore-socket "$XS.1")
  vchan_args=(--vchan 1:bench)
fi
XENSTORED_PATH=${XS:-} XEN_SIM_DIR=$W/sim "$BIN" "${serve[@]}" 2>"$W/agent.log" &
pids+=($!)
wait_for "$BIN" call --unix "$SOCK" Query.query

SR=$("$BIN" sr --unix "$SOCK" create --attach --name-label bench)
VDI=$("$BIN" vdi --unix "$SOCK" --sr "$SR" create --size 1G --name-label bench)
ARGS="{\"sr\":\"$SR\",\"vdi\":\"$VDI\"}"

declare -A rate p50
for c in $CONCS; do
  out=$("$BIN" call --unix "$SOCK" --repeat "$CALLS" --concurrency "$c" VDI.stat "$ARGS")
  rate[unix$c]=$(python3 -c "import json,sys; print(round(json.loads(sys.argv[1])['calls_per_sec']))" "$out")
  p50[unix$c]=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d['p50_us'], d['p99_us'])" "$out")
  printf 'VDI.stat unix       concurrency %-3s %8s calls/s   p50/p99 %s us\n' "$c" "${rate[unix$c]}" "${p50[unix$c]}"
  if [ ${#vchan_args[@]} -gt 0 ]; then
    out=$(XENSTORED_PATH=$XS XEN_SIM_DIR=$W/sim "$BIN" call "${vchan_args[@]}" --repeat "$CALLS" --concurrency "$c" VDI.stat "$ARGS")
    rate[vchan$c]=$(python3 -c "import json,sys; print(round(json.loads(sys.argv[1])['calls_per_sec']))" "$out")
    p50[vchan$c]=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d['p50_us'], d['p99_us'])" "$out")
    printf 'VDI.stat vchan-sim  concurrency %-3s %8s calls/s   p50/p99 %s us   (vchan/unix throughput ratio %s)\n' \
      "$c" "${rate[vchan$c]}" "${p50[vchan$c]}" \
      "$(python3 -c "print(round(${rate[vchan$c]}/${rate[unix$c]}, 2))")"
  else
    echo "VDI.stat vchan-sim  (not measured: this build has no vchan/xenstore support in ddstor serve)"
  fi
done

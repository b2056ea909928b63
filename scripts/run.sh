#!/usr/bin/env bash
# The README's main-job command: build ddstor if needed and run the storage agent on an embedded
# default set-up, in the foreground until Ctrl-C (SIGINT/SIGTERM stop it cleanly).
#
#   scripts/run.sh [DIR]
#
# DIR (default: a new temporary directory) holds everything: the agent's data directory with a
# local SR (created on the first run, its uuid kept in DIR/sr.uuid, attached on every run), the
# unix socket DIR/run/agent.sock and the agent's log DIR/agent.log.
# Environment: PROFILE=release builds and runs the optimised binary; DDSTOR_LOG sets the log filter.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-$(mktemp -d "${TMPDIR:-/tmp}/ddstor.XXXXXX")}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PROFILE=${PROFILE:-debug}

if [ "$PROFILE" = release ]; then
  cargo build --release --bin ddstor
else
  cargo build --bin ddstor
fi
BIN=$PWD/target/$PROFILE/ddstor
SOCK=$DIR/run/agent.sock
LOG=$DIR/agent.log

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

serve_args=(serve --data-dir "$DIR/data" --unix "$SOCK")

DDSTOR_LOG=${DDSTOR_LOG:-info} "$BIN" "${serve_args[@]}" 2>>"$LOG" &
agent=$!
pids+=("$agent")

for _ in $(seq 1 300); do
  if "$BIN" call --unix "$SOCK" Query.query >/dev/null 2>&1; then break; fi
  if ! kill -0 "$agent" 2>/dev/null; then
    echo "run.sh: the agent exited; its log:" >&2; cat "$LOG" >&2; exit 1
  fi
  sleep 0.1
done

if [ -s "$DIR/sr.uuid" ]; then
  SR=$(cat "$DIR/sr.uuid")
  "$BIN" sr --unix "$SOCK" attach "$SR"
else
  SR=$("$BIN" sr --unix "$SOCK" create --name-label "local SR" --attach)
  echo "$SR" >"$DIR/sr.uuid"
fi

cat <<MSG
ddstor is serving (pid $agent; log: $LOG).
  data directory : $DIR/data
  local SR       : $SR (attached)
  unix socket    : $SOCK

Talk to it:
  $BIN call --unix $SOCK Query.query
  $BIN call --unix $SOCK VDI.create '{"sr":"$SR","vdi_info":{"name_label":"disk","virtual_size":1073741824}}'
  $BIN vdi --unix $SOCK --sr $SR list
  $BIN vdi --unix $SOCK --sr $SR snapshot VDI-UUID
Stop it with Ctrl-C. Run "scripts/run.sh $DIR" again to serve the same SR.
MSG
wait "$agent"

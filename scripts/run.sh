#!/usr/bin/env bash
# The README's main-job command: build ddstor if needed and run the storage agent on an embedded
# default set-up, in the foreground until Ctrl-C (SIGINT/SIGTERM stop it cleanly: the agent
# writes `stopping`, finishes in-flight calls, deregisters from xenstore and exits 0).
#
#   scripts/run.sh [DIR]
#
# DIR (default: a new temporary directory) holds everything: the agent's data directory with a
# local SR (created on the first run, its uuid kept in DIR/sr.uuid, attached on every run), the
# unix socket DIR/run/agent.sock, the logs DIR/agent.log and DIR/xenstored.log.
#
# Transports: the agent serves the unix socket and vchan (port "ddstor", client dom0), and
# registers in xenstore.
#   - xenstore: $XENSTORED_PATH when set (an already running xenstored); else, on a Xen host
#     (/dev/xen/gntdev present), /run/xenstored/socket; else the project's test xenstored
#     (`ddstor xenstored`) started on DIR/xenstored.sock.
#   - vchan: the real Xen backend when /dev/xen/gntdev exists, else simulated Xen in DIR/sim.
# Environment: PROFILE=release builds and runs the optimised binary; DDSTOR_BIN=PATH runs that
# binary without building; DDSTOR_LOG sets the log filter; DDSTOR_XEN=xen|sim forces the backend.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-$(mktemp -d "${TMPDIR:-/tmp}/ddstor.XXXXXX")}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PROFILE=${PROFILE:-debug}

if [ -n "${DDSTOR_BIN:-}" ]; then
  BIN=$DDSTOR_BIN            # a binary built elsewhere (tests)
else
  if [ "$PROFILE" = release ]; then
    cargo build --release --bin ddstor
  else
    cargo build --bin ddstor
  fi
  BIN=$PWD/target/$PROFILE/ddstor
fi
SOCK=$DIR/run/agent.sock
LOG=$DIR/agent.log
PORT=ddstor

if [ -z "${DDSTOR_XEN:-}" ]; then
  if [ -e /dev/xen/gntdev ]; then DDSTOR_XEN=xen; else DDSTOR_XEN=sim; fi
fi

agent=
xsd=
stop_all() {
  local st=0
  if [ -n "$agent" ] && kill -0 "$agent" 2>/dev/null; then
    kill -TERM "$agent" 2>/dev/null || true
  fi
  if [ -n "$agent" ]; then wait "$agent" 2>/dev/null || st=$?; fi
  agent=
  # xenstored last: the agent deregisters through it.
  if [ -n "$xsd" ]; then
    kill -TERM "$xsd" 2>/dev/null || true
    wait "$xsd" 2>/dev/null || true
    xsd=
  fi
  return "$st"
}
on_signal() {
  trap - INT TERM
  echo "run.sh: stopping the agent" >&2
  if stop_all; then
    echo "run.sh: the agent stopped cleanly and deregistered" >&2
    exit 0
  fi
  echo "run.sh: the agent exited with an error; its log: $LOG" >&2
  exit 1
}
trap stop_all EXIT
trap on_signal INT TERM

if [ -n "${XENSTORED_PATH:-}" ]; then
  XS=$XENSTORED_PATH
elif [ "$DDSTOR_XEN" = xen ]; then
  XS=/run/xenstored/socket
else
  XS=$DIR/xenstored.sock
  "$BIN" xenstored --socket "$XS" 2>>"$DIR/xenstored.log" &
  xsd=$!
  for _ in $(seq 1 100); do [ -S "$XS" ] && break; sleep 0.05; done
  [ -S "$XS" ] || { echo "run.sh: the test xenstored did not start; see $DIR/xenstored.log" >&2; exit 1; }
fi
export XENSTORED_PATH=$XS

serve_args=(serve --data-dir "$DIR/data" --unix "$SOCK" --xenstore on --xenstore-socket "$XS"
            --xen "$DDSTOR_XEN" --vchan-port "$PORT" --vchan-client 0)
if [ "$DDSTOR_XEN" = sim ]; then
  mkdir -p "$DIR/sim"
  export XEN_SIM_DIR=$DIR/sim
  serve_args+=(--xen-sim-dir "$DIR/sim")
fi

DDSTOR_LOG=${DDSTOR_LOG:-info} "$BIN" "${serve_args[@]}" 2>>"$LOG" &
agent=$!

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
DOM=$("$BIN" xs list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["domid"])' 2>/dev/null || echo 0)

ENV="XENSTORED_PATH=$XS"
[ "$DDSTOR_XEN" = sim ] && ENV="$ENV XEN_SIM_DIR=$DIR/sim"
cat <<MSG
ddstor is serving (pid $agent; log: $LOG).
  data directory : $DIR/data
  local SR       : $SR (attached)
  unix socket    : $SOCK
  vchan          : domain $DOM, port $PORT ($DDSTOR_XEN backend) for client dom0
  xenstore       : $XS (registered under /local/domain/$DOM/data/ddstor)

Talk to it by unix socket:
  $BIN call --unix $SOCK Query.query
  $BIN call --unix $SOCK VDI.create '{"sr":"$SR","vdi_info":{"name_label":"disk","virtual_size":1073741824}}'
  $BIN vdi --unix $SOCK --sr $SR list
by vchan (domain:port):
  $ENV $BIN call --vchan $DOM:$PORT Query.query
  $ENV $BIN vdi --vchan $DOM:$PORT --sr $SR create --size 1G
by SR uuid (xenstore lookup; it picks the unix socket when the agent runs in your own
domain and the socket is here, vchan otherwise):
  $ENV $BIN call --sr $SR SR.stat '{"sr":"$SR"}'
  $ENV $BIN vdi --lookup --sr $SR list
  $ENV $BIN xs list
Stop it with Ctrl-C. Run "scripts/run.sh $DIR" again to serve the same SR.
MSG
wait "$agent" || true

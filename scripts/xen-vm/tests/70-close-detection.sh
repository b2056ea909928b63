# Close detection through the kernel's unmap notification: kill -9 the process that owns one
# end of a vchan and the other end sees it gone, with no polling (the dead process's live byte
# is cleared and its event sent by gntalloc/gntdev on its behalf), in both directions and both
# implementations (ddstor's Rust ring, Debian's C libxenvchan). Every case runs
# XENVM_CLOSE_ITERS times (default 3) in the same boot; the worst detection time is reported.
. /xenvm/lib.sh
export RUST_LOG=info
ITERS=${XENVM_CLOSE_ITERS:-3}
worst=0
dump() { for f in "$@"; do echo "--- $f"; cat "$f" 2>/dev/null; done; }

# seen NAME PID_TO_KILL PATTERN FILE...: kill -9 PID, then wait until FILE shows PATTERN
seen() {
  local name=$1 pid=$2 pat=$3 file=$4; shift 4
  local t0; t0=$(now_ms)
  kill -9 "$pid"
  wait_grep 20 "$pat" "$file" || { dump "$file" "$@"; fail "$name: the peer of the killed process did not see it go within 20 s"; }
  local ms=$(($(now_ms) - t0))
  info "$name: seen gone after ${ms} ms"
  [ "$ms" -gt "$worst" ] && worst=$ms
  return 0
}

publish_wait() { # PATH LOG: the server published its ring
  wait_for 20 xenstore-read "$1/event-channel" || { dump "$2"; fail "server did not publish at $1"; }
}

# start_server KIND TAG COUNT: a server (KIND rust or c) for dom0 on port TAG, logging to
# /tmp/TAG.s, serving COUNT clients (Rust only); waits until it published. Sets srv.
start_server() {
  case $1 in
    rust) xenvm-vchan --dom 0 server 0 "$2" --count "$3" >/tmp/$2.s 2>&1 & ;;
    c) vchan-peer server 0 "/local/domain/0/data/vchan/0/$2" >/tmp/$2.s 2>&1 & ;;
  esac
  srv=$!
  publish_wait "/local/domain/0/data/vchan/0/$2" /tmp/$2.s
}

# client KIND TAG MODE: a client (KIND rust or c) of dom0's server on port TAG, in MODE
# (hold: keep the vchan open and say "peer closed" when it goes; ping: one VCHAN_OK). Always
# run in a subshell (`&` or a pipeline): exec makes the subshell's pid the client's, so $! can
# be killed.
client() {
  case $1 in
    rust) exec xenvm-vchan --dom 0 client 0 "$2" "$3" ;;
    c) exec vchan-peer client 0 "/local/domain/0/data/vchan/0/$2" "$3" ;;
  esac
}

# hold SERVER-KIND CLIENT-KIND TAG COUNT: server and a holding client, both connected (the C
# server says nothing on connection: only the client's line counts then). Sets srv and cli.
hold() {
  start_server "$1" "$3" "$4"
  client "$2" "$3" hold >/tmp/$3.c 2>&1 &
  cli=$!
  wait_grep 20 "connected" /tmp/$3.c || { dump /tmp/$3.c /tmp/$3.s; fail "$3: the $2 client did not connect"; }
  if [ "$1" = rust ]; then
    wait_grep 20 "client connected" /tmp/$3.s || { dump /tmp/$3.c /tmp/$3.s; fail "$3: the rust server did not see its client"; }
  fi
}

# server_killed NAME SERVER-KIND CLIENT-KIND TAG: kill -9 the server; the holding client sees
# its peer gone and exits cleanly.
server_killed() {
  hold "$2" "$3" "$4" 1
  seen "$1" $srv "peer closed" /tmp/$4.c /tmp/$4.s
  wait $cli; rc=$?
  [ "$rc" -eq 0 ] || { dump /tmp/$4.c; fail "$1: the client exited rc=$rc"; }
}

# client_killed NAME CLIENT-KIND TAG: kill -9 the client of a Rust server; the server sees
# it go, publishes a new ring and serves the next client.
client_killed() {
  hold rust "$2" "$3" 2
  seen "$1" $cli "client 1 " /tmp/$3.s /tmp/$3.c
  publish_wait "/local/domain/0/data/vchan/0/$3" /tmp/$3.s
  client "$2" "$3" ping | grep -q VCHAN_OK || { dump /tmp/$3.s; fail "$1: the next client after the killed one"; }
  wait $srv; rc=$?
  [ "$rc" -eq 0 ] || { dump /tmp/$3.s; fail "$1: the server exited rc=$rc"; }
}

i=1
while [ "$i" -le "$ITERS" ]; do
  info "=== iteration $i of $ITERS"
  server_killed rust-server-killed/c-client rust c k1-$i
  server_killed c-server-killed/rust-client c rust k2-$i
  server_killed rust-server-killed/rust-client rust rust k3-$i
  client_killed rust-client-killed/rust-server rust k4-$i
  client_killed c-client-killed/rust-server c k5-$i
  i=$((i + 1))
done
bench close-detect-worst-of-$((ITERS * 5)) "$worst" ms

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

i=1
while [ "$i" -le "$ITERS" ]; do
  info "=== iteration $i of $ITERS"
  # 1. Rust server killed, C client holding.
  P=/local/domain/0/data/vchan/0/k1-$i
  xenvm-vchan --dom 0 server 0 k1-$i --count 1 >/tmp/k1s 2>&1 &
  srv=$!
  publish_wait $P /tmp/k1s
  vchan-peer client 0 $P hold >/tmp/k1c 2>&1 &
  cli=$!
  wait_grep 20 "connected" /tmp/k1c && wait_grep 20 "client connected" /tmp/k1s || { dump /tmp/k1c /tmp/k1s; fail "1: C client did not connect"; }
  seen "rust-server-killed/c-client" $srv "peer closed" /tmp/k1c /tmp/k1s
  wait $cli || fail "1: C client rc=$?"

  # 2. C server killed, Rust client holding.
  P=/local/domain/0/data/vchan/0/k2-$i
  vchan-peer server 0 $P >/tmp/k2s 2>&1 &
  srv=$!
  publish_wait $P /tmp/k2s
  xenvm-vchan --dom 0 client 0 k2-$i hold >/tmp/k2c 2>&1 &
  cli=$!
  wait_grep 20 "connected" /tmp/k2c || { dump /tmp/k2c /tmp/k2s; fail "2: Rust client did not connect"; }
  seen "c-server-killed/rust-client" $srv "peer closed" /tmp/k2c /tmp/k2s
  wait $cli || { dump /tmp/k2c; fail "2: Rust client rc=$?"; }

  # 3. Rust server killed, Rust client holding.
  P=/local/domain/0/data/vchan/0/k3-$i
  xenvm-vchan --dom 0 server 0 k3-$i --count 1 >/tmp/k3s 2>&1 &
  srv=$!
  publish_wait $P /tmp/k3s
  xenvm-vchan --dom 0 client 0 k3-$i hold >/tmp/k3c 2>&1 &
  cli=$!
  wait_grep 20 "connected" /tmp/k3c && wait_grep 20 "client connected" /tmp/k3s || { dump /tmp/k3c /tmp/k3s; fail "3: Rust client did not connect"; }
  seen "rust-server-killed/rust-client" $srv "peer closed" /tmp/k3c /tmp/k3s
  wait $cli || { dump /tmp/k3c; fail "3: Rust client rc=$?"; }

  # 4. Rust client killed while the Rust server serves it: the server sees it go and serves
  #    the next client.
  P=/local/domain/0/data/vchan/0/k4-$i
  xenvm-vchan --dom 0 server 0 k4-$i --count 2 >/tmp/k4s 2>&1 &
  srv=$!
  publish_wait $P /tmp/k4s
  xenvm-vchan --dom 0 client 0 k4-$i hold >/tmp/k4c 2>&1 &
  cli=$!
  wait_grep 20 "connected" /tmp/k4c && wait_grep 20 "client connected" /tmp/k4s || { dump /tmp/k4c /tmp/k4s; fail "4: Rust client did not connect"; }
  seen "rust-client-killed/rust-server" $cli "client 1 " /tmp/k4s /tmp/k4c
  publish_wait $P /tmp/k4s
  xenvm-vchan --dom 0 client 0 k4-$i ping | grep -q VCHAN_OK || { dump /tmp/k4s; fail "4: next client after the killed one"; }
  wait $srv || { dump /tmp/k4s; fail "4: server rc=$?"; }

  # 5. C client killed while the Rust server serves it.
  P=/local/domain/0/data/vchan/0/k5-$i
  xenvm-vchan --dom 0 server 0 k5-$i --count 2 >/tmp/k5s 2>&1 &
  srv=$!
  publish_wait $P /tmp/k5s
  vchan-peer client 0 $P hold >/tmp/k5c 2>&1 &
  cli=$!
  wait_grep 20 "connected" /tmp/k5c && wait_grep 20 "client connected" /tmp/k5s || { dump /tmp/k5c /tmp/k5s; fail "5: C client did not connect"; }
  seen "c-client-killed/rust-server" $cli "client 1 " /tmp/k5s /tmp/k5c
  publish_wait $P /tmp/k5s
  vchan-peer client 0 $P ping | grep -q VCHAN_OK || { dump /tmp/k5s; fail "5: next client after the killed one"; }
  wait $srv || { dump /tmp/k5s; fail "5: server rc=$?"; }
  i=$((i + 1))
done
bench close-detect-worst-of-$((ITERS * 5)) "$worst" ms

# Close detection through the kernel's unmap notification: kill -9 the process that owns the
# ring and the peer sees it gone (its live byte cleared and an event sent by gntalloc/gntdev on
# the dead process's behalf), in both directions and both implementations.
. /xenvm/lib.sh
diag() { # pid: where a stuck process is
  echo "diag: pid $1: $(cat /proc/$1/wchan 2>/dev/null) state $(grep State /proc/$1/status 2>/dev/null)"
  cat /proc/$1/stack 2>/dev/null | head -12
  ps | grep -v "\[" | tail -15
}
export RUST_LOG=debug
# 1. Rust server killed -9, C client holding: the C client sees the server gone.
xenvm-vchan --dom 0 server 0 kill-rs --count 1 >/tmp/k1 2>&1 &
srv=$!
P=/local/domain/0/data/vchan/0/kill-rs
wait_for 10 xenstore-read $P/event-channel || { cat /tmp/k1; fail "Rust server did not publish"; }
vchan-peer client 0 $P hold >/tmp/k1c 2>&1 &
sleep 2; grep -q connected /tmp/k1c || { cat /tmp/k1c /tmp/k1; fail "C client did not connect"; }
cli=$!
sleep 2
kill -9 $srv
wait_for 20 grep -q "peer closed" /tmp/k1c || { cat /tmp/k1c /tmp/k1; fail "C client did not see the killed Rust server go"; }
wait $cli || fail "C client rc=$?"
cat /tmp/k1c
# 2. C server killed -9, Rust client holding.
P=/local/domain/0/data/vchan/0/kill-c
vchan-peer server 0 $P >/tmp/k2 2>&1 &
srv=$!
wait_for 10 xenstore-read $P/event-channel || fail "C server did not publish"
xenstore-ls -fp $P
xenvm-vchan --dom 0 client 0 kill-c hold >/tmp/k2c 2>&1 &
sleep 2; grep -q connected /tmp/k2c || { cat /tmp/k2c /tmp/k2; diag $cli; for p in $(pidof xenstore-read xenstore-write); do diag $p; done; fail "Rust client did not connect"; }
cli=$!
sleep 2
kill -9 $srv
wait_for 20 grep -q "peer closed" /tmp/k2c || { cat /tmp/k2c /tmp/k2; fail "Rust client did not see the killed C server go"; }
cat /tmp/k2c
# 3. Rust client killed -9 while a Rust server echoes: the server notices, and serves the next.
xenvm-vchan --dom 0 server 0 kill-rc --count 2 >/tmp/k3 2>&1 &
srv=$!
wait_for 10 xenstore-read /local/domain/0/data/vchan/0/kill-rc/event-channel || fail "server 3 did not publish"
xenvm-vchan --dom 0 client 0 kill-rc hold >/dev/null 2>&1 &
cli=$!
sleep 2
kill -9 $cli
wait_for 20 grep -q "client 1" /tmp/k3 || { cat /tmp/k3; fail "Rust server did not see the killed client go"; }
wait_for 10 xenstore-read /local/domain/0/data/vchan/0/kill-rc/event-channel || { cat /tmp/k3; fail "server did not listen again"; }
xenvm-vchan --dom 0 client 0 kill-rc ping || fail "next client after the killed one"
wait $srv || fail "server 3 rc=$?"
cat /tmp/k3

# Debian's C libxenvchan, server and client in dom0 (dom0 -> dom0 over real grants and a
# looped-back interdomain event channel): ping, then a verified full-duplex stream through an echo
# server on order-10 and order-11 rings and on multi-page rings, and small round trips.
. /xenvm/lib.sh
P=/local/domain/0/data/xenvm-c
start_server() { # name [read_min write_min]
  vchan-peer server 0 $P/$1 $2 $3 >/tmp/srv.$1 2>&1 &
  srv=$!
  wait_for 10 xenstore-read $P/$1/event-channel || { cat /tmp/srv.$1; fail "$1: server did not publish ring-ref"; }
}
stop_server() { # name
  wait $srv || { cat /tmp/srv.$1; fail "$1: server rc=$?"; }
  cat /tmp/srv.$1
}
start_server ping
vchan-peer client 0 $P/ping ping | grep -q VCHAN_OK || fail "ping"
stop_server ping
for spec in "order10 1024 65536" "order11 2048 65536" "pages 65536 2097152"; do
  set -- $spec
  start_server $1 $2 $2
  out=$(vchan-peer client 0 $P/$1 stream $3) || { kill $srv; cat /tmp/srv.$1; fail "$1: stream"; }
  echo "$out"
  stop_server $1
  bench c-libxenvchan-stream-$1 "$(echo "$out" | awk '{print $(NF-1)}')" MiB/s
done
start_server rtt
out=$(vchan-peer client 0 $P/rtt rtt 200) || fail "rtt"
echo "$out"
stop_server rtt
bench c-libxenvchan-rtt "$(echo "$out" | awk '{print $3}')" us

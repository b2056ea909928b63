# ddstor's Rust ring (transport::vchan, xen backend: gntalloc/gntdev/evtchn) against Debian's C
# libxenvchan on real grants, both directions: Rust server + C client with rings of orders 10/11,
# 11/10 and multi-page (12/12, 14/16), C server + Rust client (libxenvchan picks orders 10/11 and
# multi-page from its minimum sizes); a verified full-duplex stream and a ping each time.
. /xenvm/lib.sh
rs_server_c_client() { # name orders bytes
  xenvm-vchan --dom 0 server 0 $1 --orders $2 --count 2 >/tmp/rs.$1 2>&1 &
  srv=$!
  P=/local/domain/0/data/vchan/0/$1
  wait_for 10 xenstore-read $P/event-channel || { cat /tmp/rs.$1; fail "$1: Rust server did not publish"; }
  vchan-peer client 0 $P ping | grep -q VCHAN_OK || { cat /tmp/rs.$1; fail "$1: C client ping"; }
  wait_for 10 xenstore-read $P/event-channel || { cat /tmp/rs.$1; fail "$1: Rust server did not re-publish"; }
  out=$(vchan-peer client 0 $P stream $3) || { cat /tmp/rs.$1; fail "$1: C client stream"; }
  echo "$out"
  wait $srv || { cat /tmp/rs.$1; fail "$1: Rust server rc=$?"; }
  cat /tmp/rs.$1
  grep -q "echoed $3 bytes" /tmp/rs.$1 || fail "$1: Rust server did not echo $3 bytes"
}
c_server_rs_client() { # name read_min write_min bytes expected-orders
  P=/local/domain/0/data/vchan/0/$1
  vchan-peer server 0 $P $2 $3 >/tmp/cs.$1 2>&1 &
  srv=$!
  wait_for 10 xenstore-read $P/event-channel || { cat /tmp/cs.$1; fail "$1: C server did not publish"; }
  out=$(xenvm-vchan --dom 0 client 0 $1 stream $4) || { cat /tmp/cs.$1; fail "$1: Rust client stream"; }
  echo "$out"
  echo "$out" | grep -q "orders $5" || fail "$1: expected orders $5"
  wait $srv || { cat /tmp/cs.$1; fail "$1: C server rc=$?"; }
  cat /tmp/cs.$1
}
rs_server_c_client rs-o10-11 10,11 65536
rs_server_c_client rs-o11-10 11,10 65536
rs_server_c_client rs-o12-12 12,12 1048576
rs_server_c_client rs-o14-16 14,16 2097152
c_server_rs_client c-o10-11 1024 2048 65536 10,11
c_server_rs_client c-pages 65536 65536 2097152 16,16

# A hostile client maps the Rust server's ring and writes a producer index far beyond the ring
# size: the server drops that connection with a reason, and serves the next client.
. /xenvm/lib.sh
xenvm-vchan --dom 0 server 0 hostile --orders 10,11 --count 2 >/tmp/h 2>&1 &
srv=$!
P=/local/domain/0/data/vchan/0/hostile
wait_for 10 xenstore-read $P/event-channel || { cat /tmp/h; fail "server did not publish"; }
vchan-peer client 0 $P hostile || { cat /tmp/h; fail "the server kept the hostile connection open"; }
wait_for 10 xenstore-read $P/event-channel || { cat /tmp/h; fail "server did not listen again after the hostile client"; }
vchan-peer client 0 $P ping | grep -q VCHAN_OK || { cat /tmp/h; fail "next client after the hostile one"; }
wait $srv || { cat /tmp/h; fail "server rc=$?"; }
cat /tmp/h
grep -q "client 1.*dropped" /tmp/h || fail "the server did not report dropping the hostile client"

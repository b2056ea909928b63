# Measure: ddstor's Rust ring, stream throughput and small round trips, on real grants (xen
# backend) versus the simulated backend (files + datagram sockets in tmpfs), same boot, same
# rings (orders 16,16), plus Debian's C libxenvchan on real grants as the reference.
. /xenvm/lib.sh
mkdir -p /tmp/sim
export XEN_SIM_DIR=/tmp/sim
measure() { # backend port
  xenvm-vchan --dom 0 --backend $1 server 0 $2 --orders 16,16 --count 2 >/tmp/b.$2 2>&1 &
  srv=$!
  wait_for 10 xenstore-read /local/domain/0/data/vchan/0/$2/event-channel || { cat /tmp/b.$2; fail "$1 server"; }
  st=$(xenvm-vchan --dom 0 --backend $1 client 0 $2 stream 4194304) || { cat /tmp/b.$2; fail "$1 stream"; }
  echo "$st"
  wait_for 10 xenstore-read /local/domain/0/data/vchan/0/$2/event-channel || { cat /tmp/b.$2; fail "$1 server again"; }
  rt=$(xenvm-vchan --dom 0 --backend $1 client 0 $2 rtt 300) || fail "$1 rtt"
  echo "$rt"
  wait $srv
  eval "${1}_mibs=$(echo "$st" | awk '{print $(NF-1)}')"
  eval "${1}_rtt=$(echo "$rt" | awk '{print $3}')"
}
measure xen bench-xen
measure sim bench-sim
bench rust-ring-stream-xen "$xen_mibs" MiB/s
bench rust-ring-stream-sim "$sim_mibs" MiB/s
bench rust-ring-stream-xen/sim "$(awk -v a="$xen_mibs" -v b="$sim_mibs" 'BEGIN{printf "%.2f", a/b}')" ratio
bench rust-ring-rtt-xen "$xen_rtt" us
bench rust-ring-rtt-sim "$sim_rtt" us
bench rust-ring-rtt-xen/sim "$(awk -v a="$xen_rtt" -v b="$sim_rtt" 'BEGIN{printf "%.2f", a/b}')" ratio

# The goal: a second domain. dom0 starts a PV driver domain with `xl create` (the same kernel,
# its own initramfs); the guest runs ddstor's Rust vchan server (xen backend) and publishes its
# rendezvous under its own /local/domain/<domid>/data; dom0's Rust client and Debian's C
# libxenvchan client connect across domains on real grants (ping, verified stream, round trips);
# then `xl destroy` of the guest is seen by dom0's connected client.
. /xenvm/lib.sh
cat >/tmp/dd.cfg <<CFG
name = "ddstor-dd"
type = "pv"
kernel = "/xenvm/guest/vmlinuz"
ramdisk = "/xenvm/guest/initrd.img"
extra = "console=hvc0 loglevel=4 xenvm.cmd=vchan-echo"
memory = 256
vcpus = 1
on_crash = "preserve"
CFG
guestlog() { ls -l /var/log/xen; tail -40 /var/log/xen/guest-ddstor-dd.log; }
xl create /tmp/dd.cfg || fail "xl create"
dom=$(xl domid ddstor-dd) || fail "xl domid"
info "driver domain is domain $dom"
xl list
P=/local/domain/$dom/data/vchan/0/dd
wait_for 120 xenstore-read $P/event-channel || { guestlog; xenstore-ls -f /local/domain/$dom | head -40; fail "the driver domain did not publish its vchan"; }
info "guest published: ring-ref=$(xenstore-read $P/ring-ref) event-channel=$(xenstore-read $P/event-channel)"
xenvm-vchan --dom 0 client $dom dd ping || { guestlog; fail "cross-domain ping (Rust client)"; }
wait_for 20 xenstore-read $P/event-channel || fail "guest did not listen again"
out=$(xenvm-vchan --dom 0 client $dom dd stream 262144) || { guestlog; fail "cross-domain stream"; }
echo "$out"
bench dd-rust-ring-stream-xen "$(echo "$out" | awk '{print $(NF-1)}')" MiB/s
wait_for 20 xenstore-read $P/event-channel || fail "guest did not listen again"
out=$(xenvm-vchan --dom 0 client $dom dd rtt 50) || { guestlog; fail "cross-domain rtt"; }
echo "$out"
bench dd-rust-ring-rtt-xen "$(echo "$out" | awk '{print $3}')" us
wait_for 20 xenstore-read $P/event-channel || fail "guest did not listen again"
vchan-peer client $dom $P ping | grep -q VCHAN_OK || { guestlog; fail "cross-domain ping (C libxenvchan client)"; }
# xl destroy while dom0 holds a connection: the client must see the peer gone.
wait_for 20 xenstore-read $P/event-channel || fail "guest did not listen again"
xenvm-vchan --dom 0 client $dom dd hold >/tmp/ddhold 2>&1 &
cli=$!
wait_grep 30 connected /tmp/ddhold || { cat /tmp/ddhold; fail "hold client did not connect"; }
xl destroy ddstor-dd || fail "xl destroy"
wait_for 30 grep -q "peer closed" /tmp/ddhold || { cat /tmp/ddhold; fail "dom0's client did not see the destroyed domain go"; }
cat /tmp/ddhold
xl list
guestlog

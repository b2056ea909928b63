# The agent in dom0 with kernel nbd devices (config `[nbd] kernel_devices`, "auto": nbd.ko is
# loaded): VDI.attach3 returns a BlockDevice (/dev/nbdN) besides the NBD URI; data written with
# dd through the device is read back (checksums) and found in the VDI's VHD (`ddstor vhd
# read`); VDI.detach disconnects the device.
# Then the VDI's mode changing under a connected device: attached read-only on one datapath
# (the device is read-only: a write is refused), then read-write on a second datapath — the
# same device, still connected, now accepts a write that lands in the VHD; the RW datapath
# leaves and the device is read-only again.
. /xenvm/lib.sh
export RUST_LOG=info NO_COLOR=1
DATA=/var/lib/ddstor-knbd SOCK=/run/ddstor/knbd.sock
mkdir -p $DATA /run/ddstor
ddstor serve --data-dir $DATA --unix $SOCK --xenstore off >/tmp/knbd.log 2>&1 &
agent=$!
trap 'kill -9 $agent 2>/dev/null' EXIT
ON_FAIL="tail -30 /tmp/knbd.log"
wait_for 60 test -S $SOCK || fail "the agent did not open $SOCK"
C="ddstor call --unix $SOCK"
new_attached_vdi "$C" knbd
[ -n "$bdev" ] || fail "VDI.attach3 returned no BlockDevice although /dev/nbd0 exists"
$C VDI.activate3 "{$dp}" >/dev/null || fail "VDI.activate3"
test -b "$bdev" || fail "$bdev is not a block device"
sys=/sys/class/block/$(basename $bdev)
size=$(cat $sys/size)
[ "$size" = 32768 ] || fail "$bdev has $size sectors, the VDI 32768"
[ "$(cat $sys/ro)" = 0 ] || fail "$bdev of a read-write datapath is read-only"
dd if=/dev/urandom of=/tmp/kpat bs=64k count=32 2>/dev/null
want=$(md5sum </tmp/kpat | cut -d' ' -f1)
dd if=/tmp/kpat of=$bdev bs=64k seek=8 conv=fsync 2>/dev/null || fail "writing $bdev"
blockdev --flushbufs $bdev; echo 3 >/proc/sys/vm/drop_caches
got=$(dd if=$bdev bs=64k skip=8 count=32 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "read back $got from $bdev, wrote $want"
$C VDI.deactivate "{$dp}" >/dev/null || fail "VDI.deactivate"
$C VDI.detach "{$dp}" >/dev/null || fail "VDI.detach"
disconnected() { [ "$(cat $sys/size)" = 0 ]; }
wait_for 30 disconnected || fail "$bdev still connected after VDI.detach"
inv=$(ddstor vhd read --offset 524288 --length 2097152 $DATA/$sr/$vdi.vhd | md5sum | cut -d' ' -f1)
[ "$inv" = "$want" ] || fail "the VHD holds $inv, $want was written through $bdev"
info "2 MiB through $bdev (the agent's kernel nbd device): md5 $want read back and in the VHD; detach disconnected it"

# 2. Read-only on one datapath, then read-write on a second: the device follows.
new_vdi "$C" 16777216
attach_dp "$C" ro vm1 false
[ -n "$bdev" ] || fail "the read-only VDI.attach3 returned no BlockDevice"
dpro=$dp robdev=$bdev sys=/sys/class/block/$(basename $bdev)
$C VDI.activate_readonly "{$dpro}" >/dev/null || fail "VDI.activate_readonly"
[ "$(cat $sys/ro)" = 1 ] || fail "$robdev of a read-only datapath is not read-only"
dd if=/tmp/kpat of=$robdev bs=64k count=1 conv=fsync 2>/tmp/ro-dd && fail "a write through the read-only $robdev succeeded"
info "read-only datapath: $robdev is read-only, dd refused: $(grep -v records /tmp/ro-dd | tr "\n" " ")"
attach_dp "$C" rw vm2 true
[ "$bdev" = "$robdev" ] || fail "the read-write VDI.attach3 returned ${bdev:-no BlockDevice}, not the connected $robdev"
[ "$(cat $sys/ro)" = 0 ] || fail "$robdev is still read-only with a read-write datapath attached"
$C VDI.activate3 "{$dp}" >/dev/null || fail "VDI.activate3 of the read-write datapath"
dd if=/tmp/kpat of=$robdev bs=64k seek=16 count=16 conv=fsync 2>/dev/null || fail "writing $robdev after the read-write attach"
want2=$(dd if=/tmp/kpat bs=64k count=16 2>/dev/null | md5sum | cut -d' ' -f1)
blockdev --flushbufs $robdev; echo 3 >/proc/sys/vm/drop_caches
got=$(dd if=$robdev bs=64k skip=16 count=16 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$want2" ] || fail "read back $got from $robdev, wrote $want2"
$C VDI.deactivate "{$dp}" >/dev/null || fail "VDI.deactivate of the read-write datapath"
$C VDI.detach "{$dp}" >/dev/null || fail "VDI.detach of the read-write datapath"
[ "$(cat $sys/ro)" = 1 ] || fail "$robdev stayed writable after the read-write datapath left"
[ "$(cat $sys/size)" = 32768 ] || fail "$robdev was disconnected while the read-only datapath holds it"
$C VDI.deactivate "{$dpro}" >/dev/null || fail "VDI.deactivate of the read-only datapath"
$C VDI.detach "{$dpro}" >/dev/null || fail "VDI.detach of the read-only datapath"
wait_for 30 disconnected || fail "$robdev still connected after the last VDI.detach"
[ "$(cat $sys/ro)" = 0 ] || fail "$robdev was left read-only for its next user"
inv=$(ddstor vhd read --offset 1048576 --length 1048576 $DATA/$sr/$vdi.vhd | md5sum | cut -d' ' -f1)
[ "$inv" = "$want2" ] || fail "the VHD holds $inv, $want2 was written through $robdev"
info "RO then RW datapath on one VDI: $robdev read-only, then writable on the same connection (1 MiB md5 $want2 in the VHD), read-only again, disconnected"
kill -TERM $agent; wait $agent || fail "the agent exited rc=$? on SIGTERM"
trap - EXIT

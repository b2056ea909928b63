# The agent in dom0 with kernel nbd devices (config `[nbd] kernel_devices`, "auto": nbd.ko is
# loaded): VDI.attach3 returns a BlockDevice (/dev/nbdN) besides the NBD URI; data written with
# dd through the device is read back (checksums) and found in the VDI's VHD (`ddstor vhd
# read`); VDI.detach disconnects the device.
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
sr=$(uuid)
$C SR.create "{\"sr\":\"$sr\",\"name_label\":\"knbd\",\"name_description\":\"\",\"device_config\":{},\"physical_size\":0}" >/dev/null || fail "SR.create"
$C SR.attach "{\"sr\":\"$sr\",\"device_config\":{}}" >/dev/null || fail "SR.attach"
vdi=$($C VDI.create "{\"sr\":\"$sr\",\"vdi_info\":{\"name_label\":\"disk\",\"virtual_size\":16777216}}" | field vdi)
[ -n "$vdi" ] || fail "VDI.create"
dp="\"dp\":\"knbd\",\"sr\":\"$sr\",\"vdi\":\"$vdi\",\"vm\":\"vm0\""
out=$($C VDI.attach3 "{$dp,\"read_write\":true}") || fail "VDI.attach3"
echo "$out"
bdev=$(echo "$out" | tr -d ' \n' | grep -o '"BlockDevice",{"path":"[^"]*"' | sed 's/.*"path":"//; s/"$//')
[ -n "$bdev" ] || fail "VDI.attach3 returned no BlockDevice although /dev/nbd0 exists"
$C VDI.activate3 "{$dp}" >/dev/null || fail "VDI.activate3"
test -b "$bdev" || fail "$bdev is not a block device"
size=$(cat /sys/class/block/$(basename $bdev)/size)
[ "$size" = 32768 ] || fail "$bdev has $size sectors, the VDI 32768"
dd if=/dev/urandom of=/tmp/kpat bs=64k count=32 2>/dev/null
want=$(md5sum </tmp/kpat | cut -d' ' -f1)
dd if=/tmp/kpat of=$bdev bs=64k seek=8 conv=fsync 2>/dev/null || fail "writing $bdev"
blockdev --flushbufs $bdev; echo 3 >/proc/sys/vm/drop_caches
got=$(dd if=$bdev bs=64k skip=8 count=32 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "read back $got from $bdev, wrote $want"
$C VDI.deactivate "{$dp}" >/dev/null || fail "VDI.deactivate"
$C VDI.detach "{$dp}" >/dev/null || fail "VDI.detach"
disconnected() { [ "$(cat /sys/class/block/$(basename $bdev)/size)" = 0 ]; }
wait_for 30 disconnected || fail "$bdev still connected after VDI.detach"
inv=$(ddstor vhd read --offset 524288 --length 2097152 $DATA/$sr/$vdi.vhd | md5sum | cut -d' ' -f1)
[ "$inv" = "$want" ] || fail "the VHD holds $inv, $want was written through $bdev"
info "2 MiB through $bdev (the agent's kernel nbd device): md5 $want read back and in the VHD; detach disconnected it"
kill -TERM $agent; wait $agent || fail "the agent exited rc=$? on SIGTERM"
trap - EXIT

# VDI data I/O from dom0 through a driver domain's datapath (issue 8, step 3). The PV guest runs
# the ddstor agent and blkback under `xl devd` (libxl's driver-domain daemon); dom0 attaches a
# disk to itself with `xl block-attach 0 'backend=<guest>,…'` and reads/writes it through its
# own blkfront (/dev/xvdb).
#  1. target = a loop device on a file in the guest (the block plumbing alone);
#  2. target = the kernel nbd device of the VDI: the `BlockDevice` the guest's agent returns from
#     VDI.attach3 (its own /dev/nbdN, config `[nbd] kernel_devices`), or where the agent does
#     not offer one, /dev/nbd0 connected by Debian's nbd-client to the NBD export it returns.
#     Driven by dom0 over vchan: dom0 writes through blkfront -> blkback -> nbd -> ddstor's NBD
#     server -> the VDI's VHD; reads back; then, after VDI.deactivate/detach (which disconnects
#     the agent's device), the guest reads the VHD file itself (`ddstor vhd read`).
# Checksums must agree everywhere.
. /xenvm/lib.sh
export XENSTORED_PATH=/run/xenstored/socket
name=ddstor-blk
cat >/tmp/blk.cfg <<CFG
name = "$name"
type = "pv"
kernel = "/xenvm/guest/vmlinuz"
ramdisk = "/xenvm/guest/initrd.img"
extra = "console=hvc0 loglevel=4 xenvm.cmd=blk-backend"
memory = 256
vcpus = 1
on_crash = "preserve"
CFG
# roundtrip VDEV TARGET: attach the guest's block device TARGET to dom0 as /dev/VDEV (blkback
# in the guest, blkfront here), write 4 MiB of random data at 1 MiB with fsync, drop the caches
# and read it back. Sets WANT (md5 of the data), WMS and RMS (write/read times in ms).
roundtrip() {
  local vdev=$1 target=$2 got t0
  xl block-attach 0 "format=raw,vdev=$vdev,access=rw,backend=$name,backendtype=phy,script=/xenvm/guest.d/blk-hotplug,target=$target" \
    || fail "xl block-attach 0 of $target with backend=$name"
  wait_for 60 test -b /dev/$vdev || fail "/dev/$vdev did not appear in dom0"
  info "dom0 sees $target as /dev/$vdev: $(cat /sys/class/block/$vdev/size) sectors"
  dd if=/dev/urandom of=/tmp/pattern-$vdev bs=64k count=64 2>/dev/null
  WANT=$(md5sum </tmp/pattern-$vdev | cut -d' ' -f1)
  t0=$(now_ms)
  dd if=/tmp/pattern-$vdev of=/dev/$vdev bs=64k seek=16 conv=fsync 2>/dev/null || fail "writing /dev/$vdev"
  WMS=$(($(now_ms) - t0))
  blockdev --flushbufs /dev/$vdev; echo 3 >/proc/sys/vm/drop_caches
  t0=$(now_ms)
  got=$(dd if=/dev/$vdev bs=64k skip=16 count=64 2>/dev/null | md5sum | cut -d' ' -f1)
  RMS=$(($(now_ms) - t0))
  [ "$got" = "$WANT" ] || fail "dom0 read back $got from /dev/$vdev ($target), wrote $WANT"
}
guestlog() {
  echo "--- guest console"; tail -40 /var/log/xen/guest-$name.log
  [ -n "${dom:-}" ] && GX_TIMEOUT=20 guest_exec $dom 'tail -20 /var/log/xen/devd.log; cat /var/log/xen/blk-hotplug.log; dmesg | tail -20'
  echo "--- dom0 dmesg"; dmesg | tail -20
  xenstore-ls -f /local/domain/0/device 2>/dev/null | head -30
}
ON_FAIL=guestlog
xl create /tmp/blk.cfg || fail "xl create"
dom=$(xl domid $name) || fail "xl domid"
info "driver domain is domain $dom"
wait_for 180 xenstore-read /local/domain/$dom/data/xenvm-exec/ready || fail "the guest's job did not start"
guest_exec $dom 'dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null && losetup /dev/loop0 /tmp/disk.img && losetup /dev/loop0' \
  || fail "loop device in the guest"
roundtrip xvdb /dev/loop0
want=$WANT lwms=$WMS lrms=$RMS
inguest=$(guest_exec $dom 'dd if=/tmp/disk.img bs=64k skip=16 count=64 2>/dev/null | md5sum') || fail "checksum in the guest"
echo "$inguest" | grep -q "$want" || fail "the guest's file has $inguest, dom0 wrote $want"
info "4 MiB written by dom0 through the driver domain's blkback: md5 $want in dom0 and in the guest"
xl block-detach 0 xvdb || fail "xl block-detach"
gone() { ! test -b /dev/xvdb; }
wait_for 60 gone || fail "/dev/xvdb still there after block-detach"

# 2. The agent's datapath.
export RUST_LOG=warn
REG=/local/domain/$dom/data/ddstor
ready() { [ "$(xenstore-read $REG/state 2>/dev/null)" = ready ]; }
wait_for 180 ready || fail "the agent in domain $dom did not register"
C="ddstor call --connect-timeout 60 --vchan $dom:ddstor"
new_attached_vdi "$C" blk
uri=$(echo "$out" | grep -o 'nbd:unix:[^"]*' | head -1)
[ -n "$uri" ] || fail "VDI.attach3 returned no nbd:unix: URI"
sock=${uri#nbd:unix:}; sock=${sock%%:exportname=*}; export=${uri##*:exportname=}
$C VDI.activate3 "{$dp}" >/dev/null || fail "VDI.activate3"
if [ -n "$bdev" ]; then
  via="the agent's own kernel device $bdev"
  guest_exec $dom "cat /sys/class/block/$(basename $bdev)/size" | grep -qv '^0$' || fail "$bdev is not connected"
else
  bdev=/dev/nbd0 via="nbd-client on /dev/nbd0 (the agent returned no BlockDevice)"
  guest_exec $dom "nbd-client -unix $sock /dev/nbd0 -N $export && cat /sys/class/block/nbd0/size" \
    || fail "nbd-client in the guest could not connect /dev/nbd0 to the agent's export $export"
fi
info "the VDI in the guest: $via"
roundtrip xvdc "$bdev"
want2=$WANT wms=$WMS rms=$RMS
# The peer: the same 4 MiB through the same blkfront/blkback path onto the guest's loop device
# (no nbd, no ddstor), measured above in this boot.
bench dd-write-4MiB-via-driver-domain-ddstor "$wms" ms
bench dd-write-4MiB-via-driver-domain-loop "$lwms" ms
bench dd-write-via-driver-domain-ddstor/loop "$(awk -v a="$wms" -v b="$lwms" 'BEGIN{printf "%.2f", a/b}')" time-ratio
bench dd-read-4MiB-via-driver-domain-ddstor "$rms" ms
bench dd-read-4MiB-via-driver-domain-loop "$lrms" ms
bench dd-read-via-driver-domain-ddstor/loop "$(awk -v a="$rms" -v b="$lrms" 'BEGIN{printf "%.2f", a/b}')" time-ratio
xl block-detach 0 xvdc || fail "xl block-detach xvdc"
wait_for 60 sh -c '! test -b /dev/xvdc' || fail "/dev/xvdc still there after block-detach"
case $via in nbd-client*) guest_exec $dom "nbd-client -d /dev/nbd0" || fail "nbd-client -d" ;; esac
$C VDI.deactivate "{$dp}" >/dev/null || fail "VDI.deactivate"
$C VDI.detach "{$dp}" >/dev/null || fail "VDI.detach"
disconnected() { [ "$(guest_exec $dom "cat /sys/class/block/$(basename $bdev)/size")" = 0 ]; }
wait_for 30 disconnected || fail "$bdev still connected after VDI.detach"
inguest2=$(guest_exec $dom "ddstor vhd read --offset 1048576 --length 4194304 /var/lib/ddstor/$sr/$vdi.vhd | md5sum") \
  || fail "ddstor vhd read in the guest: $inguest2"
echo "$inguest2" | grep -q "$want2" || fail "the VDI's VHD in the guest holds $inguest2, dom0 wrote $want2"
guest_exec $dom "ddstor vhd check /var/lib/ddstor/$sr/$vdi.vhd" || fail "ddstor vhd check of the VDI"
info "4 MiB written by dom0 into VDI $vdi through blkfront/blkback/$via/ddstor: md5 $want2 read back in dom0 and in the VHD in the guest"
xl destroy $name || fail "xl destroy"

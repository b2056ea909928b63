# VDI data I/O from dom0 through a driver domain's datapath (issue 8, step 3). The PV guest runs
# the ddstor agent and blkback under `xl devd` (libxl's driver-domain daemon); dom0 attaches a
# disk to itself with `xl block-attach 0 'backend=<guest>,…'` and reads/writes it through its
# own blkfront (/dev/xvdb).
#  1. target = a loop device on a file in the guest (the block plumbing alone);
#  2. target = /dev/nbd0 in the guest, connected (nbd-client) to the NBD export the guest's agent
#     returns from VDI.attach3, driven by dom0 over vchan: dom0 writes through blkfront ->
#     blkback -> nbd -> ddstor's NBD server -> the VDI's VHD; reads back; then, after
#     VDI.deactivate/detach, the guest reads the VHD file itself (`ddstor vhd read`).
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
xl block-attach 0 "format=raw,vdev=xvdb,access=rw,backend=$name,backendtype=phy,script=/xenvm/guest.d/blk-hotplug,target=/dev/loop0" \
  || fail "xl block-attach 0 with backend=$name"
wait_for 60 test -b /dev/xvdb || fail "/dev/xvdb did not appear in dom0"
info "dom0 sees /dev/xvdb: $(cat /sys/class/block/xvdb/size) sectors"
dd if=/dev/urandom of=/tmp/pattern bs=64k count=64 2>/dev/null
want=$(md5sum </tmp/pattern | cut -d' ' -f1)
dd if=/tmp/pattern of=/dev/xvdb bs=64k conv=fsync 2>/dev/null || fail "writing /dev/xvdb"
blockdev --flushbufs /dev/xvdb; echo 3 >/proc/sys/vm/drop_caches
got=$(dd if=/dev/xvdb bs=64k count=64 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "dom0 read back $got, wrote $want"
inguest=$(guest_exec $dom 'head -c 4194304 /tmp/disk.img | md5sum') || fail "checksum in the guest"
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
sr=$(uuid)
$C SR.create "{\"sr\":\"$sr\",\"name_label\":\"blk\",\"name_description\":\"\",\"device_config\":{},\"physical_size\":0}" >/dev/null || fail "SR.create"
$C SR.attach "{\"sr\":\"$sr\",\"device_config\":{}}" >/dev/null || fail "SR.attach"
vdi=$($C VDI.create "{\"sr\":\"$sr\",\"vdi_info\":{\"name_label\":\"disk\",\"virtual_size\":16777216}}" | field vdi)
[ -n "$vdi" ] || fail "VDI.create"
dp="\"dp\":\"blk\",\"sr\":\"$sr\",\"vdi\":\"$vdi\",\"vm\":\"vm0\""
out=$($C VDI.attach3 "{$dp,\"read_write\":true}") || fail "VDI.attach3"
echo "$out"
uri=$(echo "$out" | grep -o 'nbd:unix:[^"]*' | head -1)
[ -n "$uri" ] || fail "VDI.attach3 returned no nbd:unix: URI"
sock=${uri#nbd:unix:}; sock=${sock%%:exportname=*}; export=${uri##*:exportname=}
$C VDI.activate3 "{$dp}" >/dev/null || fail "VDI.activate3"
guest_exec $dom "nbd-client -unix $sock /dev/nbd0 -N $export && cat /sys/class/block/nbd0/size" \
  || fail "nbd-client in the guest could not connect /dev/nbd0 to the agent's export $export"
xl block-attach 0 "format=raw,vdev=xvdc,access=rw,backend=$name,backendtype=phy,script=/xenvm/guest.d/blk-hotplug,target=/dev/nbd0" \
  || fail "xl block-attach 0 of /dev/nbd0 with backend=$name"
wait_for 60 test -b /dev/xvdc || fail "/dev/xvdc did not appear in dom0"
info "dom0 sees the VDI as /dev/xvdc: $(cat /sys/class/block/xvdc/size) sectors"
dd if=/dev/urandom of=/tmp/pattern2 bs=64k count=64 2>/dev/null
want2=$(md5sum </tmp/pattern2 | cut -d' ' -f1)
t0=$(now_ms)
dd if=/tmp/pattern2 of=/dev/xvdc bs=64k seek=16 conv=fsync 2>/dev/null || fail "writing /dev/xvdc"
wms=$(($(now_ms) - t0))
blockdev --flushbufs /dev/xvdc; echo 3 >/proc/sys/vm/drop_caches
t0=$(now_ms)
got2=$(dd if=/dev/xvdc bs=64k skip=16 count=64 2>/dev/null | md5sum | cut -d' ' -f1)
rms=$(($(now_ms) - t0))
[ "$got2" = "$want2" ] || fail "dom0 read back $got2 from the VDI, wrote $want2"
bench dd-vdi-write-4MiB-dom0-blkfront "$wms" ms
bench dd-vdi-read-4MiB-dom0-blkfront "$rms" ms
xl block-detach 0 xvdc || fail "xl block-detach xvdc"
wait_for 60 sh -c '! test -b /dev/xvdc' || fail "/dev/xvdc still there after block-detach"
guest_exec $dom "nbd-client -d /dev/nbd0" || fail "nbd-client -d"
$C VDI.deactivate "{$dp}" >/dev/null || fail "VDI.deactivate"
$C VDI.detach "{$dp}" >/dev/null || fail "VDI.detach"
inguest2=$(guest_exec $dom "ddstor vhd read --offset 1048576 --length 4194304 /var/lib/ddstor/$sr/$vdi.vhd | md5sum") \
  || fail "ddstor vhd read in the guest: $inguest2"
echo "$inguest2" | grep -q "$want2" || fail "the VDI's VHD in the guest holds $inguest2, dom0 wrote $want2"
guest_exec $dom "ddstor vhd check /var/lib/ddstor/$sr/$vdi.vhd" || fail "ddstor vhd check of the VDI"
info "4 MiB written by dom0 into VDI $vdi through blkfront/blkback/nbd/ddstor: md5 $want2 read back in dom0 and in the VHD in the guest"
xl destroy $name || fail "xl destroy"

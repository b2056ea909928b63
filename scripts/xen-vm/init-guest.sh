#!/bin/sh
# The driver domain's /init (a PV guest started by dom0's tests with `xl create`): bring up the
# Xen devices, then run the script named by `xenvm.cmd=NAME` on the kernel command line (one of
# /xenvm/guest.d/NAME, set by the test's xl config `extra=`), logging to the console (hvc0, which
# dom0's xenconsoled writes to /var/log/xen/guest-<name>.log).
. /xenvm/lib.sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /var/lib/ddstor /var/log /var/log/xen /var/lib/xen /run/xen
# xen-blkback, loop and nbd: the guest can be the block backend of a dom0 disk (`xl devd`)
for m in xen-evtchn xen-gntalloc xen-gntdev xen-privcmd xenfs xen-blkback loop nbd; do
  insmod /lib/modules/$m.ko || echo "xenvm-guest: insmod $m FAILED"
done
mkdir -p /proc/xen
mount -t xenfs xenfs /proc/xen
domid=$(xenstore-read domid)
echo "xenvm-guest: up as domain $domid at $(cut -d' ' -f1 /proc/uptime) s"
echo "xenvm-guest: cmdline: $(cat /proc/cmdline)"
xenstore-write /local/domain/$domid/data/xenvm-state up || echo "xenvm-guest: xenstore-write failed rc=$?"
cmd=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^xenvm\.cmd=//p')
if [ -n "$cmd" ] && [ -x "/xenvm/guest.d/$cmd" ]; then
  echo "xenvm-guest: running $cmd"
  "/xenvm/guest.d/$cmd"
  echo "xenvm-guest: $cmd exited rc=$?"
else
  echo "xenvm-guest: no job '$cmd' in /xenvm/guest.d: $(ls /xenvm/guest.d)"
fi
exec sh

#!/bin/sh
# dom0's /init inside the Xen VM: bring up the Xen devices, xenstored and xenconsoled, run every
# test in /xenvm/tests in order, report each on the console, power off.
. /xenvm/lib.sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/xenstored /var/lib/xenstored /var/lib/xen /var/log/xen /run/xen /run/ddstor
echo "xenvm: dom0 up at $(cut -d' ' -f1 /proc/uptime) s, kernel $(uname -r), hypervisor $(cat /sys/hypervisor/type 2>/dev/null) $(cat /sys/hypervisor/version/major 2>/dev/null).$(cat /sys/hypervisor/version/minor 2>/dev/null)"
for m in xen-evtchn xen-gntalloc xen-gntdev xen-privcmd xenfs xen-blkback xen-blkfront nbd; do
  insmod /lib/modules/$m.ko || echo "xenvm: insmod $m FAILED"
done
mkdir -p /proc/xen
mount -t xenfs xenfs /proc/xen || echo "xenvm: mount xenfs FAILED"
xenstored --pid-file /run/xenstored.pid 2>&1
wait_for 10 xenstore-read / || echo "xenvm: xenstored does not answer"
xen-init-dom0 >/tmp/xen-init-dom0.log 2>&1 || { echo "xenvm: xen-init-dom0 FAILED"; cat /tmp/xen-init-dom0.log; }
xenconsoled --log=guest --log-dir=/var/log/xen --pid-file=/run/xenconsoled.pid 2>&1
echo "xenvm: Xen services up at $(cut -d' ' -f1 /proc/uptime) s"

for t in /xenvm/tests/*.sh; do
  [ -e "$t" ] || continue
  name=$(basename "$t" .sh)
  echo "xenvm: --- $name"
  start=$(cut -d' ' -f1 /proc/uptime)
  timeout "${XENVM_TEST_TIMEOUT:-480}" sh "$t" >/tmp/test.out 2>&1
  rc=$?
  sed -e '/^XENVM-BENCH/!s/^/xenvm   | /' /tmp/test.out
  secs=$(awk -v a="$start" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{printf "%.1f", b-a}')
  if [ "$rc" -eq 0 ]; then echo "XENVM-RESULT PASS $name (${secs} s)"
  else echo "XENVM-RESULT FAIL $name (rc=$rc, ${secs} s)"; fi
done
echo "XENVM-DONE at $(cut -d' ' -f1 /proc/uptime) s"
[ -e /xenvm/shell ] && exec sh
sync
poweroff -f

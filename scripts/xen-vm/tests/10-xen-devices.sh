# dom0 runs on a real Xen: the hypervisor is there and the Xen device nodes the backends use exist.
. /xenvm/lib.sh
[ "$(cat /sys/hypervisor/type)" = xen ] || fail "/sys/hypervisor/type is not xen"
grep -q control_d /proc/xen/capabilities || fail "not the control domain (/proc/xen/capabilities)"
for d in evtchn gntalloc gntdev privcmd xenbus; do
  [ -c /dev/xen/$d ] || fail "/dev/xen/$d missing"
done
ls -l /dev/xen
info "Xen $(cat /sys/hypervisor/version/major).$(cat /sys/hypervisor/version/minor)$(cat /sys/hypervisor/version/extra)"

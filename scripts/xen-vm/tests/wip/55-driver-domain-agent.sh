# The goal of issue 8: ddstor's agent in a real driver domain. dom0 starts a PV guest with
# `xl create` (same kernel, its own initramfs) whose /init runs `ddstor serve` with the xen
# vchan backend and xenstore registration through /dev/xen/xenbus; the agent registers under
# /local/domain/<domid>/data/ddstor; dom0 finds it by lookup and drives the core flow over a
# cross-domain vchan on real grants (`--vchan DOMID:ddstor`, then `--sr UUID`); then `xl destroy`
# of the guest is seen by a dom0 client holding a vchan to the agent, and by the registry's
# liveness rule (the agent's entry goes with the domain's tree: lookup finds no agent).
. /xenvm/lib.sh
export XENSTORED_PATH=/run/xenstored/socket
cat >/tmp/agent.cfg <<CFG
name = "ddstor-agent"
type = "pv"
kernel = "/xenvm/guest/vmlinuz"
ramdisk = "/xenvm/guest/initrd.img"
extra = "console=hvc0 loglevel=4 xenvm.cmd=ddstor-agent"
memory = 256
vcpus = 1
on_crash = "preserve"
CFG
guestlog() { echo "--- guest console"; tail -60 /var/log/xen/guest-ddstor-agent.log; }
ON_FAIL=guestlog
xl create /tmp/agent.cfg || fail "xl create"
dom=$(xl domid ddstor-agent) || fail "xl domid"
info "driver domain is domain $dom"
REG=/local/domain/$dom/data/ddstor
ready() { [ "$(xenstore-read $REG/state 2>/dev/null)" = ready ]; }
wait_for 180 ready || { guestlog; xenstore-ls -f /local/domain/$dom/data; fail "the agent in domain $dom did not register state=ready"; }
info "registered by the guest: $(xenstore-ls -f $REG | tr '\n' ';')"
ddstor xs list || fail "ddstor xs list"

ddstor_flow vchan-dd $REG --connect-timeout 60 --vchan $dom:ddstor
ddstor xs lookup "$LAST_SR" | tee /tmp/lookup || { guestlog; fail "lookup of $LAST_SR"; }
grep -q "$dom" /tmp/lookup || fail "the lookup does not name domain $dom"
ddstor_flow sr-lookup-dd $REG --connect-timeout 60 --sr "$LAST_SR"
out=$(ddstor call --connect-timeout 60 --vchan $dom:ddstor --repeat 100 Query.query) || fail "call --repeat across domains"
echo "$out"

# xl destroy while dom0 holds a vchan to the agent: the holder sees the peer gone, and the
# registry drops the agent (its domain's tree is removed by the toolstack).
xenvm-vchan --dom 0 client $dom ddstor hold >/tmp/ddhold 2>&1 &
wait_grep 30 connected /tmp/ddhold || { cat /tmp/ddhold; guestlog; fail "hold client did not connect to the agent"; }
xl destroy ddstor-agent || fail "xl destroy"
wait_grep 30 "peer closed" /tmp/ddhold || { cat /tmp/ddhold; fail "dom0's client did not see the destroyed domain go"; }
cat /tmp/ddhold
ddstor xs lookup "$LAST_SR" >/tmp/lookup2 2>&1 && { cat /tmp/lookup2; fail "the destroyed domain's agent is still found by lookup"; }
info "after xl destroy: lookup says: $(cat /tmp/lookup2)"
guestlog | tail -20

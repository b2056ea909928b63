# The goal of issue 8: ddstor's agent in a real driver domain. dom0 starts a PV guest with
# `xl create` (same kernel, its own initramfs) whose /init runs `ddstor serve` with the xen
# vchan backend and xenstore registration through /dev/xen/xenbus; the agent registers under
# /local/domain/<domid>/data/ddstor; dom0 finds it by lookup and drives the core flow over a
# cross-domain vchan on real grants (`--vchan DOMID:ddstor`, then `--sr UUID`). Then `xl
# destroy` of the guest, with calls in flight both ways:
#  - dom0's `ddstor call --repeat` to the guest's agent fails within seconds with "domain N is
#    gone" (AgentClient watches @releaseDomain and tells the ring, PeerGone), not at a timeout;
#  - a second agent in dom0, serving the guest as a vchan client (the guest calls it in a loop),
#    drops the dead domain's connection and publishes a new ring (listens again);
#  - the registry's liveness rule: lookup finds no agent for the SR any more.
# XENVM_DD_ITERS (default 1) repeats the whole scenario with a fresh guest each time.
. /xenvm/lib.sh
export XENSTORED_PATH=/run/xenstored/socket RUST_LOG=info NO_COLOR=1
ITERS=${XENVM_DD_ITERS:-1}
mkdir -p /var/lib/ddstor-dom0 /run/ddstor
worst_call=0
worst_listen=0

# after_ms T0: milliseconds since T0 (from now_ms)
after_ms() { echo $(($(now_ms) - $1)); }

run_once() { # N
  local n=$1 name=ddstor-agent-$1 dom REG dom0agent caller t0 ms
  cat >/tmp/agent.cfg <<CFG
name = "$name"
type = "pv"
kernel = "/xenvm/guest/vmlinuz"
ramdisk = "/xenvm/guest/initrd.img"
extra = "console=hvc0 loglevel=4 xenvm.cmd=ddstor-agent"
memory = 256
vcpus = 1
on_crash = "preserve"
CFG
  guestlog() { echo "--- guest console"; tail -60 /var/log/xen/guest-$name.log; echo "--- dom0 agent"; tail -30 /tmp/dom0agent.log; }
  ON_FAIL=guestlog
  # Paused first: dom0's second agent must know the guest's domid before the guest runs.
  xl create -p /tmp/agent.cfg || fail "xl create"
  dom=$(xl domid $name) || fail "xl domid"
  info "[$n] driver domain is domain $dom"
  ddstor serve --data-dir /var/lib/ddstor-dom0 --unix /run/ddstor/dom0-$n.sock --domid 0 --xen xen \
    --vchan-port dom0cli --vchan-client "$dom" --xenstore off >/tmp/dom0agent.log 2>&1 &
  dom0agent=$!
  wait_for 60 xenstore-read /local/domain/0/data/vchan/$dom/dom0cli/event-channel \
    || fail "dom0's second agent did not publish a ring for domain $dom"
  xl unpause $name || fail "xl unpause"
  REG=/local/domain/$dom/data/ddstor
  ready() { [ "$(xenstore-read $REG/state 2>/dev/null)" = ready ]; }
  wait_for 180 ready || { xenstore-ls -f /local/domain/$dom/data; fail "[$n] the agent in domain $dom did not register state=ready"; }
  info "[$n] registered by the guest: $(xenstore-ls -f $REG | tr '\n' ';')"
  ddstor xs list || fail "ddstor xs list"

  ddstor_flow vchan-dd $REG --connect-timeout 60 --vchan $dom:ddstor
  ddstor xs lookup "$LAST_SR" | tee /tmp/lookup || fail "[$n] lookup of $LAST_SR"
  grep -q "$dom" /tmp/lookup || fail "[$n] the lookup does not name domain $dom"
  ddstor_flow sr-lookup-dd $REG --connect-timeout 60 --sr "$LAST_SR"
  out=$(ddstor call --connect-timeout 60 --vchan $dom:ddstor --repeat 50 Query.query) || fail "[$n] call --repeat across domains"
  echo "$out"

  # The guest becomes a client of dom0's second agent.
  xenstore-write /local/domain/$dom/data/xenvm-client dom0cli || fail "xenstore-write xenvm-client"
  wait_grep 120 "vchan client connected.*client=$dom" /tmp/dom0agent.log || fail "[$n] the guest did not connect to dom0's agent"
  # dom0 calls the guest's agent in a loop; it is connected once the agent's published ring
  # is taken (the agent removes the rendezvous keys when a client connects, and publishes a
  # new ring when it leaves: wait for that first).
  wait_for 60 xenstore-read /local/domain/$dom/data/vchan/0/ddstor/event-channel \
    || fail "[$n] the guest's agent did not listen again after the last call"
  ddstor call --connect-timeout 60 --vchan $dom:ddstor --repeat 100000000 Query.query >/tmp/caller.out 2>/tmp/caller.err &
  caller=$!
  taken() { ! xenstore-read /local/domain/$dom/data/vchan/0/ddstor/event-channel; }
  wait_for 60 taken || fail "[$n] dom0's caller did not connect"
  kill -0 $caller 2>/dev/null || { cat /tmp/caller.err; fail "[$n] dom0's caller ended before xl destroy"; }

  # Times are from the end of `xl destroy` (which itself takes seconds under TCG: the
  # toolstack tears the domain down before it returns), and from its start.
  t0=$(now_ms)
  xl destroy $name || fail "xl destroy"
  t1=$(now_ms)
  info "[$n] xl destroy took $((t1 - t0)) ms"
  gone() { ! kill -0 $caller 2>/dev/null; }
  wait_for 60 gone || { cat /tmp/caller.err; fail "[$n] dom0's call to the destroyed domain's agent did not end within 60 s"; }
  ms=$(after_ms $t1)
  wait $caller && fail "[$n] the call to a destroyed domain succeeded"
  cat /tmp/caller.err
  grep -q "domain $dom is gone" /tmp/caller.err || fail "[$n] the call's error does not say the domain is gone"
  info "[$n] dom0's call failed ${ms} ms after xl destroy returned ($(after_ms $t0) ms after it began)"
  [ "$ms" -gt "$worst_call" ] && worst_call=$ms
  wait_for 60 xenstore-read /local/domain/0/data/vchan/$dom/dom0cli/event-channel \
    || fail "[$n] dom0's agent did not listen again after its client's domain died"
  ms=$(after_ms $t1)
  grep -q "client's domain is gone" /tmp/dom0agent.log || fail "[$n] dom0's agent did not log its client's domain gone"
  info "[$n] dom0's agent dropped the dead client and published a new ring ${ms} ms after xl destroy returned ($(after_ms $t0) ms after it began)"
  [ "$ms" -gt "$worst_listen" ] && worst_listen=$ms
  kill -TERM $dom0agent; wait $dom0agent || fail "[$n] dom0's second agent exited rc=$? on SIGTERM"

  ddstor xs lookup "$LAST_SR" >/tmp/lookup2 2>&1 && { cat /tmp/lookup2; fail "[$n] the destroyed domain's agent is still found by lookup"; }
  info "[$n] after xl destroy: lookup says: $(cat /tmp/lookup2)"
  guestlog | grep "xenvm-guest" | tail -5
}

i=1
while [ "$i" -le "$ITERS" ]; do
  run_once $i
  i=$((i + 1))
done
bench dd-destroyed-to-call-error-worst-of-$ITERS "$worst_call" ms
bench dd-destroyed-to-listen-again-worst-of-$ITERS "$worst_listen" ms
info "driver-domain agent scenario passed $ITERS time(s)"

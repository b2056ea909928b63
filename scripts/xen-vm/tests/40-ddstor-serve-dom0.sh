# `ddstor serve` inside dom0 on a real Xen: registered in the real C xenstored, driven through
# `ddstor call` over the core flow (Query, SR.create/attach, VDI.create/snapshot/clone/destroy,
# scan), first over its unix socket, then over a dom0 -> dom0 vchan on real grants
# (`--vchan 0:PORT`) and by SR lookup in xenstore (`--sr UUID`); SIGTERM deregisters it.
. /xenvm/lib.sh
export RUST_LOG=info NO_COLOR=1
export XENSTORED_PATH=/run/xenstored/socket
mkdir -p /var/lib/ddstor /run/ddstor
SOCK=/run/ddstor/agent.sock
REG=/local/domain/0/data/ddstor
LOG=/tmp/serve.log
SERVE_XEN=${XENVM_SERVE_XEN:-xen}

ddstor serve --data-dir /var/lib/ddstor --unix $SOCK --domid 0 --xen "$SERVE_XEN" \
  --vchan-port ddstor --vchan-client 0 --xenstore on --xenstore-socket $XENSTORED_PATH >$LOG 2>&1 &
agent=$!
trap 'kill -9 $agent 2>/dev/null' EXIT
ready() { [ "$(xenstore-read $REG/state 2>/dev/null)" = ready ]; }
wait_for 60 ready || { cat $LOG; xenstore-ls -f $REG; fail "the agent did not register state=ready in xenstored"; }
info "registered: $(xenstore-ls -f $REG | tr '\n' ';')"
[ "$(xenstore-read $REG/vchan-port)" = ddstor ] || fail "vchan-port not registered"

ddstor_flow unix $REG --unix $SOCK
ddstor xs lookup "$LAST_SR" | tee /tmp/lookup || fail "ddstor xs lookup $LAST_SR"
grep -q "0" /tmp/lookup || fail "lookup does not name dom0"

if [ -n "${XENVM_NO_VCHAN:-}" ]; then
  info "vchan part skipped by XENVM_NO_VCHAN"
else
  ddstor_flow vchan $REG --xen "$SERVE_XEN" --connect-timeout 60 --vchan 0:ddstor
  # `--sr` prefers the agent's unix socket when it is in this domain and the socket is here:
  # hide the socket (the agent keeps listening on it) so the lookup has to go by vchan.
  mv $SOCK $SOCK.hidden
  ddstor_flow sr-lookup $REG --xen "$SERVE_XEN" --connect-timeout 60 --sr "$LAST_SR"
  mv $SOCK.hidden $SOCK
  # Small calls (Query.query, one in flight) over the vchan on real grants, against a second
  # agent on the sim backend (files + datagram sockets in tmpfs) in the same boot.
  mkdir -p /tmp/sim /var/lib/ddsim
  ddstor serve --data-dir /var/lib/ddsim --unix /run/ddstor/sim.sock --domid 0 --xen sim \
    --xen-sim-dir /tmp/sim --vchan-port ddsim --vchan-client 0 --xenstore off \
    --xenstore-socket $XENSTORED_PATH >/tmp/sim.log 2>&1 &
  simagent=$!
  wait_for 60 xenstore-read /local/domain/0/data/vchan/0/ddsim/event-channel || { cat /tmp/sim.log; fail "the sim agent did not publish its vchan"; }
  x=$(ddstor call --xen "$SERVE_XEN" --vchan 0:ddstor --repeat 200 Query.query) || fail "call --repeat over the xen vchan"
  s=$(ddstor call --xen sim --xen-sim-dir /tmp/sim --vchan 0:ddsim --repeat 200 Query.query) || { cat /tmp/sim.log; fail "call --repeat over the sim vchan"; }
  echo "xen: $x"; echo "sim: $s"
  kill -TERM $simagent; wait $simagent
  num() { grep -o "\"$1\": *[0-9.]*" | head -1 | sed 's/.*: *//'; }
  xp=$(echo "$x" | num p50_us); sp=$(echo "$s" | num p50_us)
  bench ddstor-call-p50-vchan-xen "$xp" us
  bench ddstor-call-p50-vchan-sim "$sp" us
  bench ddstor-call-p50-vchan-xen/sim "$(awk -v a="$xp" -v b="$sp" 'BEGIN{printf "%.2f", a/b}')" ratio
fi

kill -TERM $agent
wait $agent; rc=$?
trap - EXIT
[ "$rc" -eq 0 ] || { tail -30 $LOG; fail "ddstor serve exited rc=$rc on SIGTERM"; }
ready && fail "still registered as ready after SIGTERM"
grep -c "call" $LOG | sed 's/^/calls logged: /'
tail -5 $LOG

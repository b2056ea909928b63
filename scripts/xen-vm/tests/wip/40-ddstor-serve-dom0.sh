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

# field NAME: the first "NAME": "value" of the JSON on stdin
field() { grep -o "\"$1\": *\"[^\"]*\"" | head -1 | sed 's/.*"\([^"]*\)"$/\1/'; }
uuid() { cat /proc/sys/kernel/random/uuid; }

# flow LABEL CONNECT-ARGS...: the core flow on a fresh SR through `ddstor call CONNECT-ARGS`
flow() {
  local label=$1; shift
  local sr out vdi snap clone scan
  sr=$(uuid)
  call() { ddstor call "$@"; }
  out=$(call "$@" Query.query) || fail "$label: Query.query"
  echo "$out" | grep -q '"name"' || fail "$label: Query.query answer: $out"
  call "$@" SR.create "{\"sr\":\"$sr\",\"name_label\":\"xen-$label\",\"name_description\":\"\",\"device_config\":{},\"physical_size\":0}" >/dev/null \
    || fail "$label: SR.create"
  call "$@" SR.attach "{\"sr\":\"$sr\",\"device_config\":{}}" >/dev/null || fail "$label: SR.attach"
  out=$(call "$@" VDI.create "{\"sr\":\"$sr\",\"vdi_info\":{\"name_label\":\"disk\",\"virtual_size\":4194304}}") \
    || fail "$label: VDI.create"
  vdi=$(echo "$out" | field vdi)
  [ -n "$vdi" ] || fail "$label: VDI.create returned no vdi: $out"
  snap=$(call "$@" VDI.snapshot "{\"sr\":\"$sr\",\"vdi_info\":{\"vdi\":\"$vdi\",\"name_label\":\"snap\"}}" | field vdi)
  [ -n "$snap" ] && [ "$snap" != "$vdi" ] || fail "$label: VDI.snapshot"
  clone=$(call "$@" VDI.clone "{\"sr\":\"$sr\",\"vdi_info\":{\"vdi\":\"$vdi\"}}" | field vdi)
  [ -n "$clone" ] && [ "$clone" != "$vdi" ] || fail "$label: VDI.clone"
  scan=$(call "$@" SR.scan "{\"sr\":\"$sr\"}") || fail "$label: SR.scan"
  for v in $vdi $snap $clone; do echo "$scan" | grep -q "$v" || fail "$label: SR.scan lacks $v"; done
  call "$@" VDI.destroy "{\"sr\":\"$sr\",\"vdi\":\"$clone\"}" >/dev/null || fail "$label: VDI.destroy"
  scan=$(call "$@" SR.scan "{\"sr\":\"$sr\"}") || fail "$label: SR.scan after destroy"
  echo "$scan" | grep -q "$clone" && fail "$label: the destroyed clone is still scanned"
  call "$@" VDI.stat "{\"sr\":\"$sr\",\"vdi\":\"$clone\"}" >/tmp/err 2>&1 && fail "$label: VDI.stat of a destroyed VDI succeeded"
  grep -q "VDI_does_not_exist\|does_not_exist" /tmp/err || { cat /tmp/err; fail "$label: the error is not xapi's"; }
  wait_for 30 xenstore-read $REG/srs/$sr || fail "$label: SR $sr not registered under $REG/srs"
  info "$label: core flow passed on SR $sr (vdi $vdi, snapshot $snap, clone $clone destroyed)"
  LAST_SR=$sr
}

flow unix --unix $SOCK
ddstor xs lookup "$LAST_SR" | tee /tmp/lookup || fail "ddstor xs lookup $LAST_SR"
grep -q "0" /tmp/lookup || fail "lookup does not name dom0"

if [ -n "${XENVM_NO_VCHAN:-}" ]; then
  info "vchan part skipped by XENVM_NO_VCHAN"
else
  flow vchan --xen "$SERVE_XEN" --vchan 0:ddstor
  # `--sr` prefers the agent's unix socket when it is in this domain and the socket is here:
  # hide the socket (the agent keeps listening on it) so the lookup has to go by vchan.
  mv $SOCK $SOCK.hidden
  flow sr-lookup --xen "$SERVE_XEN" --sr "$LAST_SR"
  mv $SOCK.hidden $SOCK
  # small-call round trips, real grants: ddstor call --repeat over the vchan
  out=$(ddstor call --xen "$SERVE_XEN" --vchan 0:ddstor --repeat 200 Query.query) || fail "call --repeat over vchan"
  echo "$out"
fi

kill -TERM $agent
wait $agent; rc=$?
trap - EXIT
[ "$rc" -eq 0 ] || { tail -30 $LOG; fail "ddstor serve exited rc=$rc on SIGTERM"; }
ready && fail "still registered as ready after SIGTERM"
grep -c "call" $LOG | sed 's/^/calls logged: /'
tail -5 $LOG

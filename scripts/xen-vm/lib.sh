# Helpers for the in-VM tests (sourced; busybox sh). Each test is /xenvm/tests/NN-name.sh and
# passes when it exits 0. Lines starting with XENVM-BENCH are reported by run-tests.sh.
export PATH=/xenvm/bin:/usr/bin:/usr/sbin:/bin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu

# fail REASON: the test fails; $ON_FAIL (a command) runs first, for diagnostics
fail() { echo "FAIL: $*"; [ -n "${ON_FAIL:-}" ] && $ON_FAIL; exit 1; }
info() { echo "$*"; }

uptime_s() { cut -d. -f1 /proc/uptime; }

# wait_for SECONDS COMMAND...: retry COMMAND every 0.2 s until it succeeds or SECONDS passed
wait_for() {
  local end=$(($(uptime_s) + $1)); shift
  while :; do
    "$@" >/dev/null 2>&1 && return 0
    [ "$(uptime_s)" -ge "$end" ] && return 1
    sleep 0.2
  done
}

# bench NAME VALUE UNIT: one measured figure
bench() { echo "XENVM-BENCH $1 $2 $3"; }

# Settings passed from the host (XENVM_* variables of run-tests.sh's environment).
[ -f /xenvm/env ] && . /xenvm/env

# now_ms: milliseconds since boot
now_ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }

# wait_grep SECONDS PATTERN FILE: wait until FILE has a line matching PATTERN
wait_grep() { wait_for "$1" grep -q -- "$2" "$3"; }

# field NAME: the first "NAME": "value" of the JSON on stdin
field() { grep -o "\"$1\": *\"[^\"]*\"" | head -1 | sed 's/.*"\([^"]*\)"$/\1/'; }
uuid() { cat /proc/sys/kernel/random/uuid; }

# new_sr CALL NAME: SR.create + SR.attach of a new SR labelled NAME through the command CALL
# (e.g. "ddstor call --unix $SOCK"; word-split). Sets sr.
new_sr() {
  local call=$1 name=$2
  sr=$(uuid)
  $call SR.create "{\"sr\":\"$sr\",\"name_label\":\"$name\",\"name_description\":\"\",\"device_config\":{},\"physical_size\":0}" >/dev/null \
    || fail "$name: SR.create"
  $call SR.attach "{\"sr\":\"$sr\",\"device_config\":{}}" >/dev/null || fail "$name: SR.attach"
}

# new_vdi CALL SIZE: VDI.create of SIZE bytes in SR $sr through CALL. Sets vdi.
new_vdi() {
  local call=$1 size=$2 out
  out=$($call VDI.create "{\"sr\":\"$sr\",\"vdi_info\":{\"name_label\":\"disk\",\"virtual_size\":$size}}") \
    || fail "VDI.create in $sr"
  vdi=$(echo "$out" | field vdi)
  [ -n "$vdi" ] || fail "VDI.create returned no vdi: $out"
}

# attach_dp CALL DP VM RW: VDI.attach3 of $vdi of $sr on datapath DP for VM, read-write if RW
# is true (else read-only). Sets dp (the JSON members naming the datapath, for the other VDI.*
# calls: "{$dp}"), out (the answer, also printed) and bdev (its BlockDevice path, or empty).
attach_dp() {
  local call=$1
  dp="\"dp\":\"$2\",\"sr\":\"$sr\",\"vdi\":\"$vdi\",\"vm\":\"$3\""
  out=$($call VDI.attach3 "{$dp,\"read_write\":$4}") || fail "VDI.attach3 of $vdi on $2"
  echo "$out"
  bdev=$(echo "$out" | tr -d ' \n' | grep -o '"BlockDevice",{"path":"[^"]*"' | sed 's/.*"path":"//; s/"$//')
}

# new_attached_vdi CALL NAME: a new SR and a 16 MiB VDI in it, attached read-write on datapath
# NAME (VM vm0). Sets sr, vdi, dp, out and bdev (see attach_dp).
new_attached_vdi() {
  new_sr "$1" "$2"
  new_vdi "$1" 16777216
  attach_dp "$1" "$2" vm0 true
}

# ddstor_flow LABEL REGISTRY-DIR CONNECT-ARGS...: the core flow (Query, SR.create/attach,
# VDI.create/snapshot/clone/destroy, scan) on a fresh SR through `ddstor call CONNECT-ARGS`;
# the SR must then appear under REGISTRY-DIR/srs. Sets LAST_SR.
ddstor_flow() {
  local label=$1 reg=$2; shift 2
  local sr out vdi snap clone scan
  call() { ddstor call "$@"; }
  out=$(call "$@" Query.query) || fail "$label: Query.query"
  echo "$out" | grep -q '"name"' || fail "$label: Query.query answer: $out"
  new_sr "ddstor call $*" "xen-$label"
  new_vdi "ddstor call $*" 4194304
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
  wait_for 30 xenstore-read $reg/srs/$sr || fail "$label: SR $sr not registered under $reg/srs"
  info "$label: core flow passed on SR $sr (vdi $vdi, snapshot $snap, clone $clone destroyed)"
  LAST_SR=$sr
}


# guest_exec DOM CMD: run the shell command CMD in driver domain DOM (whose job runs
# guest_exec_loop) through xenstore (/local/domain/DOM/data/xenvm-exec); prints its output
# (last 2000 bytes) and returns its exit status (124: no answer within GX_TIMEOUT s, 120).
guest_exec() {
  local dom=$1 k base rc; shift
  k=$(($(cat /tmp/gx-seq-$dom 2>/dev/null || echo 0) + 1)); echo $k >/tmp/gx-seq-$dom
  base=/local/domain/$dom/data/xenvm-exec
  xenstore-write $base/cmd-$k "$*" || return 125
  wait_for "${GX_TIMEOUT:-120}" xenstore-read $base/rc-$k || { echo "guest_exec: domain $dom did not answer: $*"; return 124; }
  xenstore-read $base/out-$k
  rc=$(xenstore-read $base/rc-$k)
  return "$rc"
}

# guest_exec_loop (in a guest job): run the commands dom0 sends with guest_exec, in order, for
# ever. Polls its own xenstore key every half second.
guest_exec_loop() {
  local k=1 base=data/xenvm-exec cmd out rc
  while :; do
    while ! xenstore-read $base/cmd-$k >/dev/null 2>&1; do sleep 0.5; done
    cmd=$(xenstore-read $base/cmd-$k)
    out=$(sh -c "$cmd" 2>&1); rc=$?
    xenstore-write $base/out-$k "$(printf '%s' "$out" | tail -c 2000)"
    xenstore-write $base/rc-$k "$rc"
    k=$((k + 1))
  done
}

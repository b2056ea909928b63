#!/usr/bin/env bash
# Fuzz smoke run of xs-registry (a few seconds per target, scripts/lib/fuzz-smoke.sh):
#   wire             the test xenstored's wire parser (header + payload) and node operations,
#                    as dom0, a guest and an unknown domain
#   registry_record  the registry's parsing of another domain's entry (hostile values)
# Findings are kept as named regression tests in xs-registry/src (wire.rs, registry.rs).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds"/{wire,registry_record}

byte() { printf "\\$(printf '%03o' "$1")"; }
le32() { byte $(($1 & 255)); byte $((($1 >> 8) & 255)); byte $((($1 >> 16) & 255)); byte $((($1 >> 24) & 255)); }
le64() { le32 $(($1 & 0xffffffff)); le32 $((($1 >> 32) & 0xffffffff)); }
# One wire message for the `wire` target: caller selector byte, header {type, req, tx, len}, payload.
msg() { # dom-selector type tx payload(printf format)
  local p
  p=$(printf "$4" | wc -c)
  byte "$1"; le32 "$2"; le32 1; le32 "$3"; le32 "$p"; printf "$4"
}
msg 0 11 0 '/local/domain/5/data/x\0v' >"$seeds/wire/write"
msg 1 2 0 'data/x\0' >"$seeds/wire/read-relative"
{ msg 0 6 0 '\0'; msg 0 11 1 '/a/b\0v'; msg 0 7 1 'T\0'; } >"$seeds/wire/transaction"
{ msg 1 4 0 '@releaseDomain\0tok\0'; msg 2 14 0 '/a\0n5\0r9\0'; msg 2 3 0 '/a\0'; } >"$seeds/wire/watch-perms"
msg 0 1 0 '/local/domain\0' >"$seeds/wire/directory"

# registry_record: domid, now, stale_after, then 0xFF-separated values and SR names.
entry() { # now stale heartbeat
  byte 5; byte 0; le64 "$1"; le64 "$2" # domid 5 (u16), now, stale_after
  printf '1\xffready\xffddstor 0.1.0\xffcore,disk_differencing\xffddstor\xff\xfe\xff3\xff%s\xffsr-a\xffsr-b' "$3"
}
entry 1000 30 995 >"$seeds/registry_record/live"
entry 1000 30 900 >"$seeds/registry_record/stale"
entry 1000 30 99999 >"$seeds/registry_record/future"

exec "$root/scripts/lib/fuzz-smoke.sh" "$root/xs-registry/fuzz" fuzz-xs \
  "wire=$seeds/wire" "registry_record=$seeds/registry_record"

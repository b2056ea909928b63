# The real C xenstored answers: dom0's domid is published and a write reads back.
. /xenvm/lib.sh
[ "$(xenstore-read /local/domain/0/domid)" = 0 ] || fail "/local/domain/0/domid is not 0"
xenstore-write /xenvm/probe hello || fail "xenstore-write"
[ "$(xenstore-read /xenvm/probe)" = hello ] || fail "read back"
xenstore-rm /xenvm/probe
pidof xenstored >/dev/null || fail "xenstored not running"
info "xenstored pid $(pidof xenstored); /local/domain/0/name=$(xenstore-read /local/domain/0/name)"

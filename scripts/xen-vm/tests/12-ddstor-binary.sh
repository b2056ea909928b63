# The ddstor binary runs inside dom0 (its libraries are in the initramfs).
. /xenvm/lib.sh
ddstor --version || fail "ddstor --version"
ddstor --help >/dev/null || fail "ddstor --help"

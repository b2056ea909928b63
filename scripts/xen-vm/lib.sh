# Helpers for the in-VM tests (sourced; busybox sh). Each test is /xenvm/tests/NN-name.sh and
# passes when it exits 0. Lines starting with XENVM-BENCH are reported by run-tests.sh.
export PATH=/xenvm/bin:/usr/bin:/usr/sbin:/bin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu

fail() { echo "FAIL: $*"; exit 1; }
info() { echo "$*"; }

# wait_for SECONDS COMMAND...: retry COMMAND every 0.1 s until it succeeds
wait_for() {
  local n=$(($1 * 10)); shift
  while [ "$n" -gt 0 ]; do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1; n=$((n - 1))
  done
  return 1
}

# bench NAME VALUE UNIT: one measured figure
bench() { echo "XENVM-BENCH $1 $2 $3"; }

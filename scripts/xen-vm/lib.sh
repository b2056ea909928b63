# Helpers for the in-VM tests (sourced; busybox sh). Each test is /xenvm/tests/NN-name.sh and
# passes when it exits 0. Lines starting with XENVM-BENCH are reported by run-tests.sh.
export PATH=/xenvm/bin:/usr/bin:/usr/sbin:/bin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu

fail() { echo "FAIL: $*"; exit 1; }
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

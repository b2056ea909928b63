#!/usr/bin/env bash
# xenstore registry benchmark: lookup latency (p50/p99) with 100 agents x 10 SRs registered in
# ddstor's test xenstored, and READ round-trips per second through ddstor's client versus the
# same READ done by Debian's xenstore-read (one process per read, and many keys in one process:
# libxenstore's own round-trip rate), in the same run.
#   scripts/bench/xs.sh [LOOKUPS] [SECONDS] [XENSTORE_READS]     (defaults 1000 2 300)
set -euo pipefail
cd "$(dirname "$0")/../.."
lookups=${1:-1000} seconds=${2:-2} reads=${3:-300}
command -v xenstore-read >/dev/null || { echo "xs.sh: xenstore-read missing: apt-get install xenstore-utils" >&2; exit 1; }
cargo build --release -q -p ddstor --bin ddstor
cargo build --release -q -p ddstor-xs-registry --example xs_bench
dir=$(mktemp -d); trap 'kill $srv 2>/dev/null || true; rm -rf "$dir"' EXIT
sock=$dir/xs.sock
target/release/ddstor xenstored --socket "$sock" & srv=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
out=$(target/release/examples/xs_bench "$sock" "$lookups" "$seconds")
echo "$out"
ours=$(sed -n 's/^read_rtt_per_s=//p' <<<"$out")
start=$(date +%s.%N)
for _ in $(seq "$reads"); do XENSTORED_PATH=$sock xenstore-read /local/domain/0/domid >/dev/null; done
end=$(date +%s.%N)
peer=$(awk -v n="$reads" -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", n / (b - a) }')
echo "xenstore_read_per_process_per_s=$peer"
# libxenstore in one process: xenstore-read with many paths reads them one after the other.
keys=$((reads * 20))
start=$(date +%s.%N)
# (one transaction around all reads, as xenstore-read does; one READ round-trip per key)
printf '/local/domain/0/domid\n%.0s' $(seq "$keys") | XENSTORED_PATH=$sock xargs -n "$keys" xenstore-read >/dev/null
end=$(date +%s.%N)
inproc=$(awk -v n="$keys" -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", n / (b - a) }')
echo "xenstore_read_in_one_process_per_s=$inproc"
awk -v o="$ours" -v p="$peer" -v q="$inproc" 'BEGIN {
  printf "READ round-trips/s: ddstor client %s vs xenstore-read per process %s (ratio %.1fx)\n", o, p, o / p
  printf "READ round-trips/s: ddstor client %s vs libxenstore in one process %s (ratio %.2fx)\n", o, q, o / q }'

#!/usr/bin/env bash
# Transport benchmark: the Rust vchan ring against Debian's libxenvchan (C<->C) on the same
# simulated grants, small-message latency over vchan-sim and unix, pipelined RPC rate.
#   scripts/bench/transport.sh            # full run (1 GiB bulk transfers)
#   BENCH_BYTES=64M scripts/bench/transport.sh   # quick run
# Needs: gcc, libxen-dev (libxenvchan), xenstore-utils (scripts/deps/transport.apt).
set -euo pipefail
cd "$(dirname "$0")/../.."
bytes=${BENCH_BYTES:-1G}
iters=${BENCH_ITERS:-20000}

cargo build --release -q -p ddstor-transport --example vchan_tool
cargo build --release -q -p ddstor-sim-shim -p ddstor
tool=target/release/examples/vchan_tool
shim=$PWD/target/release/libddstor_xen_sim.so

work=$(mktemp -d /tmp/ddstor-bench-transport.XXXXXX)
cleanup() { [ -n "${xs_pid:-}" ] && kill "$xs_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
gcc -O2 -o "$work/vchan_peer" tests/c/vchan_peer.c -lxenvchan
mkdir "$work/sim"
target/release/ddstor xenstored --socket "$work/xs.sock" --domain 1 2>"$work/xs.log" &
xs_pid=$!
for _ in $(seq 50); do [ -S "$work/xs.sock" ] && break; sleep 0.1; done

to_bytes() { numfmt --from=iec "$1"; }
n=$(to_bytes "$bytes")

# 1. Bulk throughput, 1 MiB rings (orders 20/20), client -> server.
rust=$(XEN_SIM_DIR="$work/sim" "$tool" --backend sim bench-throughput --orders 20,20 --bytes "$bytes" | sed -n 's/.*throughput_mb_s=\([0-9.]*\).*/\1/p')
path=/local/domain/0/data/vchan/1/bench
XEN_SIM_DIR="$work/sim" XENSTORED_PATH="$work/xs.sock" LD_PRELOAD="$shim" \
  "$work/vchan_peer" server 1 "$path" 1048576 1048576 drain >"$work/srv.out" &
srv=$!
for _ in $(seq 100); do XENSTORED_PATH="$work/xs.sock.1" xenstore-read "$path/ring-ref" >/dev/null 2>&1 && break; sleep 0.05; done
XEN_SIM_DIR="$work/sim" XENSTORED_PATH="$work/xs.sock.1" LD_PRELOAD="$shim" \
  "$work/vchan_peer" client 0 "$path" blast "$n" >"$work/cli.out"
wait "$srv"
secs=$(sed -n 's/.*secs=\([0-9.]*\).*/\1/p' "$work/srv.out")
c=$(awk -v n="$n" -v s="$secs" 'BEGIN { printf "%.1f", n / s / 1e6 }')
ratio=$(awk -v a="$rust" -v b="$c" 'BEGIN { printf "%.2f", a / b }')

# 2. Latency: 64-byte round trips.
read -r vp50 vp99 < <(XEN_SIM_DIR="$work/sim" "$tool" --backend sim bench-latency --iters "$iters" --size 64 | sed 's/p50_us=\([0-9.]*\) p99_us=\([0-9.]*\)/\1 \2/')
read -r up50 up99 < <("$tool" bench-unix-latency --iters "$iters" --size 64 | sed 's/p50_us=\([0-9.]*\) p99_us=\([0-9.]*\)/\1 \2/')
XEN_SIM_DIR="$work/sim" XENSTORED_PATH="$work/xs.sock" LD_PRELOAD="$shim" \
  "$work/vchan_peer" server 1 "$path" 1024 2048 echo >"$work/srv2.out" &
srv=$!
for _ in $(seq 100); do XENSTORED_PATH="$work/xs.sock.1" xenstore-read "$path/ring-ref" >/dev/null 2>&1 && break; sleep 0.05; done
XEN_SIM_DIR="$work/sim" XENSTORED_PATH="$work/xs.sock.1" LD_PRELOAD="$shim" \
  "$work/vchan_peer" client 0 "$path" pingpong "$iters" 64 >"$work/cli2.out"
wait "$srv"
csecs=$(sed -n 's/.*secs=\([0-9.]*\).*/\1/p' "$work/cli2.out")
cavg=$(awk -v s="$csecs" -v n="$iters" 'BEGIN { printf "%.2f", s / n * 1e6 }')

# 3. Pipelined RPC (64 callers x 2000 requests, 32 in flight each).
rv=$(XEN_SIM_DIR="$work/sim" "$tool" --backend sim bench-rpc --transport vchan --clients 64 --requests 2000 | sed 's/requests_per_s=//')
ru=$("$tool" bench-rpc --transport unix --clients 64 --requests 2000 | sed 's/requests_per_s=//')

echo "== transport benchmark ($(nproc) cores, bulk $bytes, $iters round trips)"
printf '%-44s %12s %12s %8s\n' "measure" "ddstor" "peer" "ratio"
printf '%-44s %12s %12s %8s\n' "bulk MB/s, 1 MiB rings (peer: libxenvchan C<->C)" "$rust" "$c" "$ratio"
printf '%-44s %12s %12s %8s\n' "64 B round trip p50 us, vchan-sim" "$vp50" "${cavg}(avg)" "$(awk -v a="$cavg" -v b="$vp50" 'BEGIN { printf "%.2f", a / b }')"
printf '%-44s %12s %12s\n' "64 B round trip p99 us, vchan-sim" "$vp99" "-"
printf '%-44s %12s %12s\n' "64 B round trip p50/p99 us, unix" "$up50/$up99" "-"
printf '%-44s %12s %12s\n' "pipelined RPC requests/s, vchan-sim" "$rv" "-"
printf '%-44s %12s %12s\n' "pipelined RPC requests/s, unix" "$ru" "-"

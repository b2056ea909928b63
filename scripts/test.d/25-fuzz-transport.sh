#!/usr/bin/env bash
# Fuzz smoke run of the transport (a few seconds per target, scripts/lib/fuzz-smoke.sh):
#   frame_decode  the frame codec on hostile bytes
#   ring_hostile  the vchan ring with a peer scribbling on the shared page
# With AddressSanitizer (the ring touches shared memory through unsafe code), so this crate is
# built in its own target directory, apart from the uninstrumented fuzz builds.
# Findings are kept as named regression tests in transport/src (frame.rs, ring.rs).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
FUZZ_FLAGS="-O -a" exec "$root/scripts/lib/fuzz-smoke.sh" "$root/transport/fuzz" fuzz-transport \
  frame_decode ring_hostile

#!/usr/bin/env bash
# Short fuzz phase for the NBD server (nbd/fuzz, crate ddstor-nbd): request headers, and whole
# client sessions (handshake, options, transmission) against in-memory exports (over an
# in-memory stream) and against file-backed exports over a unix socket pair (the zero-copy read
# path), a few seconds each, seeded from nbd/fuzz/seeds/, through the shared runner
# scripts/lib/fuzz-smoke.sh (one instrumented build shared with the vhd and xs fuzz phases).
# Exits non-zero on any crash or hang.
# No sanitizer: the server's unsafe code on this path (nbd/src/splice.rs) is system calls on
# descriptors it owns, with bounds-checked buffers, and an uninstrumented build is much faster.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
FUZZ_ARGS="-timeout=25" exec "$root/scripts/lib/fuzz-smoke.sh" "$root/nbd/fuzz" fuzz-nbd \
  "nbd_request=$root/nbd/fuzz/seeds/nbd_request" "nbd_session=$root/nbd/fuzz/seeds/nbd_session" \
  "nbd_session_socket=$root/nbd/fuzz/seeds/nbd_session"

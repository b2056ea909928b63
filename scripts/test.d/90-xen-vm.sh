#!/usr/bin/env bash
# Real Xen 4.17 under qemu (TCG): dom0 + driver-domain tests of the xen backends.
# Fails (never skips) when the VM cannot be booted; see scripts/xen-vm/README.md.
set -uo pipefail
exec bash "$(dirname "$0")/../xen-vm/run-tests.sh"

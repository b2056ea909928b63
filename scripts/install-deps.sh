#!/usr/bin/env bash
# Installs what ddstor's tests need on a fresh Debian machine (idempotent; run as root).
#   - Debian packages listed in scripts/deps/*.apt (one per line, '#' comments), installed only
#     when missing; qemu-utils is left alone when some qemu-img (10 from backports, or 7.2) exists.
#   - cargo tools listed in scripts/deps/*.cargo ("name [version]" per line), installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

want=()
for f in scripts/deps/*.apt; do
  [ -e "$f" ] || continue
  while read -r pkg _; do
    pkg=${pkg%%#*}
    [ -n "$pkg" ] || continue
    if [ "$pkg" = qemu-utils ] && command -v qemu-img >/dev/null; then continue; fi
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || want+=("$pkg")
  done <"$f"
done
if [ ${#want[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi

for f in scripts/deps/*.cargo; do
  [ -e "$f" ] || continue
  while read -r name version _; do
    name=${name%%#*}
    [ -n "$name" ] || continue
    if ! cargo install --list | grep -q "^$name v"; then
      echo "install-deps: cargo install $name ${version:+--version $version}"
      cargo install --locked -q "$name" ${version:+--version "$version"}
    fi
  done <"$f"
done
echo "install-deps: ok"

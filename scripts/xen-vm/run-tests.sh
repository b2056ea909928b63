#!/usr/bin/env bash
# Real Xen in CI: boot Debian's Xen 4.17 + a Linux 6.1 PV dom0 under qemu (TCG), run ddstor's
# in-VM tests inside dom0 (and a PV driver domain started from it), and bring the results back
# from the serial console.
#
#   scripts/xen-vm/run-tests.sh            fetch (cached) + build + assemble + boot + report
#
# Exits 0 only when every in-VM test passed; the last line is always `xen: N passed, M failed`.
# It never skips: no qemu-system, no packages, no boot => non-zero with the reason.
#
# Environment:
#   XENVM_TIMEOUT   seconds for the whole qemu run (default 1500)
#   XENVM_ONLY      run only the in-VM tests whose file name matches this extended regex
#   XENVM_PROFILE   debug (default: the binaries scripts/test.sh already built) or release
#   XENVM_NO_BUILD  =1: use the existing binaries of that profile as they are
#   XENVM_TEST_TIMEOUT  seconds each in-VM test may take (default 480)
#   XENVM_CLOSE_ITERS   iterations of the close-detection cases (default 3)
#   XENVM_WIP       =1: also run tests/wip/*.sh (not yet reliable; not run in CI)
#   XENVM_SHELL     =1: after the tests, drop to a shell on the console instead of powering off
#   XENVM_KERNEL    the linux-image package to boot (default: what linux-image-amd64 depends on,
#                   or the one already in the cache)
# Layout: scripts/xen-vm/cache/ (downloaded .debs and their extracted tree, kept between runs)
#         scripts/xen-vm/work/  (initramfs trees, images, serial log of the last run)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=$HERE/cache
WORK=$HERE/work
DEBS=$CACHE/debs
XROOT=$CACHE/root          # every .deb extracted here (dpkg -x), never installed
LOG=$WORK/serial.log
T0=$SECONDS

say() { echo "xen-vm: $*" >&2; }
die() { # reason...: fail loudly, with the mandatory last line
  say "FAILED: $*"
  echo "xen: 0 passed, 1 failed"
  exit 1
}

# ---------------------------------------------------------------------------------------------
# 1. Packages: apt-get download into the cache, dpkg -x into $XROOT.
# ---------------------------------------------------------------------------------------------
PKGS=(xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils
  libxenmisc4.17 libxenstore4 libxencall1 libxenevtchn1
  libxengnttab1 libxenforeignmemory1 libxendevicemodel1 libxentoolcore1 libxentoollog1
  libxenhypfs1 libyajl2 busybox-static qemu-system-x86 qemu-system-common qemu-system-data seabios
  nbd-client)

kernel_pkg() {
  if [ -n "${XENVM_KERNEL:-}" ]; then echo "$XENVM_KERNEL"; return; fi
  local cached
  cached=$(ls "$DEBS"/linux-image-6.1.*-amd64_*.deb 2>/dev/null | head -1)
  if [ -n "$cached" ]; then basename "$cached" | cut -d_ -f1; return; fi
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6\.1/ {print $2; exit}'
}

fetch() {
  mkdir -p "$DEBS" "$XROOT"
  local kpkg; kpkg=$(kernel_pkg)
  [ -n "$kpkg" ] || die "cannot tell which linux-image-6.1 package to boot (apt-get update? or set XENVM_KERNEL)"
  local want=() p
  for p in "${PKGS[@]}" "$kpkg"; do
    ls "$DEBS/${p}"_*.deb >/dev/null 2>&1 || want+=("$p")
  done
  if [ ${#want[@]} -gt 0 ]; then
    say "apt-get download ${want[*]}"
    (cd "$DEBS" && apt-get download -q "${want[@]}" 2>&1 | grep -v 'unsandboxed as root') \
      || die "apt-get download failed for: ${want[*]} (network? apt-get update?)"
    for p in "${want[@]}"; do
      ls "$DEBS/${p}"_*.deb >/dev/null 2>&1 || die "package $p was not downloaded"
    done
  fi
  local d
  for d in "$DEBS"/*.deb; do
    [ -e "$XROOT/.x-$(basename "$d")" ] && continue
    case $(basename "$d") in
      linux-image-*)  # only the kernel and the Xen modules: the full tree is 400 MB
        local tmp; tmp=$(mktemp -d "$CACHE/k.XXXXXX")
        dpkg-deb --fsys-tarfile "$d" | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*' \
          './lib/modules/*/kernel/drivers/xen/*' './lib/modules/*/kernel/drivers/block/*' \
          || die "cannot extract $d"
        cp -a "$tmp"/. "$XROOT"/ && rm -rf "$tmp" ;;
      *) dpkg -x "$d" "$XROOT" || die "cannot extract $d" ;;
    esac
    touch "$XROOT/.x-$(basename "$d")"
  done
  KVER=$(basename "$(ls -d "$XROOT"/lib/modules/6.1.*-amd64 | sort -V | tail -1)")
  VMLINUZ=$XROOT/boot/vmlinuz-$KVER
  [ -f "$VMLINUZ" ] || die "no kernel image $VMLINUZ in the cache"
  [ -f "$XROOT/boot/xen-4.17-amd64.gz" ] || die "no Xen hypervisor in the cache"
  QEMU=$XROOT/usr/bin/qemu-system-x86_64
  [ -x "$QEMU" ] || die "no qemu-system-x86_64 in the cache"
  local missing
  missing=$(ldd "$QEMU" | awk '/not found/ {print $1}' | tr '\n' ' ')
  [ -z "$missing" ] || die "qemu-system-x86_64 lacks libraries: $missing (run scripts/install-deps.sh: scripts/deps/xenvm.apt lists them)"
}

# ---------------------------------------------------------------------------------------------
# 2. Binaries under test: ddstor (release) and the small C drivers of libxenvchan.
# ---------------------------------------------------------------------------------------------
build() {
  # Debug by default: scripts/test.sh has already built every workspace binary in debug, so CI
  # pays no second (release) build; XENVM_PROFILE=release for figures worth comparing.
  local profile=${XENVM_PROFILE:-debug} flag=""
  case $profile in
    debug) ;;
    release) flag=--release ;;
    *) die "XENVM_PROFILE=$profile: use debug or release" ;;
  esac
  if [ "${XENVM_NO_BUILD:-}" != 1 ]; then
    say "cargo build $flag -p ddstor -p ddstor-xenvm"
    (cd "$ROOT" && cargo build $flag --locked -q -p ddstor -p ddstor-xenvm) \
      || die "cargo build $flag -p ddstor -p ddstor-xenvm failed"
  fi
  DDSTOR=$ROOT/target/$profile/ddstor
  XVCHAN=$ROOT/target/$profile/xenvm-vchan
  [ -x "$DDSTOR" ] || die "no $DDSTOR"
  [ -x "$XVCHAN" ] || die "no $XVCHAN"
  say "binaries under test: $profile ($DDSTOR)"
  mkdir -p "$WORK/cbin"
  local c
  for c in "$HERE"/c/*.c; do
    [ -e "$c" ] || continue
    local out=$WORK/cbin/$(basename "$c" .c)
    if [ ! -x "$out" ] || [ "$c" -nt "$out" ]; then
      gcc -O2 -Wall -Werror -o "$out" "$c" -lxenvchan -lxenevtchn \
        || die "cannot build $c (needs gcc and libxen-dev: scripts/install-deps.sh)"
    fi
  done
}

# ---------------------------------------------------------------------------------------------
# 3. dom0's initramfs (and the driver domain's, built from the same parts).
# ---------------------------------------------------------------------------------------------
# copy_bin SRC DEST_IN_TREE TREE: the file plus every shared library it needs (resolved against
# the extracted Xen libraries first, then the host's).
copy_bin() {
  local src=$1 dst=$2 tree=$3
  mkdir -p "$tree/$(dirname "$dst")"
  cp -L "$src" "$tree/$dst"
  # debug info is most of a Rust binary and the VM unpacks every byte under TCG
  case $dst in */ddstor|*/xenvm-vchan) strip --strip-debug "$tree/$dst" || die "strip $dst" ;; esac
  local lib
  for lib in $(LD_LIBRARY_PATH=$XROOT/usr/lib/x86_64-linux-gnu:$XROOT/usr/lib ldd "$src" 2>/dev/null |
    awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}'); do
    case $lib in
      /lib64/*) mkdir -p "$tree/lib64"; [ -e "$tree$lib" ] || cp -L "$lib" "$tree$lib" ;;
      *) [ -e "$tree/lib/x86_64-linux-gnu/$(basename "$lib")" ] || cp -L "$lib" "$tree/lib/x86_64-linux-gnu/" ;;
    esac
  done
}

base_tree() { # TREE: busybox, libraries, modules, Xen tools, ddstor, tests
  local tree=$1
  rm -rf "$tree"
  mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib/modules,etc,proc,sys,dev,run,tmp,var/lib,var/log,root,xenvm/tests,xenvm/bin}
  cp "$XROOT/bin/busybox" "$tree/bin/busybox"
  local a
  for a in $("$XROOT/bin/busybox" --list-full); do
    [ -e "$tree/$a" ] || ln -s /bin/busybox "$tree/$a"
  done
  local m
  for m in xen-evtchn xen-gntalloc xen-gntdev xen-privcmd xenfs/xenfs xen-blkback/xen-blkback xen-blkfront loop nbd; do
    local f; f=$(ls "$XROOT/lib/modules/$KVER/kernel/drivers/xen/$m.ko"* \
      "$XROOT/lib/modules/$KVER/kernel/drivers/block/$m.ko"* 2>/dev/null | head -1)
    [ -n "$f" ] || die "kernel module $m not found in $KVER"
    case $f in
      *.xz) xz -dc "$f" >"$tree/lib/modules/$(basename "$m").ko" ;;
      *.zst) zstd -qdc "$f" >"$tree/lib/modules/$(basename "$m").ko" ;;
      *) cp "$f" "$tree/lib/modules/$(basename "$m").ko" ;;
    esac
  done
  local t
  for t in xenstored xen-init-dom0 xl xenconsoled; do
    copy_bin "$XROOT/usr/lib/xen-4.17/bin/$t" "/usr/sbin/$t" "$tree"
  done
  copy_bin "$XROOT/usr/bin/xenstore" /usr/bin/xenstore "$tree"
  for t in read write ls rm list exists chmod watch; do ln -sf xenstore "$tree/usr/bin/xenstore-$t"; done
  # xl wants its config dir and the libxl helper next to it
  copy_bin "$XROOT/usr/lib/xen-4.17/bin/libxl-save-helper" /usr/lib/xen-4.17/bin/libxl-save-helper "$tree"
  mkdir -p "$tree/etc/xen"; [ -f "$XROOT/etc/xen/xl.conf" ] && cp "$XROOT/etc/xen/xl.conf" "$tree/etc/xen/"
  copy_bin "$DDSTOR" /usr/bin/ddstor "$tree"
  copy_bin "$XVCHAN" /xenvm/bin/xenvm-vchan "$tree"
  ln -s /run "$tree/var/run"
  for t in "$WORK"/cbin/*; do [ -e "$t" ] && copy_bin "$t" "/xenvm/bin/$(basename "$t")" "$tree"; done
  cp "$HERE"/lib.sh "$tree/xenvm/lib.sh"
  echo "root:x:0:0:root:/root:/bin/sh" >"$tree/etc/passwd"
  echo "root:x:0:" >"$tree/etc/group"
}

mkcpio() { # TREE OUT
  (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1 >"$2") || die "cannot pack $1"
}

assemble() {
  mkdir -p "$WORK"
  gzip -dc "$XROOT/boot/xen-4.17-amd64.gz" >"$WORK/xen" || die "cannot gunzip the hypervisor"
  # the driver domain: same kernel, its own initramfs (ddstor serve + guest init)
  local g=$WORK/guest-initrd
  base_tree "$g"
  cp "$HERE/init-guest.sh" "$g/init"; chmod +x "$g/init"
  mkdir -p "$g/xenvm/guest.d"
  for t in "$HERE"/guest.d/*; do [ -e "$t" ] && cp "$t" "$g/xenvm/guest.d/" && chmod +x "$g/xenvm/guest.d/$(basename "$t")"; done
  # the driver domain connects /dev/nbdN to its agent's NBD exports (busybox has no nbd-client)
  copy_bin "$XROOT/sbin/nbd-client" /sbin/nbd-client "$g"
  mkcpio "$g" "$WORK/guest.img"
  # dom0
  local d=$WORK/dom0-initrd
  base_tree "$d"
  cp "$HERE/init-dom0.sh" "$d/init"; chmod +x "$d/init"
  local t
  local extra=""
  [ "${XENVM_WIP:-}" = 1 ] && extra="$HERE/tests/wip/*.sh"
  for t in "$HERE"/tests/*.sh $extra; do
    [ -e "$t" ] || continue
    if [ -n "${XENVM_ONLY:-}" ] && ! basename "$t" | grep -qE "$XENVM_ONLY"; then continue; fi
    cp "$t" "$d/xenvm/tests/"
  done
  mkdir -p "$d/xenvm/guest"
  cp "$VMLINUZ" "$d/xenvm/guest/vmlinuz"
  cp "$WORK/guest.img" "$d/xenvm/guest/initrd.img"
  [ "${XENVM_SHELL:-}" = 1 ] && touch "$d/xenvm/shell"
  # the host's XENVM_* settings reach the tests through /xenvm/env (sourced by lib.sh)
  export -p | grep -E '^declare -x XENVM_[A-Z0-9_]+=' | sed 's/^declare -x /export /' >"$d/xenvm/env"
  mkcpio "$d" "$WORK/dom0.img"
  say "initramfs: dom0 $(du -h "$WORK/dom0.img" | cut -f1), guest $(du -h "$WORK/guest.img" | cut -f1)"
}

# ---------------------------------------------------------------------------------------------
# 4. Boot and collect.
# ---------------------------------------------------------------------------------------------
boot() {
  say "booting Xen 4.17 + dom0 ($KVER) under qemu TCG (timeout ${XENVM_TIMEOUT:-1500} s)"
  local stdin=/dev/null
  [ "${XENVM_SHELL:-}" = 1 ] && stdin=/dev/stdin
  local tb=$SECONDS
  QEMU_MODULE_DIR=$XROOT/usr/lib/x86_64-linux-gnu/qemu \
    timeout --foreground "${XENVM_TIMEOUT:-1500}" "$QEMU" -L "$XROOT/usr/share/qemu" -L "$XROOT/usr/share/seabios" \
    -accel tcg -cpu "${XENVM_CPU:-max,xsave=off}" -m 3072 -smp "${XENVM_SMP:-1}" -nographic -no-reboot -vga none -nic none \
    -kernel "$WORK/xen" \
    -append "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M loglvl=warning guest_loglvl=warning smap=0 ${XENVM_XEN_ARGS:-}" \
    -initrd "$VMLINUZ console=hvc0 loglevel=4,$WORK/dom0.img" \
    <"$stdin" 2>&1 | stdbuf -oL tr -d '\r' | tee "$LOG" | grep --line-buffered -a -E '^XENVM|^xenvm' >&2
  local rc=${PIPESTATUS[0]}
  say "qemu exited rc=$rc after $((SECONDS - tb)) s"
  QEMU_RC=$rc
}

report() {
  local passed failed
  passed=$(grep -a -c '^XENVM-RESULT PASS ' "$LOG")
  failed=$(grep -a -c '^XENVM-RESULT FAIL ' "$LOG")
  if ! grep -aq '^XENVM-DONE' "$LOG"; then
    say "the VM did not finish its tests (qemu rc=$QEMU_RC); last 60 lines of $LOG:"
    tail -n 60 "$LOG" >&2
    failed=$((failed + 1))
    echo "xen: $passed passed, $failed failed"
    exit 1
  fi
  if [ "$failed" -gt 0 ]; then
    say "failed in-VM tests:"; grep -a '^XENVM-RESULT FAIL ' "$LOG" >&2
    say "(full serial log: $LOG)"
  fi
  if [ "$passed" -eq 0 ]; then
    say "no test ran inside the VM"; failed=$((failed + 1))
  fi
  grep -a '^XENVM-BENCH' "$LOG" | sed 's/^XENVM-BENCH /xen-vm bench: /' >&2
  say "total $((SECONDS - T0)) s"
  echo "xen: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}

main() {
  command -v apt-get >/dev/null || die "apt-get not found: this runs on Debian (bookworm) only"
  command -v cpio >/dev/null || die "cpio not found (scripts/install-deps.sh installs it)"
  fetch
  build
  assemble
  boot
  report
}
# one line, parsed whole before it runs: editing this file during a run cannot derail it
main "$@"; exit $?

#!/usr/bin/env bash
# Build a tiny Linux guest for simvirt interop tests.
#
#   tools/build-guest.sh [-f] [OUTDIR]
#
# OUTDIR defaults to ${SIMVIRT_GUEST_DIR:-$HOME/.cache/simvirt/guest}.
# Outputs:
#   OUTDIR/vmlinuz         Debian bookworm 6.1 kernel (linux-image-amd64)
#   OUTDIR/initrd.gz       gzip'd newc cpio: busybox-static + virtio modules + /init
#   OUTDIR/kernel-version  the kernel release the modules belong to
#   OUTDIR/modules.order   the order /init loads the modules in
#
# /init mounts proc/sys/devtmpfs, loads the virtio modules in dependency order,
# runs /test.sh if present (console output), prints
#   SIMVIRT-GUEST-EXIT <rc>
# and powers off.  Boot QEMU with -no-reboot and "panic=-1" so QEMU exits
# even if init dies.  Extra files (e.g. /test.sh) can be supplied by
# appending a second cpio archive to initrd.gz (see tests/interop/linux_guest.py).
#
# Idempotent: does nothing if the outputs exist (use -f or FORCE=1 to rebuild).
# When run as root, missing host tools are installed with apt-get.
set -euo pipefail

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { printf 'build-guest: ERROR: %s\n' "$*" >&2; exit 1; }

FORCE="${FORCE:-0}"
if [[ "${1:-}" == "-f" || "${1:-}" == "--force" ]]; then FORCE=1; shift; fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0
fi
OUTDIR="${1:-${SIMVIRT_GUEST_DIR:-$HOME/.cache/simvirt/guest}}"

# Root modules we want; their dependencies are resolved from the modules'
# own .modinfo "depends=" field (the Debian package ships no modules.dep).
WANT_MODULES=(virtio_pci virtio_blk virtio_net)
KERNEL_META=linux-image-amd64

if [[ "$FORCE" != 1 && -s "$OUTDIR/vmlinuz" && -s "$OUTDIR/initrd.gz" ]]; then
    log "guest already built in $OUTDIR (kernel $(cat "$OUTDIR/kernel-version" 2>/dev/null || echo '?')); use -f to rebuild"
    exit 0
fi

# ---------------------------------------------------------------- host tools
command -v apt-get >/dev/null || die "apt-get not found: this script expects a Debian/Ubuntu host"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
APT_UPDATED=0
apt_update_once() {
    ((APT_UPDATED)) && return 0
    log "running apt-get update"
    apt-get update -q >&2 || die "apt-get update failed"
    APT_UPDATED=1
}
need_pkgs=()
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v gzip >/dev/null || need_pkgs+=(gzip)
command -v xz >/dev/null || need_pkgs+=(xz-utils)
if ((${#need_pkgs[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        log "installing missing packages: ${need_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt_update_once
        apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >&2 \
            || die "apt-get install ${need_pkgs[*]} failed"
    else
        die "missing packages: ${need_pkgs[*]} (run as root or: sudo apt-get install ${need_pkgs[*]})"
    fi
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/simvirt-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "work dir $WORK"
mkdir -p "$WORK/dl"
# apt drops privileges to _apt for downloads; let it write there (avoids a warning).
[[ $(id -u) -eq 0 ]] && chmod 0755 "$WORK" && chmod 0777 "$WORK/dl"

# apt_download PKG -> path of the downloaded .deb (retries once after apt-get update as root)
apt_download() {
    local pkg=$1 deb
    if ! (cd "$WORK/dl" && apt-get download -q "$pkg" >&2); then
        [[ $(id -u) -eq 0 && $APT_UPDATED == 0 ]] || die "apt-get download $pkg failed"
        apt_update_once
        (cd "$WORK/dl" && apt-get download -q "$pkg" >&2) || die "apt-get download $pkg failed"
    fi
    deb=$(ls "$WORK"/dl/"${pkg}"_*.deb 2>/dev/null | head -n1)
    [[ -f "$deb" ]] || die "downloaded .deb for $pkg not found in $WORK/dl"
    printf '%s\n' "$deb"
}

# The guest needs a *static* busybox.  Use the host's busybox-static if it is
# installed; otherwise take the binary out of the busybox-static .deb (this
# leaves the host alone: busybox-static conflicts with the dynamic busybox).
if dpkg -s busybox-static >/dev/null 2>&1 && [[ -x /bin/busybox ]]; then
    BUSYBOX=/bin/busybox
    log "busybox: host busybox-static ($BUSYBOX)"
else
    log "busybox-static not installed on the host; downloading it"
    bbdeb=$(apt_download busybox-static)
    dpkg-deb -x "$bbdeb" "$WORK/bb" || die "dpkg-deb -x $bbdeb failed"
    BUSYBOX="$WORK/bb/bin/busybox"
    [[ -x "$BUSYBOX" ]] || die "no bin/busybox in $bbdeb"
fi
if file_out=$(LC_ALL=C file -L "$BUSYBOX" 2>/dev/null); then
    [[ "$file_out" == *"statically linked"* || "$file_out" == *"static-pie"* ]] \
        || die "$BUSYBOX is not statically linked ($file_out)"
fi

# ---------------------------------------------------------------- kernel
kpkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null \
       | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
if [[ -z "$kpkg" ]]; then
    if [[ $(id -u) -eq 0 ]]; then
        log "apt lists do not know $KERNEL_META"
        apt_update_once
        kpkg=$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [[ -n "$kpkg" ]] || die "cannot resolve $KERNEL_META to a kernel package (apt-cache depends $KERNEL_META)"
fi
log "kernel package: $kpkg"
deb=$(apt_download "$kpkg")
log "extracting $(basename "$deb")"
dpkg-deb -x "$deb" "$WORK/kpkg" || die "dpkg-deb -x failed"

vmlinuz=$(ls "$WORK"/kpkg/boot/vmlinuz-* 2>/dev/null | head -n1)
[[ -f "$vmlinuz" ]] || die "no /boot/vmlinuz-* in $kpkg"
krel=${vmlinuz##*/vmlinuz-}
moddir=""
for d in "$WORK/kpkg/lib/modules/$krel" "$WORK/kpkg/usr/lib/modules/$krel"; do
    [[ -d "$d" ]] && moddir=$d && break
done
[[ -n "$moddir" ]] || die "no lib/modules/$krel in $kpkg"
log "kernel release: $krel"

# Find a module file by name (modules may be .ko, .ko.xz, .ko.zst, .ko.gz).
declare -A MODPATH=()
while IFS= read -r -d '' f; do
    b=${f##*/}; b=${b%%.ko*}
    MODPATH[$b]=$f
    MODPATH[${b//-/_}]=$f
done < <(find "$moddir/kernel" -name '*.ko*' -print0)

builtin_list="$moddir/modules.builtin"
is_builtin() { [[ -f "$builtin_list" ]] && grep -Eq "/${1//_/[-_]}\.ko\$" "$builtin_list"; }

# Decompress module $1 into $2 (plain .ko).
decompress_mod() {
    case "$1" in
        *.ko)     cp "$1" "$2" ;;
        *.ko.xz)  xz -dc "$1" >"$2" ;;
        *.ko.zst) command -v zstd >/dev/null || die "zstd needed for $1 (apt-get install zstd)"
                  zstd -qdc "$1" >"$2" ;;
        *.ko.gz)  gzip -dc "$1" >"$2" ;;
        *) die "unknown module compression: $1" ;;
    esac
}

mod_depends() {  # print the modules listed in .modinfo depends= of module $1
    local tmp="$WORK/dep.ko"
    decompress_mod "${MODPATH[$1]}" "$tmp"
    tr '\0' '\n' <"$tmp" | sed -n 's/^depends=//p' | head -n1 | tr ',' '\n' | sed '/^$/d'
}

# Depth-first topological sort: dependencies before dependents.
ORDER=()
declare -A STATE=()   # 1 = visiting, 2 = done
visit() {
    local m=${1//-/_}
    [[ "${STATE[$m]:-}" == 2 ]] && return 0
    [[ "${STATE[$m]:-}" == 1 ]] && die "module dependency cycle at $m"
    if [[ -z "${MODPATH[$m]:-}" ]]; then
        is_builtin "$m" && { log "module $m is built in"; STATE[$m]=2; return 0; }
        die "module $m not found in $kpkg"
    fi
    STATE[$m]=1
    local d
    for d in $(mod_depends "$m"); do visit "$d"; done
    STATE[$m]=2
    ORDER+=("$m")
}
for m in "${WANT_MODULES[@]}"; do visit "$m"; done
log "module load order: ${ORDER[*]}"

# ---------------------------------------------------------------- initramfs
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,etc,root,lib/modules}
cp "$BUSYBOX" "$R/bin/busybox"
chmod 0755 "$R/bin/busybox"
napplets=0
for applet in $("$BUSYBOX" --list-full); do
    [[ "$applet" == bin/busybox ]] && continue
    mkdir -p "$R/$(dirname "$applet")"
    [[ -e "$R/$applet" ]] || { ln -s /bin/busybox "$R/$applet"; napplets=$((napplets + 1)); }
done
log "busybox: $("$BUSYBOX" | head -n1) with $napplets applet links"

for m in "${ORDER[@]}"; do
    decompress_mod "${MODPATH[$m]}" "$R/lib/modules/$m.ko"
done
printf '%s\n' "${ORDER[@]}" >"$R/lib/modules/order"

if [[ $(id -u) -eq 0 ]]; then
    mknod -m 600 "$R/dev/console" c 5 1
    mknod -m 666 "$R/dev/null" c 1 3
else
    log "not root: no /dev/console node in the archive (/init reopens it from devtmpfs)"
fi

cat >"$R/init" <<'EOF'
#!/bin/sh
# simvirt guest init: modules, /test.sh, exit marker, poweroff.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
echo 0 >/proc/sys/kernel/printk_ratelimit 2>/dev/null

echo "simvirt-guest: kernel $(uname -r), $(nproc) cpu(s)"
modfail=0
for m in $(cat /lib/modules/order); do
    if ! insmod "/lib/modules/$m.ko"; then
        echo "simvirt-guest: insmod $m FAILED"
        modfail=1
    fi
done
echo "simvirt-guest: modules loaded: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"

rc=0
if [ "$modfail" != 0 ]; then
    rc=125
elif [ -f /test.sh ]; then
    echo "simvirt-guest: running /test.sh"
    sh /test.sh
    rc=$?
else
    echo "simvirt-guest: no /test.sh"
fi
sync
echo
echo "SIMVIRT-GUEST-EXIT $rc"
poweroff -f
# poweroff should not return; if it does, dying as PID 1 panics and with
# panic=-1 + QEMU -no-reboot that still ends the VM.
sleep 2
exit "$rc"
EOF
chmod 0755 "$R/init"

mkdir -p "$OUTDIR"
log "writing $OUTDIR/initrd.gz"
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio --quiet -o -H newc -R 0:0 | gzip -9n) >"$OUTDIR/initrd.gz.tmp" \
    || die "cpio/gzip failed"
cp "$vmlinuz" "$OUTDIR/vmlinuz.tmp"
printf '%s\n' "${ORDER[@]}" >"$OUTDIR/modules.order"
printf '%s\n' "$krel" >"$OUTDIR/kernel-version"
printf '%s\n' "$kpkg" >"$OUTDIR/kernel-package"
mv -f "$OUTDIR/initrd.gz.tmp" "$OUTDIR/initrd.gz"
mv -f "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinuz"
log "done: $OUTDIR/vmlinuz ($(du -h "$OUTDIR/vmlinuz" | cut -f1)), $OUTDIR/initrd.gz ($(du -h "$OUTDIR/initrd.gz" | cut -f1))"

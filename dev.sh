#!/usr/bin/env bash
# simvirt's two entry points for a new machine:
#   ./dev.sh run [simvirt run args]   run the default scenario (or ./dev.sh run SCENARIO-or-CONFIG)
#   ./dev.sh test [pytest args]       install everything and run the whole test suite
# Each creates what it needs: a virtualenv in .venv with simvirt installed,
# and (test, as root) the Debian packages of the interop peers and the guest image.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SIMVIRT_VENV:-$PWD/.venv}
PEERS=(qemu-system-x86 qemu-system-common qemu-utils busybox-static cpio xz-utils zstd kmod docker-compose
       dpdk dpdk-dev prometheus iproute2 tcpdump procps ca-certificates)

say() { printf '==> %s\n' "$*" >&2; }

apt_install() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        say "missing Debian packages (run as root to install): ${missing[*]}"
        return 1
    fi
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtualenv $VENV"
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.simvirt-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        say "pip install -e .[test]"
        "$VENV/bin/pip" install -q --upgrade pip >/dev/null
        "$VENV/bin/pip" install -q -e '.[test]'
        touch "$stamp"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    run)
        ensure_venv
        exec "$VENV/bin/simvirt" run "$@"
        ;;
    test)
        ensure_venv
        if [ "$(id -u)" = 0 ]; then
            apt_install "${PEERS[@]}"
        elif [ "${CI:-}" = true ]; then
            say "CI=true but not root: cannot install interop peers"; exit 1
        fi
        bash tools/build-guest.sh
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./dev.sh run [CONFIG] [options] | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac

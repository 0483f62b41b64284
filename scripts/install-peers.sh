#!/usr/bin/env bash
# install-peers.sh - install the Debian packages that provide shadowvmm's real test peers.
#
#   qemu-system-common  qemu-storage-daemon (QEMU 7.2) and /usr/lib/qemu/virtiofsd (gone in QEMU >= 8)
#   qemu-utils          qemu-img
#   dpdk-dev            dpdk-testpmd (it is NOT in package "dpdk")
#   iproute2            ip netns
#   qemu-system-x86     the vDPA VM lane (TCG) boots a Debian kernel with vdpa_sim
#
# Idempotent: when everything is installed it only runs dpkg-query and exits (well under 1 s).
# Otherwise, as root: apt-get update once, then install only the missing packages.
# Missing binaries after that are reported as warnings; the tests decide (skip, or fail when CI=true).
set -euo pipefail

packages=(qemu-system-common qemu-utils dpdk-dev iproute2 qemu-system-x86)
# "binary package": what the tests run, and the package that ships it on Debian bookworm
binaries=(
    "qemu-storage-daemon qemu-system-common"
    "/usr/lib/qemu/virtiofsd qemu-system-common"
    "qemu-img qemu-utils"
    "dpdk-testpmd dpdk-dev"
    "stdbuf coreutils"
    "ip iproute2"
    "qemu-system-x86_64 qemu-system-x86"
)

installed() { # prints the installed ones among "$@"
    { dpkg-query -W -f='${db:Status-Status} ${Package}\n' "$@" 2>/dev/null || true; } | awk '$1 == "installed" { print $2 }'
}

missing=()
have=" $(installed "${packages[@]}" | tr '\n' ' ') "
for p in "${packages[@]}"; do
    [[ $have == *" $p "* ]] || missing+=("$p")
done

if ((${#missing[@]})); then
    if [[ $(id -u) != 0 ]]; then
        echo "install-peers: missing ${missing[*]}; run as root to install them" >&2
        exit 1
    fi
    command -v apt-get >/dev/null || { echo "install-peers: no apt-get (not Debian?); install ${missing[*]} by hand" >&2; exit 1; }
    echo "install-peers: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

absent=()
for entry in "${binaries[@]}"; do
    read -r bin pkg <<<"$entry"
    PATH=$PATH:/usr/sbin:/sbin command -v "$bin" >/dev/null || absent+=("$bin ($pkg)")
done
if ((${#absent[@]})); then
    printf 'install-peers: warning: missing after install: %s\n' "${absent[@]}" >&2
fi
if ((${#missing[@]})); then
    dpkg-query -W -f='install-peers: ${Package} ${Version}\n' "${packages[@]}" || true
fi
exit 0

#!/usr/bin/env bash
# Installs what specc needs on a fresh Debian 12 host, and nothing that is already there.
# Idempotent: reruns cost one dpkg query.
set -euo pipefail

packages=(
    qemu-system-x86      # the rig: emulated KVM host (QEMU TCG, -cpu max)
    linux-source-6.1     # guest and rig kernels are built from it
    busybox-static       # base "busybox"
    debootstrap          # base "debian"
    e2fsprogs            # mkfs.ext4 -d: rootfs images without loop mounts
    passt                # user-mode guest networking
    docker-registry      # registry tests on loopback
    build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils kmod
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "specc: missing Debian packages: ${missing[*]}" >&2
        echo "specc: install them with: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "specc: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# docker-registry's package starts a system service on :5000; the test suite runs its own
# registry on a free loopback port, so the packaged one is not needed.
if command -v systemctl >/dev/null && systemctl is-active -q docker-registry 2>/dev/null; then
    systemctl stop docker-registry || true
fi

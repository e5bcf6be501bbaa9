#!/usr/bin/env bash
# Install every system package fledge's build, tests, VM tests and benchmarks use.
# Debian 12 (bookworm). Runs `apt-get update` once, then one `apt-get install`.
set -euo pipefail
. "$(dirname "$0")/lib/need-root.sh"
need_root "it installs Debian packages"
packages=(
    # building fledge (loopdev-3 generates bindings with libclang; the default `isal` feature
    # builds Intel's ISA-L inflate, which needs nasm and autotools)
    build-essential pkg-config libclang-dev nasm autoconf automake libtool
    # FUSE (rootless mounts go through the setuid fusermount3)
    fuse3
    # formatters and checkers
    e2fsprogs xfsprogs btrfs-progs
    # test images and oracles
    debootstrap umoci skopeo attr libcap2-bin python3
    # oracles of fledge's own squashfs and EROFS writers (never needed at run time)
    squashfs-tools erofs-utils
    # oracle of the qcow2 output (qemu-img check/compare/convert; never needed at run time)
    qemu-utils
    # image sources tests: a local registry (with htpasswd auth and TLS) and a Docker-API daemon
    docker-registry apache2-utils podman openssl
    # the unprivileged-container test (tests/container.rs): rootless podman needs
    # newuidmap/newgidmap; crun refuses this host's hybrid cgroups, runc does not
    runc uidmap
    # VM tests (vm-tests/run; the squashfs and erofs cases extend the initrd with
    # unmkinitramfs, depmod and cpio)
    qemu-system-x86 linux-image-amd64 initramfs-tools-core kmod cpio
    # benchmarks
    hyperfine time bc zstd
    # the `big` benchmark: its generator compresses with pigz; the floor also decodes with pigz
    # and ISA-L's igzip (package isal)
    pigz isal
)
# Some machines come with qemu-utils from bookworm-backports. Bookworm's qemu-system-x86 breaks
# that newer qemu-utils, so apt refuses to install both: take qemu-utils from bookworm too (its
# qemu-img is only a test oracle here, and fledge never runs it).
apt_opts=()
qemu_utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if [[ $qemu_utils == *bpo* ]]; then
    for i in "${!packages[@]}"; do
        [[ ${packages[$i]} == qemu-utils ]] && packages[$i]=qemu-utils/bookworm
    done
    apt_opts+=(--allow-downgrades)
    echo "install-deps: qemu-utils $qemu_utils (backports) is replaced by bookworm's, which qemu-system-x86 needs"
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${apt_opts[@]}" "${packages[@]}" >/dev/null
echo "install-deps: ok (${#packages[@]} packages)"

#!/usr/bin/env bash
# From a fresh Debian 12 machine to a bootable ext4 image: installs the system packages,
# builds fledge, builds the Debian test image (debootstrap + umoci, cached in
# /var/tmp/fledge-test-images), and runs `fledge build` on it.
#   scripts/demo.sh [ext4|xfs|btrfs]
# Run as root (sudo where you have it). Output: ./demo/debian.img and ./demo/debian.manifest.json
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/need-root.sh
need_root "it installs packages and builds with loop devices"
fs="${1:-ext4}"
scripts/install-deps.sh
cargo build --release --quiet
scripts/make-test-images.sh
mkdir -p demo
cat > demo/fledge.toml <<TOML
version = "1"
strategy = "oci_rootfs"

[source]
image = "oci:${FLEDGE_TEST_IMAGES:-/var/tmp/fledge-test-images}/debian:test"

[filesystem]
type = "$fs"
size_buffer_mb = 100
preallocate = false
TOML
./target/release/fledge build -v -c demo/fledge.toml -o demo/debian.img
echo
echo "demo.sh: done. Look inside (as root): mount -o loop,ro demo/debian.img /mnt && ls /mnt"

#!/usr/bin/env bash
# Prepare this host for fledge's rootless tests: an unprivileged user `fledge-test`,
# /dev/fuse usable by it, and `user_allow_other` so root can inspect that user's FUSE mounts.
# Idempotent. Root only.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-test-host: run as root" >&2
    exit 1
fi
id fledge-test >/dev/null 2>&1 || useradd --system --create-home --shell /bin/bash fledge-test
chmod 0666 /dev/fuse
grep -qx 'user_allow_other' /etc/fuse.conf 2>/dev/null || echo 'user_allow_other' >> /etc/fuse.conf
echo "setup-test-host: ok (user fledge-test, /dev/fuse 0666, user_allow_other)"

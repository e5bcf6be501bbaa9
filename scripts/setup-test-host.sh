#!/usr/bin/env bash
# Prepare this host for fledge's rootless tests: an unprivileged user `fledge-test`,
# /dev/fuse usable by it, and `user_allow_other` so root can inspect that user's FUSE mounts.
# Idempotent. Root only.
set -euo pipefail
. "$(dirname "$0")/lib/need-root.sh"
need_root "it creates a user and changes /dev/fuse and /etc/fuse.conf"
id fledge-test >/dev/null 2>&1 || useradd --system --create-home --shell /bin/bash fledge-test
chmod 0666 /dev/fuse
grep -qx 'user_allow_other' /etc/fuse.conf 2>/dev/null || echo 'user_allow_other' >> /etc/fuse.conf
echo "setup-test-host: ok (user fledge-test, /dev/fuse 0666, user_allow_other)"

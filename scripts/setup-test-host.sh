#!/usr/bin/env bash
# Prepare this host for fledge's rootless tests: an unprivileged user `fledge-test`,
# /dev/fuse usable by it, `user_allow_other` so root can inspect that user's FUSE mounts, and
# subordinate uid/gid ranges so it can run rootless podman (tests/container.rs).
# Idempotent. Root only.
set -euo pipefail
. "$(dirname "$0")/lib/need-root.sh"
need_root "it creates a user and changes /dev/fuse, /etc/fuse.conf, /etc/subuid and /etc/subgid"
id fledge-test >/dev/null 2>&1 || useradd --system --create-home --shell /bin/bash fledge-test
# A system user gets no subordinate ids from useradd; rootless podman maps the container's
# other uids/gids to them (newuidmap/newgidmap from the uidmap package). 65536 ids, far
# above the ranges useradd hands out to regular users (100000 upwards).
for f in subuid subgid; do
    grep -q '^fledge-test:' "/etc/$f" 2>/dev/null || usermod "--add-${f}s" 1000000-1065535 fledge-test
done
chmod 0666 /dev/fuse
grep -qx 'user_allow_other' /etc/fuse.conf 2>/dev/null || echo 'user_allow_other' >> /etc/fuse.conf
echo "setup-test-host: ok (user fledge-test with subuids/subgids, /dev/fuse 0666, user_allow_other)"

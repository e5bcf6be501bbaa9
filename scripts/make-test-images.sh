#!/usr/bin/env bash
# Build the Debian OCI test image used by fledge's integration tests, plus a
# cached `umoci unpack` of it that serves as the reference ("oracle") rootfs.
#
#   oci:$OUT/debian:test              OCI layout, tag "test", 4 layers
#   $OUT/oracle/debian-test/rootfs    umoci unpack of that image (as root)
#   $OUT/cache/                       debootstrap tarball (re-runs skip the download)
#   $OUT/container/debian-minbase.tar the layer-1 tree (debootstrap minbase) as a plain
#                                     tar, for `podman import` (tests/container.rs)
#
# Layers of debian:test:
#   1 debootstrap --variant=minbase bookworm (has a "./" root entry)
#   2 apt-get install --no-install-recommends nginx-light curl libcap2-bin iputils-ping
#     (ping carries security.capability cap_net_raw from its postinst)
#   3 edits: whiteouts (/etc/motd, /usr/share/doc/curl), hard links (a new name for
#     /usr/bin/curl, /opt/links/{a,b,c}), cap_net_bind_service on /usr/sbin/nginx,
#     /opt/devs/{null (c 1,3), loop0 (b 7,0), fifo}, /opt/shared 3775, setuid
#     /opt/suid-script, /opt/owned-70000 (70000:70000), /opt/xattr-file (user.x =
#     00 ff 10), names with spaces/newline/UTF-8, symlinks, /opt/opaque-me/...,
#     /var/www/html/index.html with a nanosecond mtime
#   4 hand-made tar: opaque /etc/nginx/sites-enabled and /opt/opaque-me (marker after
#     a new child), whiteout /opt/links/b, hard link /opt/links/d -> lower /opt/links/a,
#     whiteout of the lower directory /usr/share/doc/nginx-common
#   config: Entrypoint /usr/sbin/nginx, Cmd -g "daemon off;", 80/tcp, PATH + FOO=bar
#
# OUT defaults to /var/tmp/fledge-test-images (override with FLEDGE_TEST_IMAGES);
# FLEDGE_DEBIAN_MIRROR overrides the mirror (default http://deb.debian.org/debian).
# Needs root. Idempotent: a completed build of this script version exits at once.
# Everything is built in $OUT/.build.* and moved into place at the end, so a failed
# or interrupted run never leaves a half-built image behind.
set -euo pipefail

SCRIPT_VERSION=3
OUT=${FLEDGE_TEST_IMAGES:-/var/tmp/fledge-test-images}
MIRROR=${FLEDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
STAMP="$OUT/.complete-v$SCRIPT_VERSION"
PACKAGES=(nginx-light curl libcap2-bin iputils-ping)
INDEX_CONTENT='<!doctype html><title>fledge</title><p>fledge test image</p>'

log() { printf '[make-test-images] %s\n' "$*" >&2; }
die() { printf '[make-test-images] error: %s\n' "$*" >&2; exit 1; }

print_paths() {
    echo "image:          oci:$OUT/debian:test"
    echo "oracle rootfs:  $OUT/oracle/debian-test/rootfs"
    echo "container base: $OUT/container/debian-minbase.tar"
}

complete() {
    [[ -f "$STAMP" && -f "$OUT/debian/index.json" && -d "$OUT/oracle/debian-test/rootfs" &&
        -s "$OUT/container/debian-minbase.tar" ]]
}

if complete; then
    print_paths
    exit 0
fi

. "$(dirname "$0")/lib/need-root.sh"
need_root "debootstrap, chroot, mknod, chown and setcap need it"

START=$(date +%s)

# --- tools ---------------------------------------------------------------------
need_pkgs=()
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
command -v umoci >/dev/null || need_pkgs+=(umoci)
command -v setcap >/dev/null || need_pkgs+=(libcap2-bin)
command -v setfattr >/dev/null || need_pkgs+=(attr)
command -v python3 >/dev/null || need_pkgs+=(python3)
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}"; then
        log "install failed; running apt-get update once and retrying"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}"
    fi
fi

# --- workspace, lock, cleanup ---------------------------------------------------
mkdir -p "$OUT" "$OUT/cache"
chmod 0755 "$OUT" "$OUT/cache"
exec 9>"$OUT/.lock"
flock 9
# Another run may have finished while we waited for the lock.
if complete; then
    print_paths
    exit 0
fi

unmount_under() {
    # Unmount everything mounted below $1, deepest first.
    local prefix=$1 mp
    { awk '{print $5}' /proc/self/mountinfo | grep -F -- "$prefix/" || true; } | sort -r | while read -r mp; do
        umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || log "warning: could not unmount $mp"
    done
}

# leftovers of runs that were killed hard (we hold the lock, so none is active)
for stale in "$OUT"/.build.*; do
    [[ -d "$stale" ]] || continue
    unmount_under "$stale"
    rm -rf --one-file-system "$stale"
done
B=$(mktemp -d "$OUT/.build.XXXXXX")
ROOTFS="$B/bundle/rootfs"
IMG="$B/debian:test"


cleanup() {
    local rc=$?
    set +e
    unmount_under "$B"
    rm -rf --one-file-system "$B"
    if ((rc != 0)); then
        log "build failed (exit $rc); nothing was installed under $OUT"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

repack() {
    # repack the bundle as a new layer and refresh the bundle for the next one
    umoci repack --refresh-bundle --history.created_by "$1" --image "$IMG" "$B/bundle"
}

# --- layer 1: debootstrap minbase ------------------------------------------------
ARCH=$(dpkg --print-architecture)
TARBALL="$OUT/cache/debootstrap-$SUITE-minbase-$ARCH.tgz"
if [[ ! -s "$TARBALL" ]]; then
    log "downloading $SUITE minbase packages into $TARBALL"
    mkdir "$B/mk"
    debootstrap --variant=minbase --make-tarball="$B/debootstrap.tgz" "$SUITE" "$B/mk" "$MIRROR" >&2
    chmod 0644 "$B/debootstrap.tgz"
    mv "$B/debootstrap.tgz" "$TARBALL"
fi

umoci init --layout "$B/debian"
umoci new --image "$IMG"
umoci unpack --image "$IMG" "$B/bundle"

log "layer 1: debootstrap --variant=minbase $SUITE"
if ! debootstrap --variant=minbase --unpack-tarball="$TARBALL" "$SUITE" "$ROOTFS" "$MIRROR" >"$B/debootstrap.log" 2>&1; then
    tail -n 30 "$B/debootstrap.log" >&2
    cat "$ROOTFS/debootstrap/debootstrap.log" >&2 2>/dev/null || true
    die "debootstrap failed (a stale $TARBALL? delete it and retry)"
fi
unmount_under "$B"
# debootstrap copies the host's resolver and hostname: keep the image host-independent
rm -f "$ROOTFS/etc/resolv.conf" "$ROOTFS/etc/hostname"
# --unpack-tarball leaves the .debs behind
rm -f "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/archives/partial/*
# The same tree is the base image of the unprivileged-container test (podman import needs a
# plain rootfs tar; the cached tarball holds .debs, so this saves a second debootstrap).
mkdir "$B/container"
tar --numeric-owner -C "$ROOTFS" -cf "$B/container/debian-minbase.tar" .
repack "debootstrap --variant=minbase $SUITE"

# --- layer 2: packages via apt in a chroot -------------------------------------------
log "layer 2: apt-get install ${PACKAGES[*]}"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"
mount -t proc proc "$ROOTFS/proc"
mount -t sysfs sysfs "$ROOTFS/sys"
mount --bind /dev "$ROOTFS/dev"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$ROOTFS/dev/pts" 2>/dev/null || true
chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c "apt-get update -q && apt-get install -q -y --no-install-recommends ${PACKAGES[*]} && apt-get clean" \
    >"$B/apt.log" 2>&1 || { tail -n 40 "$B/apt.log" >&2; die "apt-get install in the chroot failed"; }
unmount_under "$B"
rm -f "$ROOTFS/etc/resolv.conf" "$ROOTFS/usr/sbin/policy-rc.d"
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb
rm -f "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/lib/dpkg/*-old
PING_CAP_FROM_PKG=yes
if ! getcap "$ROOTFS/usr/bin/ping" | grep -q cap_net_raw; then
    PING_CAP_FROM_PKG=no
fi
repack "apt-get install --no-install-recommends ${PACKAGES[*]}"

# --- layer 3: edits ------------------------------------------------------------------
log "layer 3: whiteouts, hard links, caps, devices, fifo, odd modes/owners/xattrs/names"
# whiteouts of a lower file and of a lower directory
rm -f "$ROOTFS/etc/motd"
rm -rf "$ROOTFS/usr/share/doc/curl"
# hard links: a second name for a lower-layer binary, and a new pair
mkdir -p "$ROOTFS/usr/local/bin" "$ROOTFS/opt/links"
ln "$ROOTFS/usr/bin/curl" "$ROOTFS/usr/local/bin/curl-hardlink"
printf 'linked content\n' >"$ROOTFS/opt/links/a"
ln "$ROOTFS/opt/links/a" "$ROOTFS/opt/links/b"
ln "$ROOTFS/opt/links/a" "$ROOTFS/opt/links/c"
# file capabilities
if [[ $PING_CAP_FROM_PKG == no ]]; then
    setcap cap_net_raw+ep "$ROOTFS/usr/bin/ping"
fi
setcap cap_net_bind_service+ep "$ROOTFS/usr/sbin/nginx"
# device nodes and a fifo
mkdir -p "$ROOTFS/opt/devs"
mknod -m 0666 "$ROOTFS/opt/devs/null" c 1 3
mknod -m 0660 "$ROOTFS/opt/devs/loop0" b 7 0
mkfifo -m 0620 "$ROOTFS/opt/devs/fifo"
# sticky + setgid directory, setuid file
mkdir -p "$ROOTFS/opt/shared"
chmod 3775 "$ROOTFS/opt/shared"
printf '#!/bin/sh\necho suid\n' >"$ROOTFS/opt/suid-script"
chmod 4755 "$ROOTFS/opt/suid-script"
# ownership outside the 16-bit range
printf 'owned by 70000\n' >"$ROOTFS/opt/owned-70000"
chown 70000:70000 "$ROOTFS/opt/owned-70000"
chmod 0640 "$ROOTFS/opt/owned-70000"
# binary user xattr
printf 'has xattrs\n' >"$ROOTFS/opt/xattr-file"
setfattr -n user.x -v 0x00ff10 "$ROOTFS/opt/xattr-file"
setfattr -n user.text -v "plain text" "$ROOTFS/opt/xattr-file"
# awkward names
mkdir -p "$ROOTFS/opt/odd names"
printf 'spaces and a newline\n' >"$ROOTFS/opt/odd names/file with spaces and"$'\n'"newline"
printf 'utf-8 name\n' >"$ROOTFS/opt/odd names/ünïcødé"
# symlinks (relative, absolute, dangling)
ln -s ../links/a "$ROOTFS/opt/odd names/rel-link"
ln -s /etc/nginx "$ROOTFS/opt/abs-link"
ln -s /does/not/exist "$ROOTFS/opt/dangling-link"
# a directory with children that layer 4 makes opaque
mkdir -p "$ROOTFS/opt/opaque-me/sub"
printf 'old1\n' >"$ROOTFS/opt/opaque-me/old1"
printf 'old3\n' >"$ROOTFS/opt/opaque-me/sub/old3"
# nginx content; a sub-second mtime
mkdir -p "$ROOTFS/var/www/html"
printf '%s\n' "$INDEX_CONTENT" >"$ROOTFS/var/www/html/index.html"
chmod 0644 "$ROOTFS/var/www/html/index.html"
touch -h -d '2021-02-03 04:05:06.123456789 UTC' "$ROOTFS/var/www/html/index.html"
# an empty file and a sparse-ish larger file
: >"$ROOTFS/opt/empty"
head -c 3000000 /dev/zero | tr '\0' 'z' >"$ROOTFS/opt/big"
repack "fledge test edits"

# --- layer 4: hand-made opaque layer -----------------------------------------------------
log "layer 4: opaque directories and a whiteout (umoci raw add-layer)"
INDEX_CONTENT="$INDEX_CONTENT" python3 - "$B/layer4.tar" <<'PY'
import io, sys, tarfile

MTIME = 1700000000
out = sys.argv[1]

def add(tf, name, kind, data=b"", mode=0o644, linkname=""):
    ti = tarfile.TarInfo(name)
    ti.mtime = MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mode = mode
    if kind == "dir":
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
    elif kind == "symlink":
        ti.type = tarfile.SYMTYPE
        ti.linkname = linkname
        tf.addfile(ti)
    else:
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))

site = b"""server {
\tlisten 80 default_server;
\troot /var/www/html;
\tindex index.html;
\tlocation / { try_files $uri $uri/ =404; }
}
"""
with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
    # /etc/nginx/sites-enabled: lower layers have the "default" symlink
    add(tf, "etc/nginx/sites-enabled/", "dir", mode=0o755)
    add(tf, "etc/nginx/sites-enabled/.wh..wh..opq", "file", mode=0o644)
    add(tf, "etc/nginx/sites-enabled/fledge", "file", site)
    # /opt/opaque-me: lower layer 3 has old1 and sub/old3. The opaque marker
    # comes after a new child here: it must still hide only lower entries.
    add(tf, "opt/opaque-me/", "dir", mode=0o750)
    add(tf, "opt/opaque-me/new1", "file", b"new1\n")
    add(tf, "opt/opaque-me/.wh..wh..opq", "file")
    add(tf, "opt/opaque-me/sub/", "dir", mode=0o700)
    add(tf, "opt/opaque-me/sub/new2", "symlink", linkname="../new1")
    # plain whiteout of one name of a lower hard-link group, and a hard link
    # whose target is a file of a lower layer (joins the group of a and c)
    add(tf, "opt/links/.wh.b", "file")
    hl = tarfile.TarInfo("opt/links/d")
    hl.type = tarfile.LNKTYPE
    hl.linkname = "opt/links/a"
    hl.mtime = MTIME
    tf.addfile(hl)
    # whiteout of a lower directory
    add(tf, "usr/share/doc/.wh.nginx-common", "file")
PY
umoci raw add-layer --history.created_by "fledge test opaque layer (hand-made tar)" --image "$IMG" "$B/layer4.tar"

# --- config ----------------------------------------------------------------------------------
umoci config --image "$IMG" \
    --history.created_by "fledge test config" \
    --config.entrypoint /usr/sbin/nginx \
    --config.cmd -g --config.cmd 'daemon off;' \
    --config.exposedports 80/tcp \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env FOO=bar \
    --config.workingdir /
umoci gc --layout "$B/debian"

# --- oracle unpack + verification -------------------------------------------------------------
log "oracle: umoci unpack"
mkdir -p "$B/oracle"
umoci unpack --image "$IMG" "$B/oracle/debian-test" >/dev/null
O="$B/oracle/debian-test/rootfs"
fail() { die "verification of the unpacked image failed: $*"; }
[[ "$(ls -A "$O/etc/nginx/sites-enabled")" == "fledge" ]] || fail "opaque /etc/nginx/sites-enabled shows: $(ls -A "$O/etc/nginx/sites-enabled" | tr '\n' ' ')"
[[ "$(cd "$O/opt/opaque-me" && find . -mindepth 1 | sort | tr '\n' ' ')" == "./new1 ./sub ./sub/new2 " ]] \
    || fail "opaque /opt/opaque-me shows: $(cd "$O/opt/opaque-me" && find . -mindepth 1 | tr '\n' ' ')"
[[ ! -e "$O/opt/links/b" && -f "$O/opt/links/a" && -f "$O/opt/links/c" ]] || fail "whiteout of /opt/links/b"
[[ $(stat -c %i "$O/opt/links/a") == $(stat -c %i "$O/opt/links/c") && $(stat -c %h "$O/opt/links/a") == 3 ]] \
    || fail "/opt/links/a, c and d are not one hard-link group"
[[ ! -e "$O/usr/share/doc/nginx-common" && ! -e "$O/usr/share/doc/curl" && ! -e "$O/etc/motd" ]] || fail "whiteouts"
getcap "$O/usr/bin/ping" | grep -q cap_net_raw || fail "ping lacks cap_net_raw"
getcap "$O/usr/sbin/nginx" | grep -q cap_net_bind_service || fail "nginx lacks cap_net_bind_service"
[[ $(getfattr --absolute-names --only-values -n user.x "$O/opt/xattr-file" | od -An -tx1 | tr -d ' \n') == 00ff10 ]] || fail "user.x xattr"
[[ $(stat -c '%F %t:%T' "$O/opt/devs/null") == "character special file 1:3" ]] || fail "char device"
[[ $(stat -c '%F %t:%T' "$O/opt/devs/loop0") == "block special file 7:0" ]] || fail "block device"
[[ -p "$O/opt/devs/fifo" ]] || fail "fifo"
[[ $(stat -c %a "$O/opt/shared") == 3775 ]] || fail "sticky/setgid dir mode $(stat -c %a "$O/opt/shared")"
[[ $(stat -c %u:%g "$O/opt/owned-70000") == 70000:70000 ]] || fail "owner 70000"
[[ -f "$O/opt/odd names/file with spaces and"$'\n'"newline" ]] || fail "odd name"
[[ "$(cat "$O/var/www/html/index.html")" == "$INDEX_CONTENT" ]] || fail "index.html"

# --- permissions and atomic install ---------------------------------------------------------
find "$B/debian" -type d -exec chmod 0755 {} +
find "$B/debian" -type f -exec chmod 0644 {} +
chmod 0755 "$B/oracle" "$B/oracle/debian-test" "$B/container"
chmod 0644 "$B/container/debian-minbase.tar"

mkdir "$B/old"
[[ -e "$OUT/debian" ]] && mv "$OUT/debian" "$B/old/debian"
[[ -e "$OUT/oracle" ]] && mv "$OUT/oracle" "$B/old/oracle"
[[ -e "$OUT/container" ]] && mv "$OUT/container" "$B/old/container"
rm -f "$OUT"/.complete-v*
mv "$B/container" "$OUT/container"
mv "$B/oracle" "$OUT/oracle"
mv "$B/debian" "$OUT/debian"
touch "$STAMP"
chmod 0644 "$STAMP"

# --- summary ------------------------------------------------------------------------------------
END=$(date +%s)
python3 - "$OUT/debian" <<'PY'
import json, os, sys
lay = sys.argv[1]
def blob(d):
    alg, hx = d.split(":", 1)
    return os.path.join(lay, "blobs", alg, hx)
idx = json.load(open(os.path.join(lay, "index.json")))
for m in idx["manifests"]:
    tag = m.get("annotations", {}).get("org.opencontainers.image.ref.name", "?")
    man = json.load(open(blob(m["digest"])))
    print(f"tag {tag}: manifest {m['digest']}, {len(man['layers'])} layers")
    for i, l in enumerate(man["layers"], 1):
        print(f"  layer {i}: {l['size'] / 1048576:8.2f} MiB  {l['mediaType']}  {l['digest']}")
    print(f"  config: {man['config']['digest']}")
PY
echo "ping cap_net_raw from package postinst: $PING_CAP_FROM_PKG"
echo "oracle rootfs size: $(du -sh "$OUT/oracle/debian-test/rootfs" | cut -f1)"
echo "built in $((END - START)) s"
print_paths

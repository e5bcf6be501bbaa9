#!/usr/bin/env bash
# Benchmarks, side by side with their baselines in the same run, reported as medians and ratios
# (issue 7).
#
#   scripts/bench.sh [-n REPS] [-s SCALE_REPS] [build|scale|index|readonly|squashfs|qcow2|initramfs|big|all]
#
#   build  Debian test image -> ext4, everything pulled from a local docker-registry on
#          127.0.0.1 that holds the image:
#            reference-pipeline  the existing tool's steps (reference-notes.md): skopeo copy
#                                docker-daemon:... (fails: no daemon), skopeo copy
#                                docker://... oci:..., umoci unpack, du, mkfs.ext4, losetup,
#                                mount, cp -a, umount, e2fsck, resize2fs, truncate
#            fledge-cold         `fledge build` from docker://127.0.0.1:PORT/debian:test with an
#                                empty cache
#            fledge-warm         the same again, layers cached (auto: the native ext4 writer)
#            fledge-warm-kernel  the warm build with --backend kernel (loop mount + copy, then
#                                sha256 of the finished image), for comparison
#            floor               fetching the same layer blobs from the registry and
#                                decompressing each to /dev/null, all layers at once
#                                (curl | gzip -dc)
#   scale  generated images of 10k, 100k and 300k small files (0-2 KiB, one gzip layer,
#          cached under /var/tmp/fledge-bench-images), pushed to the same registry:
#          reference pipeline against fledge cold and warm.
#   index  fledge indexing the Debian image cold from the OCI layout (`fledge inspect --tree`)
#          against `umoci unpack`.
#   readonly  Debian test image -> squashfs and EROFS (issue 16), from the same registry:
#            go-squashfs         the existing Go tool's pipeline: skopeo copy, umoci unpack,
#                                mksquashfs ROOTFS OUT -comp xz -Xdict-size 50% -noappend
#                                (its default, compression_level 15; 128 KiB blocks)
#            fledge-sqfs-cold    `fledge build` type = "squashfs" (xz, level 15) with an empty
#                                cache
#            fledge-sqfs-warm    the same after a mapped file changed (layers and compressed
#                                blocks cached)
#            go-erofs            skopeo copy, umoci unpack, mkfs.erofs (uncompressed)
#            fledge-erofs-cold   type = "erofs", empty cache
#            fledge-erofs-warm   the same after a mapped file changed
#            fledge-ext4-warm    the native ext4 build of the same config, warm (the EROFS
#                                warm target's baseline)
#          plus the image sizes beside mksquashfs's and mkfs.erofs's, and where the time of
#          one cold and one warm fledge build goes (`build --json` steps).
#   squashfs  Debian test image (OCI layout) -> squashfs, xz (the default) and zstd: a build
#          with the layers cached but an empty block cache ("cold"), then the next build
#          after a [mappings] file changed and grew ("warm": the blocks come from the block
#          cache). Target: xz warm <= 0.10x xz cold.
#   initramfs  Debian test image -> gzip'd newc cpio (issue 17), from the same registry:
#            go-initramfs        the Go tool's pipeline: skopeo copy, umoci unpack, then
#                                `find . | cpio -o -H newc | gzip -9` in the rootfs
#            fledge-ird-cold     `fledge build` strategy = "initramfs" (gzip level 15 = -9),
#                                empty cache
#            fledge-ird-warm     the same after a mapped file changed (layers cached)
#            fledge-ird-zstd-warm  compression = "zstd" (level 15), warm
#          plus the archive sizes.
#   qcow2  Debian test image (OCI layout), layers cached: the same config built raw and with
#          --image-format qcow2 (issue 17): ext4 and EROFS (their writers stream the qcow2
#          themselves), squashfs, xfs and btrfs (written raw, then made a qcow2 in place by moving
#          extents). Target: each type's qcow2 build <= 1.1x its raw build.
#   big    multi-GB images (issue 18), from the same registry; not part of `all` (about 20
#          minutes, and it needs about 16 GiB free on /var/tmp, checked before it starts).
#          A generated image (scripts/lib/gen-big-image.py, cached under
#          /var/tmp/fledge-bench-images/big): about 2.6 GiB of content, 56k entries, three
#          gzip layers (a Debian base, a runtime layer of 47k files from Debian packages, 20
#          partly incompressible model-weight files; 94, 368 and 769 MiB compressed):
#            reference-big       the reference pipeline (as in `build`)
#            fledge-big-cold     `fledge build` ext4, empty cache
#            fledge-big-warm     the same after a mapped file changed (layers cached)
#            floor-gzip, floor-pigz, floor-igzip
#                                every layer blob fetched from the registry and decompressed
#                                to /dev/null, all layers at once, with gzip -dc, pigz -dc
#                                and ISA-L's igzip -dc; the fastest is "the floor"
#            floor-write         the warm image's allocated bytes written durably by dd
#                                (4 MiB O_DIRECT writes, fdatasync): the disk's share
#            floor-sha256        as many bytes hashed once (OpenSSL's sha256): the hash's
#            fledge-big-sqfs     type = "squashfs" (xz, the default), layers cached, empty
#                                block cache
#            mksquashfs-big      mksquashfs -comp xz -Xdict-size 50% on the unpacked tree
#                                (umoci unpack once, untimed)
#            fledge-big-erofs    type = "erofs", layers cached
#            mkfs-erofs-big      mkfs.erofs on the unpacked tree
#          (BIG_READONLY=0 leaves these four out: the xz builds take 10 of the 20 minutes)
#          and images of 300k and 1M small files (as in `scale`): fledge cold and warm ext4
#          with their peak RSS; the disk peak of a cold big build's own files (cache and
#          outputs, scripts/lib/disk-peak.py) beside its layer cache plus its image; where
#          the time of a cold and a warm big build goes (`steps`, and the
#          FLEDGE_LOG=fledge::timing=debug lines of one more warm build).
#   all    build, scale, readonly and initramfs (default; squashfs is its block-cache detail,
#          qcow2 the qcow2 output's, big the multi-GB one).
#
# Commands alternate within each repetition so that machine noise hits all of them alike.
# Every command runs under scripts/lib/measure.py, which reports wall time, the largest
# single-process peak RSS (as /usr/bin/time %M), the sampled peak RSS summed over the
# process tree, and the sampled peak extra disk use of the filesystem holding the work
# directory (/var/tmp; other writers on that filesystem add noise).
#
# Needs root (loop devices), docker-registry, skopeo, umoci, curl, gzip, python3 (and for
# `big`: pigz, igzip, dpkg-deb, apt-get download for the generator's Debian packages). Uses the
# cached Debian test image (scripts/make-test-images.sh builds it once) and the release binary
# ($FLEDGE_BIN, else $CARGO_TARGET_DIR/release/fledge or target/release/fledge, built if
# missing).
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPTS="$PWD/scripts"

reps=5
scale_reps=
while getopts "n:s:" opt; do
    case $opt in
    n) reps=$OPTARG ;;
    s) scale_reps=$OPTARG ;;
    *) echo "usage: $0 [-n REPS] [-s SCALE_REPS] [build|scale|index|readonly|squashfs|qcow2|initramfs|big|all]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
what="${1:-all}"
scale_reps=${scale_reps:-$reps}
case $what in build | scale | index | readonly | squashfs | qcow2 | initramfs | big | all) ;; *)
    echo "usage: $0 [-n REPS] [-s SCALE_REPS] [build|scale|index|readonly|squashfs|qcow2|initramfs|big|all]" >&2; exit 2 ;;
esac

. scripts/lib/need-root.sh
need_root "the baseline pipeline loop-mounts images"
for p in docker-registry skopeo umoci curl gzip cpio python3 mkfs.ext4 e2fsck resize2fs mksquashfs mkfs.erofs; do
    command -v "$p" >/dev/null || { echo "bench.sh: $p not found (scripts/install-deps.sh)" >&2; exit 1; }
done
IMAGES="${FLEDGE_TEST_IMAGES:-/var/tmp/fledge-test-images}"
GEN_IMAGES="${FLEDGE_BENCH_IMAGES:-/var/tmp/fledge-bench-images}"
scripts/make-test-images.sh >/dev/null
FLEDGE=${FLEDGE_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/fledge}
[ -x "$FLEDGE" ] || cargo build --release --quiet
FLEDGE=$(realpath "$FLEDGE")
LAYOUT="$IMAGES/debian"
WORK=$(mktemp -d /var/tmp/fledge-bench.XXXXXX)
# shellcheck source=lib/registry.sh
. "$SCRIPTS/lib/registry.sh"
cleanup() {
    registry_stop
    if mountpoint -q "$WORK/ref/mnt" 2>/dev/null; then umount "$WORK/ref/mnt"; fi
    losetup -j "$WORK/ref/ref.img" 2>/dev/null | cut -d: -f1 | xargs -r losetup -d
    rm -rf "$WORK"
}
trap cleanup EXIT
# Bare references must never reach a Docker daemon: the registry is the source.
export DOCKER_HOST="unix://$WORK/no-daemon.sock"

# measure NAME CMD...: run once; appends "seconds max1_rss_kib tree_rss_kib disk_kib" to
# $WORK/NAME.times.
measure() {
    local name=$1
    shift
    sync
    python3 "$SCRIPTS/lib/measure.py" "$WORK" "$WORK/$name.times" -- "$@" || {
        echo "bench.sh: $name failed:" >&2
        cat "$WORK/$name.times.err" >&2
        exit 1
    }
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
col() { cut -d' ' -f"$2" "$WORK/$1.times"; }
med_time() { col "$1" 1 | median; }
max_mib() { col "$1" "$2" | sort -n | tail -1 | awk '{printf "%.0f", $1/1024}'; }
med_mib() { col "$1" "$2" | median | awk '{printf "%.0f", $1/1024}'; }
# Three decimals: a target check must not be met by rounding (0.152 is not <= 0.15).
ratio() { awk -v a="$(med_time "$1")" -v b="$(med_time "$2")" 'BEGIN {printf "%.3f", (b > 0 ? a / b : 0)}'; }

header() {
    printf "%-24s %9s %8s %9s %9s %9s  %s\n" "" "median" "" "max RSS" "tree RSS" "disk" ""
    printf "%-24s %9s %8s %9s %9s %9s  %s\n" "command" "time (s)" "runs" "1 proc" "peak" "peak" "ratio"
}
row() { # name [baseline...]
    local name=$1 r=""
    shift
    for b in "$@"; do r+="$(ratio "$name" "$b")x $b  "; done
    printf "%-24s %9.2f %8s %5s MiB %5s MiB %5s MiB  %s\n" "$name" "$(med_time "$name")" \
        "$(wc -l <"$WORK/$name.times")" "$(max_mib "$name" 2)" "$(max_mib "$name" 3)" \
        "$(med_mib "$name" 4)" "$r"
}
# check LABEL VALUE OP LIMIT
check() {
    if awk -v v="$2" -v l="$4" "BEGIN {exit !(v $3 l)}"; then
        printf "  %-44s %8s %s %-6s met\n" "$1" "$2" "$3" "$4"
    else
        printf "  %-44s %8s %s %-6s MISSED\n" "$1" "$2" "$3" "$4"
    fi
}

# unpack_with_entrypoint D: `umoci unpack` of oci:D/img:latest into D/bundle, and the image
# config copied to the rootfs' /etc/fsify-entrypoint, as the existing tool does.
unpack_with_entrypoint() {
    local d=$1 cfg
    umoci unpack --image "$d/img:latest" "$d/bundle"
    cfg=$(python3 -c 'import json,sys; i=json.load(open(sys.argv[1]+"/index.json")); m=json.load(open(sys.argv[1]+"/blobs/sha256/"+i["manifests"][0]["digest"][7:])); print(m["config"]["digest"][7:])' "$d/img")
    cp "$d/img/blobs/sha256/$cfg" "$d/bundle/rootfs/etc/fsify-entrypoint"
}
export -f unpack_with_entrypoint

# The existing tool's pipeline, step for step (reference-notes.md), from reference $1
# (docker://... or oci:...) into $WORK/ref/ref.img with a 100 MiB buffer. One deviation: when
# mkfs.ext4's default inode count (one per 16 KiB) is too small for the unpacked tree (images
# of many small files), -N gives it enough, since the original would fail there.
reference_pipeline() {
    local src=$1 d=$WORK/ref buffer_kib=$((100 * 1024))
    rm -rf "$d"
    mkdir -p "$d/mnt"
    # Step 1 as the existing tool does it: the Docker daemon first (there is none here, so
    # this fails, as it does for users without Docker), then the registry.
    if [ "${src#docker://}" = "$src" ] ||
        ! skopeo copy -q --src-daemon-host "$DOCKER_HOST" "docker-daemon:${src#docker://}" \
            "oci:$d/img:latest" 2>/dev/null; then
        skopeo copy -q --src-tls-verify=false "$src" "oci:$d/img:latest"
    fi
    unpack_with_entrypoint "$d"
    local du_kib inodes
    du_kib=$(du -sk "$d/bundle/rootfs" | cut -f1)
    inodes=$(du -s --inodes "$d/bundle/rootfs" | cut -f1)
    local bytes=$(((du_kib + buffer_kib) * 1024)) mkfs_n=()
    if [ $((bytes / 16384)) -lt $((inodes * 5 / 4 + 1024)) ]; then
        mkfs_n=(-N $((inodes * 5 / 4 + 1024)))
    fi
    truncate -s "$bytes" "$d/ref.img"
    mkfs.ext4 -F -q "${mkfs_n[@]}" "$d/ref.img"
    local lo
    lo=$(losetup --find --show "$d/ref.img")
    mount "$lo" "$d/mnt"
    cp -a "$d/bundle/rootfs/." "$d/mnt/"
    umount "$d/mnt"
    losetup -d "$lo"
    e2fsck -f -y "$d/ref.img" >/dev/null || [ $? -le 1 ]
    local bs min
    bs=$(dumpe2fs -h "$d/ref.img" 2>/dev/null | awk -F: '/^Block size/ {print $2+0}')
    min=$(resize2fs -P "$d/ref.img" 2>/dev/null | awk -F: '/minimum/ {print $2+0}')
    local blocks=$((min + buffer_kib * 1024 / bs))
    resize2fs "$d/ref.img" "$blocks" >/dev/null 2>&1
    truncate -s $((blocks * bs)) "$d/ref.img"
}

# The floor: GET every layer blob of $FLOOR_REPO from the registry and decompress it to
# /dev/null, all layers in parallel. FLOOR_LAYERS holds "digest:compression" words; gzip
# layers go through $FLOOR_GUNZIP -dc (gzip unless set: pigz, igzip).
floor() {
    local pids=() l
    for l in $FLOOR_LAYERS; do
        local digest=${l%:*} comp=${l##*:} dec=(cat)
        case $comp in gzip) dec=("${FLOOR_GUNZIP:-gzip}" -dc) ;; zstd) dec=(zstd -dcq) ;; esac
        (set -o pipefail; curl -sSf "http://$REGISTRY/v2/$FLOOR_REPO/blobs/$digest" | "${dec[@]}" >/dev/null) &
        pids+=($!)
    done
    local p
    for p in "${pids[@]}"; do wait "$p"; done
}
# The two costs no writer of a warm big build avoids, for an image of FLOOR_BYTES allocated
# bytes: writing them durably at the disk's sequential rate (dd, 4 MiB direct writes, then
# fdatasync), and hashing them once at the CPU's sha256 rate (Python's hashlib, which is
# OpenSSL's SHA-NI code here; sha256sum of coreutils 9.1 does not use SHA-NI).
floor_write() {
    rm -f "$WORK/floor.img"
    dd if=/dev/zero of="$WORK/floor.img" bs=4M count=$((FLOOR_BYTES / 4194304)) oflag=direct \
        conv=fdatasync status=none
    rm -f "$WORK/floor.img"
}
floor_sha256() {
    python3 -c 'import hashlib, sys
h, b = hashlib.sha256(), bytes(1 << 20)
for _ in range(int(sys.argv[1]) >> 20): h.update(b)' "$FLOOR_BYTES"
}
export -f reference_pipeline floor floor_write floor_sha256
export WORK REGISTRY

# layers_of REPO:TAG: "digest:compression" of each layer, from the registry's manifest.
layers_of() {
    curl -sSf -H "Accept: application/vnd.oci.image.manifest.v1+json" \
        -H "Accept: application/vnd.docker.distribution.manifest.v2+json" \
        "http://$REGISTRY/v2/${1%:*}/manifests/${1##*:}" | python3 -c '
import json, sys
for l in json.load(sys.stdin)["layers"]:
    mt = l["mediaType"]
    c = "zstd" if "zstd" in mt else ("gzip" if "gzip" in mt else "none")
    print(l["digest"] + ":" + c)'
}

# fledge_config NAME REF: a fledge.toml for REF with the same 100 MiB buffer.
fledge_config() {
    cat >"$WORK/$1.toml" <<EOF
version = "1"
strategy = "oci_rootfs"
[source]
image = "$2"
[filesystem]
type = "ext4"
size_buffer_mb = 100
EOF
}

fledge_build() { # NAME CACHE [BUILD ARGS...]
    "$FLEDGE" build -q -c "$WORK/$1.toml" --cache-dir "$2" -o "$WORK/out.img" "${@:3}"
}
export -f fledge_build
export FLEDGE

bench_build() {
    local ref="$REGISTRY/debian:test"
    FLOOR_LAYERS=$(layers_of debian:test | tr '\n' ' ')
    FLOOR_REPO=debian
    export FLOOR_LAYERS FLOOR_REPO
    fledge_config debian "docker://$ref"
    for _ in $(seq "$reps"); do
        measure reference-pipeline bash -c 'reference_pipeline "$0"' "docker://$ref"
        rm -rf "$WORK/ref"
        rm -rf "$WORK/cache"
        measure fledge-cold bash -c 'fledge_build debian "$WORK/cache"'
        rm -f "$WORK/out.img" "$WORK/out.manifest.json"
        measure fledge-warm bash -c 'fledge_build debian "$WORK/cache"'
        rm -f "$WORK/out.img" "$WORK/out.manifest.json"
        # The same warm build through the kernel backend (loop mount + copy + sha256 after).
        measure fledge-warm-kernel bash -c 'fledge_build debian "$WORK/cache" --backend kernel'
        rm -f "$WORK/out.img" "$WORK/out.manifest.json"
        measure floor bash -c floor
    done
    rm -rf "$WORK/cache"
    echo
    echo "== build: Debian test image (registry $ref) -> ext4, $reps repetitions"
    header
    row reference-pipeline
    row fledge-cold reference-pipeline floor
    row fledge-warm reference-pipeline
    row fledge-warm-kernel reference-pipeline
    row floor reference-pipeline
    echo "targets:"
    check "fledge cold / reference" "$(ratio fledge-cold reference-pipeline)" "<=" 0.20
    check "fledge warm / reference" "$(ratio fledge-warm reference-pipeline)" "<=" 0.10
    check "fledge cold / floor" "$(ratio fledge-cold floor)" "<=" 1.5
    check "fledge cold peak RSS, process tree (MiB)" "$(max_mib fledge-cold 3)" "<=" 300
    check "fledge warm peak RSS, process tree (MiB)" "$(max_mib fledge-warm 3)" "<=" 300
}

# small_image N: the generated image of N small files (made once, cached in $GEN_IMAGES),
# pushed to the registry as small-N:test, and its fledge.toml. Another run may be generating
# the same image: the generator renames it into place when done, so only an image without
# index.json is generated (again).
small_image() {
    mkdir -p "$GEN_IMAGES"
    if [ ! -f "$GEN_IMAGES/small-$1/index.json" ]; then
        echo "generating an image of $1 small files in $GEN_IMAGES/small-$1" >&2
        python3 "$SCRIPTS/lib/gen-small-files.py" "$1" "$GEN_IMAGES/small-$1"
    fi
    registry_push "oci:$GEN_IMAGES/small-$1:test" "small-$1:test"
    fledge_config "small-$1" "docker://$REGISTRY/small-$1:test"
}

bench_scale() {
    local sizes=(10000 100000 300000) n
    for n in "${sizes[@]}"; do
        small_image "$n"
    done
    for _ in $(seq "$scale_reps"); do
        for n in "${sizes[@]}"; do
            measure "reference-$n" bash -c 'reference_pipeline "$0"' "docker://$REGISTRY/small-$n:test"
            rm -rf "$WORK/ref"
            rm -rf "$WORK/cache"
            measure "fledge-cold-$n" bash -c 'fledge_build "$0" "$WORK/cache"' "small-$n"
            rm -f "$WORK/out.img" "$WORK/out.manifest.json"
            measure "fledge-warm-$n" bash -c 'fledge_build "$0" "$WORK/cache"' "small-$n"
            rm -rf "$WORK/cache" "$WORK/out.img" "$WORK/out.manifest.json"
        done
    done
    echo
    echo "== scale: images of N small files (0-2 KiB) -> ext4, $scale_reps repetitions"
    header
    for n in "${sizes[@]}"; do
        row "reference-$n"
        row "fledge-cold-$n" "reference-$n"
        row "fledge-warm-$n" "reference-$n"
    done
    echo "targets:"
    check "fledge cold 100k / reference 100k" "$(ratio fledge-cold-100000 reference-100000)" "<=" 0.20
    check "fledge cold 300k / fledge cold 100k" "$(ratio fledge-cold-300000 fledge-cold-100000)" "<=" 3.6
    check "fledge warm 300k / fledge warm 100k" "$(ratio fledge-warm-300000 fledge-warm-100000)" "<=" 3.6
}

# The Go tool's read-only pipeline from reference $1 into $WORK/go/out.$2 (squashfs: its
# mksquashfs line; erofs: mkfs.erofs with its defaults).
go_readonly_pipeline() {
    local src=$1 fs=$2 d=$WORK/go
    rm -rf "$d"
    mkdir -p "$d"
    skopeo copy -q --src-tls-verify=false "$src" "oci:$d/img:latest"
    unpack_with_entrypoint "$d"
    if [ "$fs" = squashfs ]; then
        mksquashfs "$d/bundle/rootfs" "$d/out.squashfs" -comp xz -Xdict-size 50% -noappend \
            -no-progress >/dev/null
    else
        mkfs.erofs "$d/out.erofs" "$d/bundle/rootfs" >/dev/null 2>&1
    fi
    stat -c %s "$d/out.$fs" >"$WORK/go-$fs.size"
}
export -f go_readonly_pipeline

# readonly_config NAME REF TYPE: a read-only fledge.toml for REF that maps $WORK/map.txt.
readonly_config() {
    cat >"$WORK/$1.toml" <<EOF
version = "1"
strategy = "oci_rootfs"
[source]
image = "$2"
[filesystem]
type = "$3"
[mappings]
"map.txt" = "/etc/fledge-bench-map"
EOF
}

fledge_build_to() { # NAME CACHE OUT [BUILD ARGS...]
    "$FLEDGE" build -q -c "$WORK/$1.toml" --cache-dir "$2" -o "$3" "${@:4}"
}
export -f fledge_build_to

# steps NAME CACHE OUT: one more build with --json, printing its steps (where the time goes).
# With STEPS_DISK set, the build runs under lib/disk-peak.py, which writes the peak and final
# allocated KiB of the cache and the outputs (and their temporary directory) to $STEPS_DISK.
steps() {
    local wrap=()
    if [ -n "${STEPS_DISK:-}" ]; then
        wrap=(python3 "$SCRIPTS/lib/disk-peak.py" "$STEPS_DISK" "$2" "$(dirname "$3")/.fledge-build-*"
            "${3%.*}.*" --)
    fi
    "${wrap[@]}" "$FLEDGE" build -q --json -c "$WORK/$1.toml" --cache-dir "$2" -o "$3" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("   ", ", ".join("%s %.2fs" % (s["name"], s["seconds"]) for s in r["timings"]))'
}

bench_readonly() {
    local ref="docker://$REGISTRY/debian:test"
    readonly_config sqfs "$ref" squashfs
    readonly_config erofs "$ref" erofs
    fledge_config ext4 "$ref"
    printf '[mappings]\n"map.txt" = "/etc/fledge-bench-map"\n' >>"$WORK/ext4.toml"
    for _ in $(seq "$reps"); do
        date +%s%N >"$WORK/map.txt"
        measure go-squashfs bash -c 'go_readonly_pipeline "$0" squashfs' "$ref"
        rm -rf "$WORK/cache"
        measure fledge-sqfs-cold bash -c 'fledge_build_to sqfs "$WORK/cache" "$WORK/out.squashfs"'
        stat -c %s "$WORK/out.squashfs" >"$WORK/fledge-squashfs.size"
        date +%s%N >"$WORK/map.txt"
        measure fledge-sqfs-warm bash -c 'fledge_build_to sqfs "$WORK/cache" "$WORK/out.squashfs"'
        measure go-erofs bash -c 'go_readonly_pipeline "$0" erofs' "$ref"
        rm -rf "$WORK/cache"
        measure fledge-erofs-cold bash -c 'fledge_build_to erofs "$WORK/cache" "$WORK/out.erofs"'
        stat -c %s "$WORK/out.erofs" >"$WORK/fledge-erofs.size"
        date +%s%N >"$WORK/map.txt"
        measure fledge-erofs-warm bash -c 'fledge_build_to erofs "$WORK/cache" "$WORK/out.erofs"'
        date +%s%N >"$WORK/map.txt"
        measure fledge-ext4-warm bash -c 'fledge_build_to ext4 "$WORK/cache" "$WORK/out.img"'
        rm -rf "$WORK/go" "$WORK"/out.*
    done
    echo
    echo "== readonly: Debian test image (registry) -> squashfs and EROFS, $reps repetitions"
    header
    row go-squashfs
    row fledge-sqfs-cold go-squashfs
    row fledge-sqfs-warm fledge-sqfs-cold
    row go-erofs
    row fledge-erofs-cold go-erofs
    row fledge-erofs-warm fledge-ext4-warm
    row fledge-ext4-warm
    local gs fs ge fe
    gs=$(cat "$WORK/go-squashfs.size") fs=$(cat "$WORK/fledge-squashfs.size")
    ge=$(cat "$WORK/go-erofs.size") fe=$(cat "$WORK/fledge-erofs.size")
    echo "sizes (bytes):"
    printf "  %-40s %12s\n" "mksquashfs xz dict 50%, 128 KiB" "$gs" "fledge squashfs xz level 15" "$fs" \
        "mkfs.erofs (uncompressed)" "$ge" "fledge erofs (uncompressed)" "$fe"
    # The other compressors, once each, beside the formatters on the same unpacked tree.
    go_readonly_pipeline "$ref" erofs
    local root=$WORK/go/bundle/rootfs
    mksquashfs "$root" "$WORK/go/zstd.squashfs" -comp zstd -noappend -no-progress >/dev/null
    mkfs.erofs -zlz4 "$WORK/go/lz4.erofs" "$root" >/dev/null 2>&1
    mkfs.erofs -zlz4hc "$WORK/go/lz4hc.erofs" "$root" >/dev/null 2>&1
    local c
    for c in "squashfs zstd" "erofs lz4" "erofs lz4hc"; do
        set -- $c
        readonly_config "x-$1-$2" "$ref" "$1"
        sed -i "s/^type = .*/&\ncompression = \"$2\"/" "$WORK/x-$1-$2.toml"
        fledge_build_to "x-$1-$2" "$WORK/cache" "$WORK/x.$1"
        printf "  %-40s %12s\n" "$( [ "$1" = squashfs ] && echo "mksquashfs $2 (level 15)" || echo "mkfs.erofs -z$2")" \
            "$(stat -c %s "$WORK/go/$2.$1")" "fledge $1 $2" "$(stat -c %s "$WORK/x.$1")"
        rm -f "$WORK/x.$1" "$WORK/x.manifest.json"
    done
    rm -rf "$WORK/go"
    echo "where the time goes (one more build each; cold = empty cache):"
    rm -rf "$WORK/cache"
    echo "  squashfs cold:"; steps sqfs "$WORK/cache" "$WORK/out.squashfs"
    date +%s%N >"$WORK/map.txt"
    echo "  squashfs warm:"; steps sqfs "$WORK/cache" "$WORK/out.squashfs"
    date +%s%N >"$WORK/map.txt"
    echo "  erofs warm:"; steps erofs "$WORK/cache" "$WORK/out.erofs"
    rm -rf "$WORK/cache" "$WORK"/out.*
    echo "targets:"
    check "fledge squashfs cold / Go pipeline" "$(ratio fledge-sqfs-cold go-squashfs)" "<=" 0.75
    check "fledge squashfs size / mksquashfs" "$(awk -v a="$fs" -v b="$gs" 'BEGIN {printf "%.3f", a / b}')" "<=" 1.02
    check "fledge squashfs warm / cold" "$(ratio fledge-sqfs-warm fledge-sqfs-cold)" "<=" 0.10
    check "fledge erofs warm / fledge ext4 warm" "$(ratio fledge-erofs-warm fledge-ext4-warm)" "<=" 1.2
    check "fledge erofs cold / Go pipeline (mkfs.erofs)" "$(ratio fledge-erofs-cold go-erofs)" "<=" 0.15
}

# The Go tool's initramfs pipeline from reference $1 into $WORK/go/out.cpio.gz: unpack, then
# the archive of the rootfs (find | cpio -H newc | gzip -9; its init and busybox steps left
# out, which only add a few small files).
go_initramfs_pipeline() {
    local src=$1 d=$WORK/go
    rm -rf "$d"
    mkdir -p "$d"
    skopeo copy -q --src-tls-verify=false "$src" "oci:$d/img:latest"
    umoci unpack --image "$d/img:latest" "$d/bundle"
    (cd "$d/bundle/rootfs" && find . | cpio -o -H newc --quiet | gzip -9 >"$d/out.cpio.gz")
    stat -c %s "$d/out.cpio.gz" >"$WORK/go-initramfs.size"
}
export -f go_initramfs_pipeline

bench_initramfs() {
    local ref="docker://$REGISTRY/debian:test"
    for comp in gzip zstd; do
        cat >"$WORK/ird-$comp.toml" <<EOF
version = "1"
strategy = "initramfs"
[source]
image = "$ref"
[filesystem]
compression = "$comp"
[mappings]
"map.txt" = "/etc/fledge-bench-map"
EOF
    done
    for _ in $(seq "$reps"); do
        date +%s%N >"$WORK/map.txt"
        measure go-initramfs bash -c 'go_initramfs_pipeline "$0"' "$ref"
        rm -rf "$WORK/cache"
        measure fledge-ird-cold bash -c 'fledge_build_to ird-gzip "$WORK/cache" "$WORK/out.cpio.gz"'
        stat -c %s "$WORK/out.cpio.gz" >"$WORK/fledge-initramfs.size"
        date +%s%N >"$WORK/map.txt"
        measure fledge-ird-warm bash -c 'fledge_build_to ird-gzip "$WORK/cache" "$WORK/out.cpio.gz"'
        date +%s%N >"$WORK/map.txt"
        measure fledge-ird-zstd-warm bash -c 'fledge_build_to ird-zstd "$WORK/cache" "$WORK/out.cpio.zst"'
        stat -c %s "$WORK/out.cpio.zst" >"$WORK/fledge-initramfs-zstd.size"
        rm -rf "$WORK/go" "$WORK"/out.*
    done
    rm -rf "$WORK/cache"
    echo
    echo "== initramfs: Debian test image (registry) -> newc cpio, $reps repetitions"
    header
    row go-initramfs
    row fledge-ird-cold go-initramfs
    row fledge-ird-warm go-initramfs
    row fledge-ird-zstd-warm fledge-ird-warm
    echo "sizes (bytes):"
    printf "  %-40s %12s\n" "find | cpio -H newc | gzip -9" "$(cat "$WORK/go-initramfs.size")" \
        "fledge gzip level 15 (-9)" "$(cat "$WORK/fledge-initramfs.size")" \
        "fledge zstd level 15" "$(cat "$WORK/fledge-initramfs-zstd.size")"
}

bench_index() {
    local ref="oci:$LAYOUT:test"
    for _ in $(seq "$reps"); do
        rm -rf "$WORK/cache" "$WORK/bundle"
        measure fledge-index-cold "$FLEDGE" inspect --tree --cache-dir "$WORK/cache" "$ref"
        measure umoci-unpack umoci unpack --image "$LAYOUT:test" "$WORK/bundle"
        rm -rf "$WORK/bundle"
        measure fledge-index-warm "$FLEDGE" inspect --tree --cache-dir "$WORK/cache" "$ref"
    done
    rm -rf "$WORK/cache"
    echo
    echo "== index: Debian test image (OCI layout), $reps repetitions"
    header
    row umoci-unpack
    row fledge-index-cold umoci-unpack
    row fledge-index-warm umoci-unpack
}

# A squashfs build of the Debian layout with compression $1 and the mapping sq-app.conf.
sq_build() {
    "$FLEDGE" build -q -c "$WORK/sq-$1.toml" --cache-dir "$WORK/cache" -o "$WORK/out.squashfs"
}
export -f sq_build

bench_squashfs() {
    local comp i
    for comp in xz zstd; do
        cat >"$WORK/sq-$comp.toml" <<EOF
version = "1"
strategy = "oci_rootfs"
[source]
image = "oci:$LAYOUT:test"
[filesystem]
type = "squashfs"
compression = "$comp"
[mappings]
"sq-app.conf" = "/etc/app.conf"
EOF
    done
    rm -rf "$WORK/cache"
    echo v0 >"$WORK/sq-app.conf"
    sq_build zstd # the layers into the cache
    for i in $(seq "$reps"); do
        for comp in xz zstd; do
            rm -rf "$WORK/cache/squashfs"
            echo "v$i" >"$WORK/sq-app.conf"
            measure "squashfs-$comp-cold" bash -c 'sq_build "$0"' "$comp"
            printf 'v%s, changed: %s\n' "$i" "$(seq -s ' ' 300)" >"$WORK/sq-app.conf"
            measure "squashfs-$comp-warm" bash -c 'sq_build "$0"' "$comp"
        done
    done
    rm -rf "$WORK/cache" "$WORK/out.squashfs" "$WORK/out.manifest.json"
    echo
    echo "== squashfs: Debian test image (OCI layout), layers cached; cold = empty block cache,"
    echo "   warm = after a mapping changed; $reps repetitions"
    header
    for comp in xz zstd; do
        row "squashfs-$comp-cold"
        row "squashfs-$comp-warm" "squashfs-$comp-cold"
    done
    echo "targets:"
    check "squashfs xz warm / cold" "$(ratio squashfs-xz-warm squashfs-xz-cold)" "<=" 0.10
}

qc_build() { # TYPE FORMAT
    "$FLEDGE" build -q -c "$WORK/qc-$1.toml" --cache-dir "$WORK/cache" --image-format "$2" \
        -o "$WORK/qc-out.$2"
}
export -f qc_build

bench_qcow2() {
    local fs i f types=(ext4 erofs squashfs xfs btrfs)
    for fs in "${types[@]}"; do
        cat >"$WORK/qc-$fs.toml" <<EOF
version = "1"
strategy = "oci_rootfs"
[source]
image = "oci:$LAYOUT:test"
[filesystem]
type = "$fs"
EOF
    done
    rm -rf "$WORK/cache"
    qc_build ext4 raw      # the layers into the cache
    qc_build squashfs raw  # and the compressed blocks
    for i in $(seq "$reps"); do
        for fs in "${types[@]}"; do
            for f in raw qcow2; do
                # A fresh output path: replacing the previous image would add its deletion.
                rm -f "$WORK/qc-out.$f"
                measure "qcow2-$fs-$f" bash -c 'qc_build "$0" "$1"' "$fs" "$f"
            done
        done
    done
    echo
    echo "== qcow2: Debian test image (OCI layout), layers cached, the same config raw and"
    echo "   --image-format qcow2; $reps repetitions (ext4: native writer, streamed; erofs:"
    echo "   streamed; squashfs, xfs and btrfs (kernel backend): converted in place)"
    header
    for fs in "${types[@]}"; do
        row "qcow2-$fs-raw"
        row "qcow2-$fs-qcow2" "qcow2-$fs-raw"
    done
    for fs in "${types[@]}"; do
        qc_build "$fs" raw
        qc_build "$fs" qcow2
        printf "  %-8s raw %s bytes (%s allocated), qcow2 %s bytes (%s allocated)\n" "$fs" \
            "$(stat -c %s "$WORK/qc-out.raw")" "$(($(stat -c %b "$WORK/qc-out.raw") * 512))" \
            "$(stat -c %s "$WORK/qc-out.qcow2")" "$(($(stat -c %b "$WORK/qc-out.qcow2") * 512))"
    done
    rm -rf "$WORK/cache" "$WORK"/qc-out.*
    echo "targets:"
    for fs in "${types[@]}"; do
        check "$fs qcow2 / raw" "$(ratio "qcow2-$fs-qcow2" "qcow2-$fs-raw")" "<=" 1.10
    done
}

# need_free_gib GIB DIR WHAT: stop with a clear message unless the filesystem of DIR has GIB
# GiB free.
need_free_gib() {
    local avail_kib
    avail_kib=$(df -Pk "$2" | awk 'NR == 2 {print $4}')
    if [ "$avail_kib" -lt $(($1 * 1024 * 1024)) ]; then
        echo "bench.sh: $3 needs about $1 GiB free on the filesystem of $2, which has" \
            "$((avail_kib / 1024 / 1024)) GiB: free some space first (fledge cache prune," \
            "old /var/tmp/fledge-bench.* directories) or set FLEDGE_BENCH_IMAGES elsewhere" >&2
        exit 1
    fi
}

# big_tree: the unpacked tree of the big image for mksquashfs and mkfs.erofs, as the Go
# tool's pipeline has it (skopeo copy, umoci unpack, the config as /etc/fsify-entrypoint),
# in $WORK/go/bundle/rootfs; the copied layout is removed again.
big_tree() {
    rm -rf "$WORK/go"
    mkdir -p "$WORK/go"
    skopeo copy -q "oci:$GEN_IMAGES/big:test" "oci:$WORK/go/img:latest"
    unpack_with_entrypoint "$WORK/go"
    rm -rf "$WORK/go/img"
}

bench_big() {
    local big=$GEN_IMAGES/big ref="docker://$REGISTRY/big:test" n p need=16
    for p in pigz igzip dpkg-deb; do
        command -v "$p" >/dev/null || { echo "bench.sh: $p not found (scripts/install-deps.sh)" >&2; exit 1; }
    done
    # The layout and its registry copy (2 x 1.2 GiB), the reference's copy, tree and image
    # (6.5 GiB) or fledge's cache and image (6.5 GiB), the unpacked tree and a read-only
    # image beside the cache; plus 2 GiB while the big image is generated.
    mkdir -p "$GEN_IMAGES"
    [ -f "$big/index.json" ] || need=$((need + 2))
    need_free_gib "$need" "$WORK" "the big series"
    if [ ! -f "$big/index.json" ]; then
        echo "generating the big image in $big (about 1-2 minutes)" >&2
        python3 "$SCRIPTS/lib/gen-big-image.py" "$big" "$IMAGES/cache/debootstrap-bookworm-minbase-amd64.tgz"
    fi
    for n in 300000 1000000; do
        small_image "$n"
    done
    registry_push "oci:$big:test" big:test
    FLOOR_LAYERS=$(layers_of big:test | tr '\n' ' ')
    FLOOR_REPO=big
    export FLOOR_LAYERS FLOOR_REPO
    fledge_config big "$ref"
    printf '[mappings]\n"map.txt" = "/etc/fledge-bench-map"\n' >>"$WORK/big.toml"
    readonly_config big-sqfs "$ref" squashfs
    readonly_config big-erofs "$ref" erofs
    if [ "${BIG_READONLY:-1}" = 1 ]; then big_tree; fi
    local root=$WORK/go/bundle/rootfs
    export root
    for _ in $(seq "$reps"); do
        measure reference-big bash -c 'reference_pipeline "$0"' "$ref"
        rm -rf "$WORK/ref" "$WORK/cache"
        date +%s%N >"$WORK/map.txt"
        measure fledge-big-cold bash -c 'fledge_build big "$WORK/cache"'
        rm -f "$WORK/out.img" "$WORK/out.manifest.json"
        date +%s%N >"$WORK/map.txt"
        measure fledge-big-warm bash -c 'fledge_build big "$WORK/cache"'
        FLOOR_BYTES=$(($(stat -c %b "$WORK/out.img") * 512))
        export FLOOR_BYTES
        rm -f "$WORK/out.img" "$WORK/out.manifest.json"
        for p in gzip pigz igzip; do
            measure "floor-$p" env FLOOR_GUNZIP="$p" bash -c floor
        done
        measure floor-write bash -c floor_write
        measure floor-sha256 bash -c floor_sha256
        if [ "${BIG_READONLY:-1}" = 1 ]; then
        rm -rf "$WORK/cache/squashfs"
        measure fledge-big-sqfs bash -c 'fledge_build_to big-sqfs "$WORK/cache" "$WORK/out.squashfs"'
        stat -c %s "$WORK/out.squashfs" >"$WORK/fledge-big-squashfs.size"
        rm -f "$WORK"/out.*
        measure mksquashfs-big bash -c 'mksquashfs "$root" "$WORK/go/out.squashfs" -comp xz -Xdict-size 50% -noappend -no-progress'
        stat -c %s "$WORK/go/out.squashfs" >"$WORK/mksquashfs-big.size"
        rm -f "$WORK/go/out.squashfs"
        measure fledge-big-erofs bash -c 'fledge_build_to big-erofs "$WORK/cache" "$WORK/out.erofs"'
        stat -c %s "$WORK/out.erofs" >"$WORK/fledge-big-erofs.size"
        rm -f "$WORK"/out.*
        measure mkfs-erofs-big bash -c 'mkfs.erofs "$WORK/go/out.erofs" "$root"'
        stat -c %s "$WORK/go/out.erofs" >"$WORK/mkfs-erofs-big.size"
        rm -rf "$WORK/go/out.erofs"
        fi
        rm -rf "$WORK/cache"
        for n in 300000 1000000; do
            measure "small-cold-$n" bash -c 'fledge_build "$0" "$WORK/cache"' "small-$n"
            rm -f "$WORK/out.img" "$WORK/out.manifest.json"
            measure "small-warm-$n" bash -c 'fledge_build "$0" "$WORK/cache"' "small-$n"
            rm -rf "$WORK/cache" "$WORK/out.img" "$WORK/out.manifest.json"
        done
    done
    rm -rf "$WORK/go"
    local fl best=
    for p in gzip pigz igzip; do
        if [ -z "$best" ] || awk -v a="$(med_time "floor-$p")" -v b="$(med_time "$best")" 'BEGIN {exit !(a < b)}'; then
            best=floor-$p
        fi
    done
    echo
    echo "== big: generated image ($(du -sh --apparent-size "$big/blobs" | cut -f1) compressed, 3 gzip layers," \
        "registry $ref) -> ext4, squashfs, EROFS; $reps repetitions"
    header
    row reference-big
    row fledge-big-cold reference-big "$best"
    row fledge-big-warm reference-big floor-write floor-sha256
    for fl in floor-gzip floor-pigz floor-igzip; do row "$fl" reference-big; done
    echo "floor = $best (the fastest of the three)"
    row floor-write reference-big
    row floor-sha256 reference-big
    echo "floor-write: the image's $((FLOOR_BYTES >> 20)) MiB (allocated) written durably by dd" \
        "(4 MiB O_DIRECT writes, fdatasync); floor-sha256: as many bytes hashed once (OpenSSL)"
    if [ "${BIG_READONLY:-1}" = 1 ]; then
        row mksquashfs-big
        row fledge-big-sqfs mksquashfs-big
        row mkfs-erofs-big
        row fledge-big-erofs mkfs-erofs-big
    fi
    for n in 300000 1000000; do
        row "small-cold-$n"
        row "small-warm-$n" "small-warm-300000"
    done
    if [ "${BIG_READONLY:-1}" = 1 ]; then
    echo "sizes (bytes):"
    printf "  %-40s %14s\n" "mksquashfs xz dict 50%, 128 KiB" "$(cat "$WORK/mksquashfs-big.size")" \
        "fledge squashfs xz (default)" "$(cat "$WORK/fledge-big-squashfs.size")" \
        "mkfs.erofs (uncompressed)" "$(cat "$WORK/mkfs-erofs-big.size")" \
        "fledge erofs (uncompressed)" "$(cat "$WORK/fledge-big-erofs.size")"
    fi
    echo "where the time goes (one more build each; cold = empty cache):"
    rm -rf "$WORK/cache"
    echo "  ext4 cold:"; STEPS_DISK=$WORK/big-disk.kib steps big "$WORK/cache" "$WORK/out.img"
    local cache_mib blobs_mib image_mib peak_mib
    cache_mib=$(du -sk "$WORK/cache" | awk '{printf "%.0f", $1 / 1024}')
    blobs_mib=$(du -sk "$WORK/cache/blobs" | awk '{printf "%.0f", $1 / 1024}')
    image_mib=$(du -k "$WORK/out.img" | awk '{printf "%.0f", $1 / 1024}')
    peak_mib=$(awk '{printf "%.0f", $1 / 1024}' "$WORK/big-disk.kib")
    date +%s%N >"$WORK/map.txt"
    echo "  ext4 warm:"; steps big "$WORK/cache" "$WORK/out.img"
    date +%s%N >"$WORK/map.txt"
    echo "  ext4 warm, FLEDGE_LOG=fledge::timing=debug:"
    FLEDGE_LOG=fledge::timing=debug "$FLEDGE" build -c "$WORK/big.toml" --cache-dir "$WORK/cache" \
        -o "$WORK/out.img" 2>&1 >/dev/null | sed 's/^/    /'
    rm -rf "$WORK/cache" "$WORK"/out.*
    echo "disk of the cold build above (its own files, sampled by lib/disk-peak.py): peak" \
        "$peak_mib MiB; after it the cache holds $cache_mib MiB ($blobs_mib MiB of downloaded blobs," \
        "the rest decoded layers) and the image $image_mib MiB (allocated); the disk column of" \
        "fledge-big-cold counts the whole filesystem, other writers included"
    echo "targets:"
    check "big warm / reference" "$(ratio fledge-big-warm reference-big)" "<=" 0.05
    echo "  (floor-write / reference: $(ratio floor-write reference-big), floor-sha256 / reference:" \
        "$(ratio floor-sha256 reference-big): the part of the warm target the disk and the hash alone take)"
    check "big cold / reference" "$(ratio fledge-big-cold reference-big)" "<=" 0.10
    check "big cold / floor ($best)" "$(ratio fledge-big-cold "$best")" "<=" 1.3
    check "1M cold peak RSS, process tree (MiB)" "$(max_mib small-cold-1000000 3)" "<=" 256
    check "1M warm peak RSS, process tree (MiB)" "$(max_mib small-warm-1000000 3)" "<=" 256
    check "1M cold / 300k cold" "$(ratio small-cold-1000000 small-cold-300000)" "<=" 3.6
    check "big cold disk peak, MiB (<= cache + image)" "$peak_mib" "<=" "$((cache_mib + image_mib))"
}

echo "machine: $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(free -g | awk '/Mem:/ {print $2}') GiB, Linux $(uname -r), $(findmnt -no FSTYPE -T /var/tmp) at /var/tmp; $(date -u '+%F %H:%M UTC')"
echo "fledge: $("$FLEDGE" version | head -1); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$what" != index ] && [ "$what" != squashfs ] && [ "$what" != qcow2 ]; then
    registry_start "$WORK/registry"
    registry_push "oci:$LAYOUT:test" debian:test
    echo "registry: docker-registry on $REGISTRY"
fi
case $what in
build) bench_build ;;
scale) bench_scale ;;
index) bench_index ;;
readonly) bench_readonly ;;
squashfs) bench_squashfs ;;
qcow2) bench_qcow2 ;;
initramfs) bench_initramfs ;;
big) bench_big ;;
all) bench_build; bench_scale; bench_readonly; bench_initramfs ;;
esac
echo
echo "disk = peak extra space used on the filesystem of /var/tmp during the command (median);"
echo "max RSS 1 proc = largest single process (time -f %M); tree RSS = sampled sum over the tree."

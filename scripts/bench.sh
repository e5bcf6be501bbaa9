#!/usr/bin/env bash
# Benchmarks, side by side with their baselines in the same run, reported as medians and ratios.
#
#   sudo scripts/bench.sh [-n REPS] [index|build|all]
#
#   index  fledge indexing the Debian test image cold (resolve, decode layers into an empty
#          cache, merge: `fledge inspect --tree`) against `umoci unpack` of the same image;
#          wall time and peak RSS of each.
#   build  ext4 image of the Debian test image: the reference pipeline of the existing tool
#          (skopeo copy, umoci unpack, du, mkfs, losetup, mount, cp -a, umount, e2fsck,
#          resize2fs, truncate) against `fledge build` cold (empty cache) and warm (layers
#          cached), and the floor (decompressing every layer to /dev/null, in parallel).
#
# Commands alternate within each repetition so that machine noise hits all of them alike.
# Needs root (loop devices for the reference pipeline). Uses the cached test image
# (scripts/make-test-images.sh) and target/release/fledge (built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

reps=5
while getopts "n:" opt; do
    case $opt in
    n) reps=$OPTARG ;;
    *) echo "usage: $0 [-n REPS] [index|build|all]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
what="${1:-all}"

[ "$(id -u)" -eq 0 ] || { echo "bench.sh: run as root" >&2; exit 1; }
IMAGES="${FLEDGE_TEST_IMAGES:-/var/tmp/fledge-test-images}"
scripts/make-test-images.sh >/dev/null
[ -x target/release/fledge ] || cargo build --release --quiet
FLEDGE="$PWD/target/release/fledge"
LAYOUT="$IMAGES/debian"
REF="oci:$LAYOUT:test"
WORK=$(mktemp -d /var/tmp/fledge-bench.XXXXXX)
cleanup() {
    for m in "$WORK"/ref/mnt; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done
    losetup -j "$WORK/ref/ref.img" 2>/dev/null | cut -d: -f1 | xargs -r losetup -d
    rm -rf "$WORK"
}
trap cleanup EXIT

# time_cmd NAME CMD...: run once, append "seconds maxrss_kib" to $WORK/NAME.times
time_cmd() {
    local name=$1
    shift
    sync
    /usr/bin/time -f "%e %M" -o "$WORK/t.out" "$@" >/dev/null 2>"$WORK/$name.err" || {
        echo "bench.sh: $name failed:" >&2
        cat "$WORK/$name.err" >&2
        exit 1
    }
    cat "$WORK/t.out" >>"$WORK/$name.times"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
med_time() { cut -d' ' -f1 "$WORK/$1.times" | median; }
max_rss_mib() { cut -d' ' -f2 "$WORK/$1.times" | sort -n | tail -1 | awk '{printf "%.0f", $1/1024}'; }

print_row() { # name baseline
    local t
    t=$(med_time "$1")
    if [ -n "${2:-}" ]; then
        printf "%-34s %9.2f s %9s MiB   %6.2fx of %s\n" "$1" "$t" "$(max_rss_mib "$1")" \
            "$(echo "$t / $(med_time "$2")" | bc -l)" "$2"
    else
        printf "%-34s %9.2f s %9s MiB\n" "$1" "$t" "$(max_rss_mib "$1")"
    fi
}

bench_index() {
    for _ in $(seq "$reps"); do
        rm -rf "$WORK/cache" "$WORK/bundle"
        time_cmd fledge-index-cold "$FLEDGE" inspect --tree --cache-dir "$WORK/cache" "$REF"
        time_cmd umoci-unpack umoci unpack --image "$LAYOUT:test" "$WORK/bundle"
        rm -rf "$WORK/bundle"
        time_cmd fledge-index-warm "$FLEDGE" inspect --tree --cache-dir "$WORK/cache" "$REF"
    done
    echo
    echo "== index: Debian test image, $reps repetitions, medians (peak RSS: max)"
    print_row umoci-unpack
    print_row fledge-index-cold umoci-unpack
    print_row fledge-index-warm umoci-unpack
}

# The existing tool's pipeline, step for step (reference-notes.md), from the OCI layout.
reference_pipeline() {
    local d=$WORK/ref buffer_kib=$((100 * 1024))
    rm -rf "$d"
    mkdir -p "$d/mnt"
    skopeo copy -q "oci:$LAYOUT:test" "oci:$d/img:latest"
    umoci unpack --image "$d/img:latest" "$d/bundle"
    local cfg
    cfg=$(python3 -c 'import json,sys; i=json.load(open(sys.argv[1]+"/index.json")); m=json.load(open(sys.argv[1]+"/blobs/sha256/"+i["manifests"][0]["digest"][7:])); print(m["config"]["digest"][7:])' "$d/img")
    cp "$d/img/blobs/sha256/$cfg" "$d/bundle/rootfs/etc/fsify-entrypoint"
    local du_kib
    du_kib=$(du -sk "$d/bundle/rootfs" | cut -f1)
    truncate -s $(((du_kib + buffer_kib) * 1024)) "$d/ref.img"
    mkfs.ext4 -F -q "$d/ref.img"
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
export -f reference_pipeline
export LAYOUT WORK

floor() {
    # Read every layer blob and decompress it to /dev/null, all layers at once.
    python3 - "$LAYOUT" <<'PY'
import json, subprocess, sys
root = sys.argv[1]
idx = json.load(open(f"{root}/index.json"))
m = json.load(open(f"{root}/blobs/sha256/" + idx["manifests"][0]["digest"][7:]))
procs = []
for l in m["layers"]:
    blob = f"{root}/blobs/sha256/" + l["digest"][7:]
    mt = l["mediaType"]
    cmd = ["zstd", "-dc", blob] if "zstd" in mt else (["gzip", "-dc", blob] if "gzip" in mt else ["cat", blob])
    procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
sys.exit(max(p.wait() for p in procs))
PY
}
export -f floor

bench_build() {
    cat >"$WORK/fledge.toml" <<EOF
version = "1"
strategy = "oci_rootfs"
[source]
image = "$REF"
[filesystem]
type = "ext4"
size_buffer_mb = 100
EOF
    for _ in $(seq "$reps"); do
        time_cmd reference-pipeline bash -c reference_pipeline
        rm -rf "$WORK/ref"
        rm -rf "$WORK/cache"
        time_cmd fledge-build-cold "$FLEDGE" build -q -c "$WORK/fledge.toml" \
            --cache-dir "$WORK/cache" -o "$WORK/out.img"
        time_cmd fledge-build-warm "$FLEDGE" build -q -c "$WORK/fledge.toml" \
            --cache-dir "$WORK/cache" -o "$WORK/out.img"
        time_cmd floor bash -c floor
    done
    echo
    echo "== build: Debian test image -> ext4, $reps repetitions, medians (peak RSS: max)"
    print_row reference-pipeline
    print_row fledge-build-cold reference-pipeline
    print_row fledge-build-warm reference-pipeline
    print_row floor
    print_row fledge-build-cold floor
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r); $(date -u +%F)"
echo "fledge: $("$FLEDGE" version)"
case $what in
index) bench_index ;;
build) bench_build ;;
all) bench_index; bench_build ;;
*) echo "usage: $0 [-n REPS] [index|build|all]" >&2; exit 2 ;;
esac

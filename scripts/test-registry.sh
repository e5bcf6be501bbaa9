#!/usr/bin/env bash
# Start a throw-away docker-registry on 127.0.0.1, push the Debian test image to it with
# skopeo, and time pulling it: fledge cold (empty cache), fledge cached, and
# `skopeo copy docker://... oci:DIR` in the same run.
#
# Usage: scripts/test-registry.sh [FLEDGE_BINARY] [ROUNDS]
# Needs: docker-registry, skopeo, and the test image from scripts/make-test-images.sh.
set -euo pipefail
fledge=${1:-target/release/fledge}
rounds=${2:-3}
images=${FLEDGE_TEST_IMAGES:-/var/tmp/fledge-test-images}
src="oci:$images/debian:test"
for p in docker-registry skopeo "$fledge"; do
    command -v "$p" >/dev/null || { echo "test-registry: $p not found" >&2; exit 1; }
done
work=$(mktemp -d)
# shellcheck source=lib/registry.sh
. "$(dirname "$0")/lib/registry.sh"
trap 'registry_stop; rm -rf "$work"' EXIT
registry_start "$work/registry"
ref="$REGISTRY/debian:test"
registry_push "$src" debian:test
size=$(du -sb "$work/registry/storage" | cut -f1)
echo "registry $REGISTRY holds debian:test ($((size / 1024 / 1024)) MiB stored)"

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }
export DOCKER_HOST="unix://$work/no-daemon.sock"
for r in $(seq "$rounds"); do
    rm -rf "$work/cache" "$work/oci"
    t0=$(now); "$fledge" -q pull "docker://$ref" --cache-dir "$work/cache"; t1=$(now)
    "$fledge" -q pull "docker://$ref" --cache-dir "$work/cache"; t2=$(now)
    skopeo copy --quiet --src-tls-verify=false "docker://$ref" "oci:$work/oci:test"; t3=$(now)
    # fledge also decompresses every layer into its cache: that part alone, from the layout
    # skopeo just wrote, for comparison.
    rm -rf "$work/cache2"
    "$fledge" -q pull "oci:$work/oci:test" --cache-dir "$work/cache2"; t4=$(now)
    echo "round $r: fledge cold $(elapsed "$t0" "$t1")s, fledge cached $(elapsed "$t1" "$t2")s, skopeo copy to oci $(elapsed "$t2" "$t3")s, fledge decode-only from that oci $(elapsed "$t3" "$t4")s"
done

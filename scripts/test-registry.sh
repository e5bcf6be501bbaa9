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
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/config.yml" <<CFG
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/storage
http:
  addr: 127.0.0.1:$port
CFG
docker-registry serve "$work/config.yml" >"$work/registry.log" 2>&1 &
reg_pid=$!
trap 'kill $reg_pid 2>/dev/null; wait $reg_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
ref="127.0.0.1:$port/debian:test"
skopeo copy --quiet --dest-tls-verify=false "$src" "docker://$ref"
size=$(du -sb "$work/storage" | cut -f1)
echo "registry 127.0.0.1:$port holds debian:test ($((size / 1024 / 1024)) MiB stored)"

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

# Shared helper (sourced, not run): a throw-away `docker-registry` on 127.0.0.1 for the
# registry tests and the benchmark.
#
#   registry_start DIR        serve from DIR/storage on a free port; sets REGISTRY_PORT,
#                             REGISTRY_PID, REGISTRY (= 127.0.0.1:PORT)
#   registry_push SRC NAME    skopeo copy SRC (e.g. oci:/path:tag) to docker://$REGISTRY/NAME
#   registry_stop             stop the server started by registry_start (idempotent)
#
# The caller owns DIR and removes it; registry_stop only ends the server process.

registry_start() {
    local dir=$1
    command -v docker-registry >/dev/null || { echo "registry: docker-registry not found" >&2; return 1; }
    mkdir -p "$dir/storage"
    REGISTRY_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    REGISTRY="127.0.0.1:$REGISTRY_PORT"
    cat >"$dir/config.yml" <<CFG
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
http:
  addr: $REGISTRY
CFG
    docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
    REGISTRY_PID=$!
    local _
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$REGISTRY_PORT") 2>/dev/null; then
            return 0
        fi
        kill -0 "$REGISTRY_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "registry: docker-registry did not start on $REGISTRY:" >&2
    cat "$dir/registry.log" >&2
    registry_stop
    return 1
}

registry_push() {
    skopeo copy --quiet --dest-tls-verify=false "$1" "docker://$REGISTRY/$2"
}

registry_stop() {
    if [ -n "${REGISTRY_PID:-}" ]; then
        kill "$REGISTRY_PID" 2>/dev/null || true
        wait "$REGISTRY_PID" 2>/dev/null || true
        REGISTRY_PID=
    fi
}

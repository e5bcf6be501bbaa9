# shellcheck shell=bash
# Shared helper (sourced, not run): a throw-away `docker-registry` on 127.0.0.1 for the
# registry tests and the benchmark.
#
#   registry_start DIR        serve from DIR/storage on a port the kernel picks; sets
#                             REGISTRY_PORT, REGISTRY_PID, REGISTRY (= 127.0.0.1:PORT)
#   registry_push SRC NAME    skopeo copy SRC (e.g. oci:/path:tag) to docker://$REGISTRY/NAME
#   registry_stop             stop the server started by registry_start (idempotent)
#
# The caller owns DIR and removes it; registry_stop only ends the server process.
#
# Other registries may start at the same time (parallel tests, other builds): a port looked
# up as free and then handed to the server could be taken by another one in between, and a
# check that only connects would find that one. So the registry binds port 0 itself and logs
# the port it was given, and that port must answer with a secret header written into this
# registry's config.

registry_start() {
    local dir=$1 instance _
    command -v docker-registry >/dev/null || { echo "registry: docker-registry not found" >&2; return 1; }
    mkdir -p "$dir/storage"
    instance=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    # log level info: the line naming the bound address is an info line
    cat >"$dir/config.yml" <<CFG
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
http:
  addr: 127.0.0.1:0
  secret: $instance
  headers:
    X-Fledge-Test-Instance: [$instance]
CFG
    docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
    REGISTRY_PID=$!
    REGISTRY_PORT=
    for _ in $(seq 300); do
        kill -0 "$REGISTRY_PID" 2>/dev/null || break
        REGISTRY_PORT=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9][0-9]*\)[^0-9].*/\1/p' \
            "$dir/registry.log" | head -n 1)
        [ -n "$REGISTRY_PORT" ] && break
        sleep 0.1
    done
    if [ -n "$REGISTRY_PORT" ]; then
        REGISTRY="127.0.0.1:$REGISTRY_PORT"
        if registry_answers_as "$REGISTRY_PORT" "$instance"; then
            return 0
        fi
        echo "registry: $REGISTRY does not answer as the registry just started" >&2
    else
        echo "registry: docker-registry exited or logged no listening address:" >&2
    fi
    cat "$dir/registry.log" >&2
    registry_stop
    return 1
}

# registry_answers_as PORT INSTANCE: whether GET /v2/ on 127.0.0.1:PORT carries INSTANCE in
# X-Fledge-Test-Instance (tried for up to 10 s while nothing answers).
registry_answers_as() {
    local port=$1 instance=$2 reply _
    for _ in $(seq 100); do
        # HTTP/1.0: the server closes the connection after its answer.
        if reply=$(exec 3<>"/dev/tcp/127.0.0.1/$port" \
            && printf 'GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 \
            && timeout 5 cat <&3) 2>/dev/null && [ -n "$reply" ]; then
            tr -d '\r' <<<"$reply" | grep -qix "X-Fledge-Test-Instance: $instance"
            return
        fi
        sleep 0.1
    done
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

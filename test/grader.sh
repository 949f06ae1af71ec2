# The test grader server for the demo and benchmarks (source this file).
#   grader_server_start [flags...]  start test/grader-server/server.js on a free
#                                   127.0.0.1 port; exports RBR_TEST_GRADER_URL
#   grader_server_stop              stop it (by its pid)

grader_server_start() {
    RBR_GRADER_SERVER_DIR=$(mktemp -d /tmp/rbr-grader.XXXXXX)
    node "$(dirname "${BASH_SOURCE[0]}")/grader-server/server.js" --port 0 \
        --pid-file "$RBR_GRADER_SERVER_DIR/pid" "$@" >"$RBR_GRADER_SERVER_DIR/out" 2>&1 &
    RBR_GRADER_SERVER_PID=$!
    for _ in $(seq 1 100); do
        grep -q "listening on" "$RBR_GRADER_SERVER_DIR/out" 2>/dev/null && break
        kill -0 "$RBR_GRADER_SERVER_PID" 2>/dev/null || { cat "$RBR_GRADER_SERVER_DIR/out" >&2; return 1; }
        sleep 0.1
    done
    local port
    port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$RBR_GRADER_SERVER_DIR/out")
    [ -n "$port" ] || { echo "test grader server did not start" >&2; return 1; }
    export RBR_TEST_GRADER_URL="http://127.0.0.1:$port/v1" RBR_GRADER_SERVER_PID RBR_GRADER_SERVER_DIR
    echo "rbr: test grader server on $RBR_TEST_GRADER_URL (pid $RBR_GRADER_SERVER_PID)"
}

grader_server_stop() {
    [ -n "${RBR_GRADER_SERVER_PID:-}" ] || return 0
    kill "$RBR_GRADER_SERVER_PID" 2>/dev/null || true
    wait "$RBR_GRADER_SERVER_PID" 2>/dev/null || true
    rm -rf "${RBR_GRADER_SERVER_DIR:-/nonexistent}"
    unset RBR_GRADER_SERVER_PID
}

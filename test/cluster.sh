# Throwaway PostgreSQL cluster for tests and the demo (source this file).
# RBR_PG_CONFIG selects the PostgreSQL installation (default: Debian's 15),
# RBR_TEST_PORT the port.
# It runs as a non-root user (postgres when we are root) on a private socket
# directory and port, and cluster_stop removes it whatever happened.
#   cluster_start    initdb + start; exports PGHOST, PGPORT, PGUSER, PGDATABASE
#   cluster_stop     stop immediately and delete the directory
#   cluster_psql     psql with ON_ERROR_STOP, quiet

RBR_PG_CONFIG=${RBR_PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
RBR_PGBIN=$("$RBR_PG_CONFIG" --bindir)
RBR_TEST_PORT=${RBR_TEST_PORT:-55432}

cluster_as() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cluster_start() {
    RBR_CLUSTER_DIR=$(mktemp -d /tmp/rbr-cluster.XXXXXX)
    export RBR_CLUSTER_DIR
    chmod 755 "$RBR_CLUSTER_DIR"
    [ "$(id -u)" = 0 ] && chown postgres: "$RBR_CLUSTER_DIR"
    local owner; owner=$( [ "$(id -u)" = 0 ] && echo postgres || id -un )
    cluster_as "$RBR_PGBIN/initdb" -D "$RBR_CLUSTER_DIR/data" -U "$owner" --auth=trust \
        -E UTF8 --locale=C >"$RBR_CLUSTER_DIR/initdb.log" 2>&1 \
        || { cat "$RBR_CLUSTER_DIR/initdb.log" >&2; return 1; }
    cat >>"$RBR_CLUSTER_DIR/data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$RBR_CLUSTER_DIR'
port = $RBR_TEST_PORT
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 40
shared_buffers = 256MB
work_mem = 64MB
log_min_messages = warning
log_line_prefix = '%m [%p] '
# the recommended set-up (doc/configuration.md): rbr preloaded
shared_preload_libraries = 'rbr'
CONF
    cluster_as "$RBR_PGBIN/pg_ctl" -D "$RBR_CLUSTER_DIR/data" -l "$RBR_CLUSTER_DIR/server.log" \
        -w -t 60 start >/dev/null || { cat "$RBR_CLUSTER_DIR/server.log" >&2; return 1; }
    export PGHOST="$RBR_CLUSTER_DIR" PGPORT="$RBR_TEST_PORT" PGUSER="$owner" PGDATABASE=postgres
    echo "rbr: throwaway cluster on socket $PGHOST port $PGPORT (user $PGUSER)"
}

cluster_stop() {
    [ -n "${RBR_CLUSTER_DIR:-}" ] && [ -d "$RBR_CLUSTER_DIR" ] || return 0
    cluster_as "$RBR_PGBIN/pg_ctl" -D "$RBR_CLUSTER_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$RBR_CLUSTER_DIR"
    unset RBR_CLUSTER_DIR
}

cluster_psql() {
    "$RBR_PGBIN/psql" -X -q -v ON_ERROR_STOP=1 "$@"
}

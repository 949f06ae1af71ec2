#!/usr/bin/env bash
# Grader throughput: requests/second of rbr_grade_many against requests in
# flight (rbr.grader_max_in_flight) at a fixed server latency, compared with
# the ideal in_flight / latency; backend CPU per request; a serial per-row
# loop (SELECT rbr_grade(...) per row); and, at each level, the client a user
# would write with the official openai npm package (test/bench/peer: the same
# request bodies, taken from rbr_grader_request(), the same concurrency), with
# its CPU per request from process.cpuUsage().
#
#   test/bench/grader_throughput.sh [latency_ms=50] [requests_per_slot=20] [levels="1 16 64 256"]
#
# Needs a running cluster with rbr installed (PGHOST/PGPORT/PGUSER as set by
# test/cluster.sh) and node; the peer needs `npm install` in test/bench/peer
# once (skipped with a note otherwise). Uses a scratch database rbr_bench.
set -euo pipefail
cd "$(dirname "$0")/../.."
lat=${1:-50}
per=${2:-20}
levels=${3:-"1 16 64 256"}
ref=$(cd .. && pwd)/shared/reference
log=$(mktemp /tmp/rbr-bench.XXXXXX)
bodies=$(mktemp /tmp/rbr-bench-bodies.XXXXXX)
peer=test/bench/peer

node test/grader-server/server.js --port 0 --latency-ms "$lat" >"$log" 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null; rm -f "$log" "$bodies"' EXIT
for _ in $(seq 50); do grep -q listening "$log" && break; sleep 0.1; done
port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$log")
url="http://127.0.0.1:$port/v1"

psql -X -q -d postgres -c "DROP DATABASE IF EXISTS rbr_bench" -c "CREATE DATABASE rbr_bench"
psql -X -q -At -d rbr_bench -v spec="$(cat "$ref/policy.json")" >/dev/null <<'SQL'
CREATE EXTENSION rbr;
SELECT rbr_policy_load('ref', :'spec'::jsonb);
SQL

# Run SQL in one session; print "seconds cpu_seconds" of the last statement.
timed() {
    local sql=$1
    psql -X -q -At -d rbr_bench <<SQL | awk '/^Time:/ {t=$2/1000} /^cpu / {c[n++]=$2} END {printf "%.3f %.3f\n", t, c[1]-c[0]}'
SET rbr.grader_url = '$url';
SET rbr.grader_timeout_ms = 600000;
$2
SELECT 'cpu ' || ((split_part(s, ' ', 14)::bigint + split_part(s, ' ', 15)::bigint) / 100.0) FROM pg_read_file('/proc/self/stat') s;
\timing on
$sql
\timing off
SELECT 'cpu ' || ((split_part(s, ' ', 14)::bigint + split_part(s, ' ', 15)::bigint) / 100.0) FROM pg_read_file('/proc/self/stat') s;
SQL
}

# the peer's request bodies: exactly what rbr sends
maxn=100
for c in $levels; do [ $((c * per)) -gt "$maxn" ] && maxn=$((c * per)); done
psql -X -q -At -d rbr_bench -c "SELECT rbr_grader_request('ref', 'apology', '\"q\"', 'peer ' || i || ' [[rbr apology=0.5]]')::text FROM generate_series(1, $maxn) i" >"$bodies"
if [ -d "$peer/node_modules/openai" ]; then have_peer=1; else have_peer=0; fi

echo "server latency ${lat} ms; command: $0 $lat $per \"$levels\""
printf '%-22s %9s %8s %10s %10s %8s %12s\n' client in_flight requests seconds req/s ideal "cpu ms/req"
for c in $levels; do
    n=$((c * per)); [ "$n" -lt 100 ] && n=100
    model="bench-$c-$$-$RANDOM"          # a fresh model: no cache hits
    read -r secs cpu < <(timed "SELECT count(*) FROM rbr_grade_many('ref', array_fill('apology'::text, ARRAY[$n]), array_fill('\"q\"'::jsonb, ARRAY[$n]), ARRAY(SELECT 'bench ' || i || ' [[rbr apology=0.5]]' FROM generate_series(1, $n) i));" \
        "SET rbr.grader_max_in_flight = $c; SET rbr.grader_model = '$model';")
    awk -v c="$c" -v n="$n" -v s="$secs" -v cpu="$cpu" -v lat="$lat" 'BEGIN {
        r = n / s; ideal = c * 1000 / lat;
        printf "%-22s %9d %8d %10.2f %10.1f %8.1f %12.3f  (%.0f%% of ideal)\n", "rbr_grade_many", c, n, s, r, ideal, cpu * 1000 / n, 100 * r / ideal }'
    if [ "$have_peer" = 1 ]; then
        node "$peer/peer.mjs" --base-url "$url" --bodies "$bodies" --c "$c" --n "$n" | awk -v lat="$lat" '{
            for (i = 1; i < NF; i++) v[$i] = $(i + 1)
            c = v["in_flight"]; n = v["requests"]; s = v["seconds"]; ideal = c * 1000 / lat
            printf "%-22s %9d %8d %10.2f %10.1f %8.1f %12.3f  (%.0f%% of ideal)\n", $2, c, n, s, n / s, ideal, v["cpu_ms_per_req"], 100 * n / s / ideal }'
    fi
done
[ "$have_peer" = 1 ] || echo "(peer client skipped: run 'npm install' in $peer)"

# serial per-row loop: one rbr_grade() call per row
n=100
read -r secs cpu < <(timed "SELECT count(rbr_grade('ref', 'apology', '\"q\"', 'serial ' || i || ' [[rbr apology=0.5]]')) FROM generate_series(1, $n) i;" \
    "SET rbr.grader_model = 'serial-$$-$RANDOM';")
awk -v n="$n" -v s="$secs" -v cpu="$cpu" -v lat="$lat" 'BEGIN {
    printf "%-22s %9d %8d %10.2f %10.1f %8.1f %12.3f\n", "serial rbr_grade loop", 1, n, s, n / s, 1000 / lat, cpu * 1000 / n }'

# the test server's own load generator (Node http, keep-alive, no SDK): what the server can take
for c in 64 256; do
    n=$((c * per))
    echo "node loadtest.js --c $c --n $n:"
    node test/grader-server/loadtest.js --port "$port" --n "$n" --c "$c" \
         --policy "$ref/policy.json" --gold "$ref/gold_train.jsonl" 2>&1 | sed 's/^/    /'
done
psql -X -q -d postgres -c "DROP DATABASE rbr_bench"

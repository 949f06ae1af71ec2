#!/usr/bin/env bash
# Grader memory over a long run: one backend sends TOTAL distinct grader
# requests (rbr_grade_many in batches of BATCH, each its own transaction,
# through the cache: every request misses it, goes to the network and its
# answer is inserted) to the test grader at 0 ms latency, and after every
# batch prints the backend's memory from /proc/<pid>/status (read with
# pg_read_file as superuser): VmRSS, RssAnon (private memory: what a leak
# grows), RssShmem (shared buffers this backend has touched; grows with the
# cache table and is not private), VmHWM (peak RSS), and the bytes held by
# its memory contexts (pg_backend_memory_contexts).
#
#   test/bench/grader_memory.sh [total=1000000] [batch=10000] [in_flight=64]
#
# Needs a running cluster with rbr installed (PGHOST/PGPORT/PGUSER as set by
# test/cluster.sh, a superuser) and node. Uses a scratch database rbr_mem.
set -euo pipefail
cd "$(dirname "$0")/../.."
total=${1:-1000000}
batch=${2:-10000}
inflight=${3:-64}
ref=$(cd .. && pwd)/shared/reference
log=$(mktemp /tmp/rbr-mem.XXXXXX)

node test/grader-server/server.js --port 0 --latency-ms 0 >"$log" 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 50); do grep -q listening "$log" && break; sleep 0.1; done
port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$log")

psql -X -q -d postgres -c "DROP DATABASE IF EXISTS rbr_mem" -c "CREATE DATABASE rbr_mem"
psql -X -q -At -d rbr_mem -c "CREATE EXTENSION rbr" \
     -c "SELECT rbr_policy_load('ref', pg_read_file('$ref/policy.json')::jsonb)" >/dev/null

echo "command: $0 $total $batch $inflight (server latency 0 ms, cache on, distinct requests)"
nb=$(( (total + batch - 1) / batch ))
{
    cat <<SQL
SET rbr.grader_url = 'http://127.0.0.1:$port/v1';
SET rbr.grader_max_in_flight = $inflight;
CREATE TEMP VIEW mem AS
  SELECT (regexp_match(s, 'VmRSS:\s+(\d+)'))[1]::bigint AS rss_kb,
         (regexp_match(s, 'RssAnon:\s+(\d+)'))[1]::bigint AS anon_kb,
         (regexp_match(s, 'RssShmem:\s+(\d+)'))[1]::bigint AS shmem_kb,
         (regexp_match(s, 'VmHWM:\s+(\d+)'))[1]::bigint AS hwm_kb,
         (SELECT (sum(total_bytes) / 1024)::bigint FROM pg_backend_memory_contexts) AS contexts_kb
    FROM pg_read_file('/proc/self/status') s;
CREATE TEMP TABLE t0 AS SELECT clock_timestamp() AS t;
\\pset footer off
SELECT 'requests', 'seconds', 'ok', 'VmRSS_kB', 'RssAnon_kB', 'RssShmem_kB', 'VmHWM_kB', 'contexts_kB';
SELECT 0, 0, 0, rss_kb, anon_kb, shmem_kb, hwm_kb, contexts_kb FROM mem;
SQL
    for b in $(seq 1 "$nb"); do
        n=$batch; [ $((b * batch)) -gt "$total" ] && n=$((total - (b - 1) * batch))
        cat <<SQL
SELECT count(*) FILTER (WHERE status = 'ok') AS ok FROM rbr_grade_many('ref', array_fill('apology'::text, ARRAY[$n]),
       array_fill('"q"'::jsonb, ARRAY[$n]), ARRAY(SELECT 'mem $b-' || i || ' [[rbr apology=0.5]]' FROM generate_series(1, $n) i)) \\gset
SELECT $(( (b - 1) * batch + n )), round(extract(epoch FROM clock_timestamp() - t)::numeric, 1), :ok,
       rss_kb, anon_kb, shmem_kb, hwm_kb, contexts_kb FROM mem, t0;
SQL
    done
    echo "SELECT 'grader stats', rbr_grader_stats()->>'requests', rbr_grader_stats()->>'live_easy_handles';"
} | psql -X -q -At -F ' ' -v ON_ERROR_STOP=1 -d rbr_mem | column -t
psql -X -q -d postgres -c "DROP DATABASE rbr_mem"

#!/usr/bin/env bash
# Batch mode's own cost in the database: wall time of rbr_featurize online and of the two calls
# of batch mode (submit; collect and write), against the test grader with no latency, and the
# disk the bookkeeping takes while the lines are in flight (rbr.batch_line, bodies included).
#
#   test/bench/batch_overhead.sh [rows=1000]
#
# Needs a running cluster with rbr installed (PGHOST/PGPORT/PGUSER as set by test/cluster.sh)
# and node. Uses a scratch database rbr_bench_batch.
set -euo pipefail
cd "$(dirname "$0")/../.."
rows=${1:-1000}
ref=$(cd .. && pwd)/shared/reference
log=$(mktemp /tmp/rbr-bench.XXXXXX)

node test/grader-server/server.js --port 0 >"$log" 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 50); do grep -q listening "$log" && break; sleep 0.1; done
port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$log")
base="http://127.0.0.1:$port"

psql -X -q -d postgres -c "DROP DATABASE IF EXISTS rbr_bench_batch" -c "CREATE DATABASE rbr_bench_batch"
psql -X -q -At -d rbr_bench_batch -v spec="$(cat "$ref/policy.json")" >/dev/null <<SQL
CREATE EXTENSION rbr;
SELECT rbr_policy_load('ref', :'spec'::jsonb);
CREATE TABLE t_online (id int PRIMARY KEY, prompt jsonb, completion text, response_type text);
INSERT INTO t_online SELECT i, jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'question ' || i)),
  'answer number ' || i, (ARRAY['hard_refuse', 'comply', 'safe_refuse_1', 'safe_refuse_2'])[1 + i % 4]
  FROM generate_series(1, $rows) i;
CREATE TABLE t_batch AS SELECT * FROM t_online; ALTER TABLE t_batch ADD PRIMARY KEY (id);
SQL

# seconds of one CALL
timed() {
    psql -X -q -At -d rbr_bench_batch <<SQL | awk '/^Time:/ {printf "%.2f\n", $2 / 1000}'
SET rbr.grader_url = '$base/v1';
SET client_min_messages = warning;
SET rbr.grader_model = '$1';
\timing on
$2
SQL
}

echo "command: $0 $rows"
t_on=$(timed m-online "CALL rbr_featurize('t_online', 'ref')")
values=$(psql -X -At -d rbr_bench_batch -c "SELECT count(*) FROM t_online_grades")
curl -s -XPOST "$base/admin/batch/config" -d '{"delay_ms": 3000}' >/dev/null
t_sub=$(timed m-batch "CALL rbr_featurize('t_batch', 'ref', '{\"mode\": \"batch\"}')")
read -r lines bytes < <(psql -X -At -F ' ' -d rbr_bench_batch -c \
    "SELECT count(*), pg_total_relation_size('rbr.batch_line') FROM rbr.batch_line WHERE state = 'submitted'")
# until the test grader has answered every line and the delay has passed
for _ in $(seq 600); do
    curl -s "$base/v1/batches?limit=1" | grep -q '"status":"completed"' && break
    sleep 0.5
done
t_col=$(timed m-batch "CALL rbr_featurize('t_batch', 'ref', '{\"mode\": \"batch\"}')")
after=$(psql -X -At -d rbr_bench_batch -c "SELECT pg_total_relation_size('rbr.batch_line')")
same=$(psql -X -At -d rbr_bench_batch -c "SELECT count(*) FROM t_online_grades a JOIN t_batch_grades b USING (id, proposition) WHERE a.probability = b.probability")
printf '%-40s %10s\n' "rows / values graded" "$rows / $values"
printf '%-40s %10s s\n' "online rbr_featurize (server latency 0)" "$t_on"
printf '%-40s %10s s\n' "batch mode, submitting call" "$t_sub"
printf '%-40s %10s s\n' "batch mode, collecting call" "$t_col"
printf '%-40s %10s\n' "lines in flight" "$lines"
awk -v b="$bytes" -v n="$lines" 'BEGIN { printf "%-40s %10d B (%d B per line)\n", "rbr.batch_line while in flight", b, b / n }'
printf '%-40s %10s B\n' "rbr.batch_line once applied" "$after"
printf '%-40s %10s\n' "values equal to online" "$same"
psql -X -q -d postgres -c "DROP DATABASE rbr_bench_batch"

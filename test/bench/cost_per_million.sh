#!/usr/bin/env bash
# Cost per million completions: grade a sample of completions against the
# paper's policy (../shared/reference/policy.json) through the test grader
# and print, per mode, the requests, prompt / completion / cached prompt
# tokens and wall time per completion, scaled to a million completions, and
# what that costs at the prices given (inputs: the user's prices, per million
# tokens; 0 by default). The test grader counts tokens as characters / 4 and
# simulates a provider prefix cache (1024 tokens, then steps of 128, as
# OpenAI documents automatic prompt caching).
#
#   test/bench/cost_per_million.sh [rows=1000] [price_input=0] [price_cached_input=0] [price_output=0] [latency_ms=0] [batch_factor=0.5]
#
# batch_factor: the share of the online price a batch token costs (OpenAI and
# Azure OpenAI bill Batch API tokens at half price: 0.5; pass your provider's).
#
# Modes: (a) online: CALL rbr_featurize on rows never graded; (b) cached
# rerun: the same rows again in a fresh table (everything from rbr's cache);
# (c) batch: {"mode": "batch", "wait": true} on rows never graded, when the
# option exists ("batch mode not available" otherwise). Also the dry run's
# estimate of (a) against what (a) then sent.
#
# Needs a running cluster with rbr installed (PGHOST/PGPORT/PGUSER as set by
# test/cluster.sh) and node. Uses a scratch database rbr_bench_cost.
set -euo pipefail
cd "$(dirname "$0")/../.."
rows=${1:-1000}
p_in=${2:-0}
p_cached=${3:-0}
p_out=${4:-0}
lat=${5:-0}
bf=${6:-0.5}
ref=$(cd .. && pwd)/shared/reference
log=$(mktemp /tmp/rbr-bench-cost.XXXXXX)

node test/grader-server/server.js --port 0 --latency-ms "$lat" --labels "$ref/gold_train.jsonl" >"$log" 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 50); do grep -q listening "$log" && break; sleep 0.1; done
port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$log")
base="http://127.0.0.1:$port"
curl -s -X POST -H 'content-type: application/json' \
     -d '{"prefix_cache": true, "prefix_cache_min_tokens": 1024, "prefix_cache_step_tokens": 128}' \
     "$base/admin/config" >/dev/null

db=rbr_bench_cost
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
psql -X -q -At -v ON_ERROR_STOP=1 -d $db -v spec="$(cat "$ref/policy.json")" >/dev/null <<SQL
CREATE EXTENSION rbr;
SELECT rbr_policy_load('ref', :'spec'::jsonb);
CREATE TEMP TABLE raw (line jsonb);
\copy raw FROM '$ref/gold_train.jsonl' WITH (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')
CREATE TABLE gold AS SELECT row_number() OVER () AS gid, line FROM raw;
-- rows sample completions: the gold rows in turn, each completion made unique
-- by a suffix naming its set (a, b: never graded before; c: batch)
CREATE FUNCTION mk(t text, tag text) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
    EXECUTE format('CREATE TABLE %I (id int PRIMARY KEY, response_type text, prompt jsonb, completion text)', t);
    EXECUTE format('INSERT INTO %I SELECT i, g.line->>''response_type'', g.line->''prompt'','
                   ' (g.line->''completion''->0->>''content'') || '' ['' || \$1 || i || '']'''
                   ' FROM generate_series(1, \$2) i JOIN gold g ON g.gid = (i - 1) %% 351 + 1', t)
        USING tag, $rows;
END
\$\$;
SELECT mk('sample_a', 'a'), mk('sample_b', 'a'), mk('sample_c', 'c');
SQL

q() { psql -X -q -At -v ON_ERROR_STOP=1 -d $db <<<"SET rbr.grader_url = '$base/v1'; SET rbr.grader_timeout_ms = 600000; SET client_min_messages = warning; SET rbr.batch_poll_seconds = 0.5; $1"; }
results=$(mktemp /tmp/rbr-bench-cost-res.XXXXXX)
trap 'kill $srv 2>/dev/null; rm -f "$log" "$results"' EXIT

# one mode: CALL on a table, record the run's counters and the wall time
run_mode() {
    local mode=$1 table=$2 opts=$3 t0 t1 out
    curl -s -X POST "$base/admin/reset" -d '{}' >/dev/null
    t0=$(date +%s.%N)
    if ! out=$(q "CALL rbr_featurize('$table', 'ref', '$opts')" 2>&1); then
        if grep -q "unknown rbr_featurize option" <<<"$out"; then
            echo "$mode batch mode not available"
            return
        fi
        echo "$mode failed: $out" >&2
        return
    fi
    t1=$(date +%s.%N)
    local sent
    sent=$(curl -s "$base/admin/stats" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s);console.log(j.chat_requests)})')
    q "SELECT '$mode', $rows, sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens),
              round(($t1 - $t0)::numeric, 2), $sent
         FROM rbr.featurize_progress WHERE source = '$table'::regclass" | tr '|' ' ' >>"$results"
}

echo "command: $0 $rows $p_in $p_cached $p_out $lat $bf"
echo "rows: $rows completions of the 351 gold rows, policy ../shared/reference/policy.json, grader settings as installed"
echo "prices (inputs, per million tokens): input $p_in, cached input $p_cached, output $p_out; server latency $lat ms; batch tokens at $bf of these prices"
t0=$(date +%s.%N)
est=$(q "SELECT missing, cached, requests, prompt_tokens, completion_tokens FROM rbr_featurize_estimate('sample_a', 'ref')")
est_secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}')
run_mode a_online sample_a '{}'
run_mode b_cached_rerun sample_b '{}'
batch=$(run_mode c_batch sample_c '{"mode": "batch", "wait": true}')
[ -n "$batch" ] && echo "$batch"

IFS='|' read -r e_missing e_cached e_req e_pt e_ct <<<"$est"
read -r _ _ a_req a_pt a_ct _ _ _ < <(grep '^a_online' "$results")
echo
echo "dry run of (a), ${est_secs} s: $e_missing values missing, $e_cached from the cache, $e_req requests, ~$e_pt prompt tokens, <= $e_ct completion tokens"
echo "(a) sent:       $a_req requests, $a_pt prompt tokens, $a_ct completion tokens (estimator error $(awk -v e="$e_pt" -v a="$a_pt" 'BEGIN {printf "%+.2f%%", a ? 100 * (e - a) / a : 0}'))"
echo
printf '%-16s %9s %10s %12s %12s %12s %9s %11s %10s %12s\n' mode requests "req/compl" "prompt/compl" "compl/compl" "cached/compl" "ms/compl" "req/M" "cost/compl" "cost/M"
while read -r mode n req pt ct cat secs sent; do
    awk -v m="$mode" -v n="$n" -v r="$req" -v pt="$pt" -v ct="$ct" -v c="$cat" -v s="$secs" \
        -v pi="$p_in" -v pc="$p_cached" -v po="$p_out" -v bf="$bf" 'BEGIN {
        cost = ((pt - c) * pi + c * pc + ct * po) / 1e6;
        if (m ~ /batch/) cost *= bf;
        printf "%-16s %9d %10.2f %12.1f %12.2f %12.1f %9.3f %11.0f %10.6f %12.2f\n",
               m, r, r / n, pt / n, ct / n, c / n, 1000 * s / n, r / n * 1e6, cost / n, cost / n * 1e6 }'
    [ "$sent" = "$req" ] || echo "  (the server received $sent requests)"
done <"$results"
echo "per million (M) completions: the per-completion figures x 1e6; cost = (prompt - cached) x input + cached x cached input + completion x output, times batch_factor in batch mode"

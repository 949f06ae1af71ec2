#!/usr/bin/env bash
# Benchmark: rbr_fit_table (passes over the table, rows never gathered)
# against the rbr_fit aggregate (rows gathered, exact solver) on the same data:
# synthetic comparisons (test/bench/gen_comparisons.sql), all rows in one fit
# (the response types mixed: only the size matters here), default options.
# Prints wall time, passes and how far the two optima are apart.
# Usage (against a running server; PG* variables select it):
#   test/bench/fit_scaleout_bench.sh [prompts=6250] [workers=0]   # 16 rows per prompt: 6250 -> 100k rows, 62500 -> 1M
# With no server at hand: make install, then
#   bash -c 'source test/cluster.sh; cluster_start; trap cluster_stop EXIT; test/bench/fit_scaleout_bench.sh 62500'
set -euo pipefail
cd "$(dirname "$0")/../.."
prompts=${1:-6250}
workers=${2:-0}
psql=(psql -X -q -v ON_ERROR_STOP=1 -d "${PGDATABASE:-postgres}")

"${psql[@]}" -c "CREATE EXTENSION IF NOT EXISTS rbr"
"${psql[@]}" -v prompts="$prompts" -v seed=0.25 -f test/bench/gen_comparisons.sql >/dev/null
rows=$("${psql[@]}" -At -c "SELECT count(*) FROM comparisons")

# fit in a fresh backend; prints "<seconds>|<report>"
run() { # sql expression
    "${psql[@]}" -At <<SQL
SET max_parallel_workers_per_gather = $workers;
SET rbr.fit_max_memory = '8GB';
SET work_mem = '256MB';
SELECT clock_timestamp() AS t0 \gset
SELECT $1 AS r \gset
SELECT extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) || '|' || :'r';
SQL
}
agg=$(run "(SELECT rbr_fit(prompt::text, tier, features, rm) FROM comparisons)")
tab=$(run "rbr_fit_table('comparisons', 'prompt', 'tier', 'features', 'rm')")
agg_s=${agg%%|*}; agg_r=${agg#*|}
tab_s=${tab%%|*}; tab_r=${tab#*|}
cmp=$("${psql[@]}" -At -v a="$agg_r" -v t="$tab_r" <<'SQL'
SELECT (:'t'::jsonb->>'passes') || '|' || (:'t'::jsonb->>'converged') || '|' || (:'t'::jsonb->>'gap') || '|'
       || (:'a'::jsonb->'pairs'->>'train') || '|'
       || abs((:'a'::jsonb->>'objective')::float8 - (:'t'::jsonb->>'objective')::float8) / (:'a'::jsonb->>'objective')::float8 || '|'
       || (SELECT max(abs(x.v::float8 - y.v::float8)) FROM jsonb_array_elements_text(:'a'::jsonb->'weights') WITH ORDINALITY x(v, i)
             JOIN jsonb_array_elements_text(:'t'::jsonb->'weights') WITH ORDINALITY y(v, i) USING (i))
SQL
)
IFS='|' read -r passes conv gap pairs objdiff wdiff <<<"$cmp"

echo "command: test/bench/fit_scaleout_bench.sh $prompts $workers   ($(date -u +%Y-%m-%d), $(nproc) cores, max_parallel_workers_per_gather = $workers, work_mem 256MB)"
echo "data: $rows rows ($prompts prompts x 16 completions, 23 features), $pairs training pairs"
printf '%-44s %10s %8s\n' "fit" "time (s)" "passes"
printf '%-44s %10.2f %8s\n' "rbr_fit (rows gathered, exact solver)" "$agg_s" "$(echo "$agg_r" | sed -n 's/.*"passes": \([0-9]*\).*/\1/p')"
printf '%-44s %10.2f %8s\n' "rbr_fit_table (passes over the table)" "$tab_s" "$passes"
echo "rbr_fit_table: converged $conv, certified gap $gap; objective differs from rbr_fit's by $objdiff (relative), weights by at most $wdiff"
"${psql[@]}" -c "DROP TABLE comparisons"

#!/usr/bin/env bash
# Benchmark: sum(rbr_reward(...)) over N rows of 28 features against the same
# sum written as plain SQL arithmetic over 28 float8 columns, in one run.
# Usage (against a running server; PG* variables select it):
#   test/bench/reward_bench.sh [rows=1000000] [repeats=5]
# With no server at hand: make install, then
#   bash -c 'source test/cluster.sh; cluster_start; trap cluster_stop EXIT; test/bench/reward_bench.sh'
set -euo pipefail
rows=${1:-1000000}
repeats=${2:-5}
nf=28
psql=(psql -X -q -v ON_ERROR_STOP=1 -d "${PGDATABASE:-postgres}")
cd "$(dirname "$0")/../.."
ref=../shared/reference

cols=$(seq -f "f%g float8" -s ", " 1 $nf)
gen=$(for i in $(seq 1 $nf); do printf "%srandom()" "$([ "$i" = 1 ] || echo ", ")"; done)
arr=$(seq -f "f%g" -s ", " 1 $nf)
weights=$(for i in $(seq 1 $nf); do printf "%s%.3f" "$([ "$i" = 1 ] || echo ,)" "$(echo "scale=3; ($i * 37 % 23 - 11) / 7" | bc)"; done)
plain="base"
i=1
for w in ${weights//,/ }; do plain="$plain + ($w) * f$i"; i=$((i + 1)); done

# a model with these 28 weights: the released policy, hard_refuse's features
# listed as its 23 simple propositions and 5 classes
"${psql[@]}" -v spec="$(cat "$ref/policy.json")" -v weights="[$weights]" <<'SQL'
CREATE EXTENSION IF NOT EXISTS rbr;
SELECT rbr_policy_load('bench28', :'spec'::jsonb || jsonb_build_object('features', jsonb_build_object('hard_refuse',
         (SELECT jsonb_agg(k ORDER BY k) FROM jsonb_object_keys(:'spec'::jsonb -> 'simple_propositions') k)
         || (:'spec'::jsonb -> 'completion_class_order'))), replace => true) IS NOT NULL AS policy;
SELECT rbr_model_save('bench28', 'bench28', 'hard_refuse', jsonb_build_object('weights', :'weights'::jsonb)) IS NOT NULL AS model;
SQL
"${psql[@]}" <<SQL
DROP TABLE IF EXISTS bench_reward;
CREATE TABLE bench_reward (id int, base float8, $cols, feats float8[]);
SELECT setseed(0.5);
INSERT INTO bench_reward SELECT i, random() * 4 - 2, $gen, NULL FROM generate_series(1, $rows) i;
UPDATE bench_reward SET feats = ARRAY[$arr];
VACUUM ANALYZE bench_reward;
SQL

run() { # label, query: prints the median of $repeats runs in ms
    local label=$1 query=$2 times=()
    for _ in $(seq 1 "$repeats"); do
        t=$("${psql[@]}" -c "SET max_parallel_workers_per_gather = 0" -c '\timing on' -c "$query" \
            | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')
        times+=("$t")
    done
    median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (repeats + 1) / 2 ))p")
    printf '%-58s %10.1f ms\n' "$label" "$median"
    echo "$median" >"/tmp/rbr-bench-$3"
}

echo "command: test/bench/reward_bench.sh $rows $repeats   ($(date -u +%Y-%m-%d), $(nproc) cores, serial plans)"
echo "rows: $rows, features: $nf, median of $repeats runs"
run "plain SQL: sum(base + w1*f1 + ... + w28*f28)" "SELECT sum($plain) FROM bench_reward" plain
run "rbr_reward(w, ARRAY[f1, ..., f28], base)" "SELECT sum(rbr_reward('{$weights}', ARRAY[$arr], base)) FROM bench_reward" array
run "rbr_reward(w, feats, base)  (features stored as float8[])" "SELECT sum(rbr_reward('{$weights}', feats, base)) FROM bench_reward" stored
run "rbr_reward('bench28', 'hard_refuse', feats, base)  (stored model)" "SELECT sum(rbr_reward('bench28', 'hard_refuse', feats, base)) FROM bench_reward" model
p=$(cat /tmp/rbr-bench-plain); a=$(cat /tmp/rbr-bench-array); s=$(cat /tmp/rbr-bench-stored); m=$(cat /tmp/rbr-bench-model)
printf 'ratio rbr_reward(ARRAY[...]) / plain SQL: %.2f\n' "$(echo "$a / $p" | bc -l)"
printf 'ratio rbr_reward(float8[] column) / plain SQL: %.2f\n' "$(echo "$s / $p" | bc -l)"
printf 'ratio rbr_reward(stored model, float8[] column) / plain SQL: %.2f\n' "$(echo "$m / $p" | bc -l)"
# both must agree on the value
"${psql[@]}" -At -c "SELECT 'same sum: ' || (abs(sum($plain) - sum(rbr_reward('{$weights}', ARRAY[$arr], base))) < 1e-6 * abs(sum($plain)))::text FROM bench_reward"
"${psql[@]}" -c "DROP TABLE bench_reward" -c "DELETE FROM rbr.model WHERE name = 'bench28'"
rm -f /tmp/rbr-bench-plain /tmp/rbr-bench-array /tmp/rbr-bench-stored /tmp/rbr-bench-model

#!/usr/bin/env bash
# Benchmark: fitting the RBR weights with rbr_fit in SQL.
# Fit time and held-out pair accuracy of rbr's exact solver, rbr's AdamW option
# (the paper's released procedure, 1000 steps) and the reward model alone, on
# synthetic comparisons (test/bench/gen_comparisons.sql), 80% of prompts for
# training and 20% held out; plus the backend's peak memory.
# The exact fit runs five times (each in a fresh backend; the median is
# reported, the best in brackets), AdamW once. The generated table is
# vacuumed first, so that no fit pays for setting its hint bits.
# With RBR_RELEASED_DIR set to a checkout of the paper's released code
# (https://github.com/openai/safety-rbr-code-and-data, which holds
# rbr_weight_fitter.py), the released fitter itself (Python, PyTorch: Debian's
# python3-torch python3-numpy python3-tqdm) fits the same training rows too,
# through test/bench/released_fitter.py: as published, and with its pairs
# formed per prompt (its own pair search tests every pair of rows of a
# response type, so it is run only up to 20,000 rows per response type),
# each with PyTorch on one thread and on every core, the faster counting.
# Usage (against a running server; PG* variables select it):
#   test/bench/fit_bench.sh [prompts=6250]      # 16 rows per prompt: 6250 -> 100k rows
#   test/bench/fit_bench.sh 500                 # the 500-prompt set (8000 rows)
#   test/bench/fit_bench.sh 62500               # 1M rows
# With no server at hand: make install, then
#   bash -c 'source test/cluster.sh; cluster_start; trap cluster_stop EXIT; test/bench/fit_bench.sh 62500'
set -euo pipefail
cd "$(dirname "$0")/../.."
prompts=${1:-6250}
psql=(psql -X -q -v ON_ERROR_STOP=1 -d "${PGDATABASE:-postgres}")

"${psql[@]}" -c "CREATE EXTENSION IF NOT EXISTS rbr"
t0=$(date +%s.%N)
"${psql[@]}" -v prompts="$prompts" -v seed=0.25 -f test/bench/gen_comparisons.sql >/dev/null
t1=$(date +%s.%N)
"${psql[@]}" -c "VACUUM ANALYZE comparisons"
rows=$("${psql[@]}" -At -c "SELECT count(*) FROM comparisons")

# fit one solver in a fresh backend; prints "<seconds> <peak KB> <shared KB>" and stores the weights
fit() { # name, options
    "${psql[@]}" -At <<SQL
SET max_parallel_workers_per_gather = 0;
SET rbr.fit_max_memory = '8GB';
DROP TABLE IF EXISTS fit_$1;
SELECT clock_timestamp() AS t0 \gset
CREATE TABLE fit_$1 AS
SELECT rt, rbr_fit(prompt::text, tier, features, rm, '$2') AS r FROM comparisons WHERE prompt % 5 <> 0 GROUP BY rt;
SELECT extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)
       || ' ' || substring(s FROM 'VmHWM:\s+(\d+)') || ' ' || substring(s FROM 'RssShmem:\s+(\d+)')
  FROM pg_read_file('/proc/' || pg_backend_pid() || '/status') s;
SQL
}
heldout() { # name: held-out pair accuracy of rm + w.phi
    "${psql[@]}" -At -c "SELECT round(rbr_pair_accuracy(c.prompt::text, c.tier,
        rbr_reward(ARRAY(SELECT jsonb_array_elements_text(f.r->'weights')::float8), c.features, c.rm))::numeric, 4)
        FROM comparisons c JOIN fit_$1 f USING (rt) WHERE c.prompt % 5 = 0"
}

ex_runs=()
for i in 1 2 3 4 5; do
    read -r ex_s ex_hwm ex_shm <<<"$(fit exact '{"validation_fraction": 0}')"
    ex_runs+=("$ex_s")
done
ex_sorted=($(printf '%s\n' "${ex_runs[@]}" | sort -g))
ex_s=${ex_sorted[2]}; ex_best=${ex_sorted[0]}
read -r ad_s ad_hwm ad_shm <<<"$(fit adamw '{"solver": "adamw", "validation_fraction": 0}')"
# what every fit pays before the solver: scan, collect and sort the rows (AdamW cut to one step)
read -r co_s co_hwm co_shm <<<"$(fit collect '{"solver": "adamw", "steps": 1, "validation_fraction": 0}')"
ex_acc=$(heldout exact); ad_acc=$(heldout adamw)

# the paper's released fitter on the same training rows (optional)
released() { # mode, threads: prints "<seconds of fit_weights> <held-out acc> <seconds of its pair search>", summed over response types
    local out; out=$(/usr/bin/python3 test/bench/released_fitter.py "$csv" "$RBR_RELEASED_DIR" "$1" "$2" 2>/dev/null)
    "${psql[@]}" -c "DROP TABLE IF EXISTS fit_released; CREATE TABLE fit_released (rt text, r jsonb)"
    grep '"rt"' <<<"$out" | "${psql[@]}" -c "COPY fit_released (r) FROM STDIN"
    "${psql[@]}" -c "UPDATE fit_released SET rt = r->>'rt'"
    echo "$("${psql[@]}" -At -c "SELECT round(sum((r->>'total_s')::float8)::numeric, 3) FROM fit_released") $(heldout released) $("${psql[@]}" -At -c "SELECT round(sum((r->>'pairs_s')::float8)::numeric, 3) FROM fit_released")"
}
rel_pub=(); rel_pp=()
if [ -n "${RBR_RELEASED_DIR:-}" ]; then
    [ -f "$RBR_RELEASED_DIR/rbr_weight_fitter.py" ] || { echo "RBR_RELEASED_DIR: no rbr_weight_fitter.py in $RBR_RELEASED_DIR" >&2; exit 1; }
    /usr/bin/python3 -c 'import torch, numpy, tqdm' 2>/dev/null \
        || { echo "the released fitter needs: apt-get install python3-torch python3-numpy python3-tqdm" >&2; exit 1; }
    csv=$(mktemp /tmp/rbr-fit-rows.XXXXXX.csv)
    d=$("${psql[@]}" -At -c "SELECT max(cardinality(features)) FROM comparisons")
    { printf 'prompt,rt,tier,rm'; for j in $(seq 1 "$d"); do printf ',f%d' "$j"; done; echo
      "${psql[@]}" -At -c "COPY (SELECT concat_ws(',', prompt, rt, tier, rm, array_to_string(features, ','))
                                  FROM comparisons WHERE prompt % 5 <> 0) TO STDOUT"; } >"$csv"
    max_rt=$("${psql[@]}" -At -c "SELECT max(n) FROM (SELECT count(*) AS n FROM comparisons WHERE prompt % 5 <> 0 GROUP BY rt) s")
    # PyTorch on one thread and on every core; the faster counts (small tensors can be slower on more)
    best_of() { # mode: the faster of the two thread settings, and the setting
        local a b
        read -r -a a <<<"$(released "$1" 1)"
        read -r -a b <<<"$(released "$1" "$(nproc)")"
        if [ "$(echo "${a[0]} <= ${b[0]}" | bc)" = 1 ]; then echo "${a[*]} 1"; else echo "${b[*]} $(nproc)"; fi
    }
    [ "$max_rt" -le 20000 ] && read -r -a rel_pub <<<"$(best_of as-released)"
    read -r -a rel_pp <<<"$(best_of pairs-per-prompt)"
    rel_torch=$(/usr/bin/python3 -c 'import torch; print(torch.__version__)')
    rm -f "$csv"
fi
# one small state per prompt (GROUP BY prompt): the aggregate's memory per group
read -r pc_s pc_hwm pc_shm pc_acc <<<"$("${psql[@]}" -At <<SQL
SET max_parallel_workers_per_gather = 0;
SET work_mem = '4GB';
SELECT clock_timestamp() AS t0 \gset
SELECT round(avg(a)::numeric, 4) AS acc
  FROM (SELECT rbr_pair_accuracy(prompt::text, tier, rm) AS a FROM comparisons GROUP BY prompt) s \gset
SELECT extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)
       || ' ' || substring(s FROM 'VmHWM:\s+(\d+)') || ' ' || substring(s FROM 'RssShmem:\s+(\d+)') || ' ' || :'acc'
  FROM pg_read_file('/proc/' || pg_backend_pid() || '/status') s;
SQL
)"
rm_acc=$("${psql[@]}" -At -c "SELECT round(rbr_pair_accuracy(prompt::text, tier, rm)::numeric, 4) FROM comparisons WHERE prompt % 5 = 0")
pairs=$("${psql[@]}" -At -c "SELECT sum((r->'pairs'->>'train')::bigint) FROM fit_exact")
conv=$("${psql[@]}" -At -c "SELECT string_agg(rt || ': ' || (r->>'converged') || ', gap ' || (r->>'gap') || ', passes ' || (r->>'passes'), '; ' ORDER BY rt) FROM fit_exact")

echo "command: test/bench/fit_bench.sh $prompts   ($(date -u +%Y-%m-%d), $(nproc) cores, serial plans)"
printf 'data: %s rows (%s prompts x 16 completions, 23 features), %s training pairs; generated in %.1f s\n' \
    "$rows" "$prompts" "$pairs" "$(echo "$t1 - $t0" | bc -l)"
printf '%-34s %10s %12s %14s\n' "fit (4 response types)" "time (s)" "held-out acc" "peak RSS (MB)"
printf '%-34s %10s %12s %14.0f\n' "rbr_fit exact solver" "$(printf '%.3f [%.3f]' "$ex_s" "$ex_best")" "$ex_acc" "$(echo "($ex_hwm - $ex_shm) / 1024" | bc -l)"
printf '%-34s %10.3f %12s %14.0f\n' "rbr_fit AdamW, 1000 steps" "$ad_s" "$ad_acc" "$(echo "($ad_hwm - $ad_shm) / 1024" | bc -l)"
printf '%-34s %10s %12s %14s\n' "reward model alone" "-" "$rm_acc" "-"
printf '%-34s %10.3f %12s %14.0f\n' "collect + sort only (AdamW, 1 step)" "$co_s" "-" "$(echo "($co_hwm - $co_shm) / 1024" | bc -l)"
printf '%-34s %10.3f %12s %14.0f\n' "rbr_pair_accuracy GROUP BY prompt" "$pc_s" "-" "$(echo "($pc_hwm - $pc_shm) / 1024" | bc -l)"
if [ ${#rel_pp[@]} -gt 0 ]; then
    if [ ${#rel_pub[@]} -gt 0 ]; then
        printf '%-34s %10.3f %12s %14s\n' "released fitter, as published" "${rel_pub[0]}" "${rel_pub[1]}" "-"
        printf '  (of which its pair search: %.3f s; PyTorch on %s thread(s))\n' "${rel_pub[2]}" "${rel_pub[3]}"
    else
        printf '%-34s %10s %12s %14s\n' "released fitter, as published" "not run" "-" "-"
        echo "  (its pair search tests every pair of rows of a response type: $max_rt rows, $(echo "$max_rt * ($max_rt - 1) / 2" | bc) row pairs)"
    fi
    printf '%-34s %10.3f %12s %14s\n' "released fitter, pairs per prompt" "${rel_pp[0]}" "${rel_pp[1]}" "-"
    printf '  (of which the pair search per prompt: %.3f s; PyTorch on %s thread(s))\n' "${rel_pp[2]}" "${rel_pp[3]}"
    echo "  (released fitter: fit_weights() summed over the response types, PyTorch $rel_torch, the faster of 1 and $(nproc) threads)"
fi
printf 'speed-up of the exact solver over AdamW: %.1fx (median exact), %.1fx (best exact)\n' \
    "$(echo "$ad_s / $ex_s" | bc -l)" "$(echo "$ad_s / $ex_best" | bc -l)"
if [ ${#rel_pp[@]} -gt 0 ]; then
    [ ${#rel_pub[@]} -gt 0 ] && printf 'speed-up of the exact solver over the released fitter as published: %.1fx (median exact)\n' \
        "$(echo "${rel_pub[0]} / $ex_s" | bc -l)"
    printf 'speed-up of the exact solver over the released fitter with pairs per prompt: %.1fx (median exact)\n' \
        "$(echo "${rel_pp[0]} / $ex_s" | bc -l)"
fi
echo "exact solver: $conv"
echo "(peak RSS = the backend's VmHWM minus its shared memory at the end)"
"${psql[@]}" -c "DROP TABLE IF EXISTS comparisons, fit_exact, fit_adamw, fit_collect, fit_released"

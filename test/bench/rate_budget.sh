#!/usr/bin/env bash
# Sharing a provider's rate limit: three sessions grade at once against the
# test server limited to R requests per second across all its connections
# (429 above it, OpenAI's x-ratelimit-* headers on every answer), under the
# settings a user would pick:
#   per-session R      rbr.grader_requests_per_second = R in each session
#   per-session R/3    rbr.grader_requests_per_second = R/3 in each session
#   shared budget      rbr.grader_requests_per_minute = 60 R (ALTER SYSTEM)
#   nothing set        only the provider's headers and the adaptive window
# each against a provider that sends x-ratelimit-* headers and one that does not.
# For each: requests the server received per second (sent/s), the share it
# answered 429, and the admitted requests per second as a % of R, over the
# whole run (first request to last answer).
#
#   test/bench/rate_budget.sh [R=50] [questions_per_session=300] [latency_ms=50] [in_flight=32]
#
# Needs a running cluster with rbr preloaded (PGHOST/PGPORT/PGUSER as set by
# test/cluster.sh; a superuser: it uses ALTER SYSTEM and resets it) and node.
# Uses a scratch database rbr_bench_rate.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=${1:-50}
N=${2:-300}
lat=${3:-50}
inflight=${4:-32}
ref=$(cd .. && pwd)/shared/reference
log=$(mktemp /tmp/rbr-bench-rate.XXXXXX)

node test/grader-server/server.js --port 0 --latency-ms "$lat" >"$log" 2>&1 &
srv=$!
cleanup() {
    kill $srv 2>/dev/null || true
    psql -X -q -d rbr_bench_rate -c "LOAD 'rbr'" -c "ALTER SYSTEM RESET rbr.grader_requests_per_minute" \
        -c "SELECT pg_reload_conf()" >/dev/null 2>&1 || true
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS rbr_bench_rate" >/dev/null 2>&1 || true
    rm -f "$log"
}
trap cleanup EXIT
for _ in $(seq 50); do grep -q listening "$log" && break; sleep 0.1; done
port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$log")
base="http://127.0.0.1:$port"

psql -X -q -d postgres -c "DROP DATABASE IF EXISTS rbr_bench_rate" -c "CREATE DATABASE rbr_bench_rate"
psql -X -q -At -d rbr_bench_rate -v spec="$(cat "$ref/policy.json")" >/dev/null <<'SQL'
CREATE EXTENSION rbr;
SELECT rbr_policy_load('ref', :'spec'::jsonb);
SQL
[ "$(psql -X -At -d rbr_bench_rate -c "SELECT rbr_grader_stats()->>'rate_budget'")" = cluster ] ||
    echo "note: rbr is not preloaded here: the shared budget is per session" >&2

post() { curl -s -X POST -H 'content-type: application/json' -d "$2" "$base/admin/$1" >/dev/null; }

# run NAME RPM_SYSTEM RPS_SESSION HEADERS: three sessions at once; prints one row.
run() {
    local name=$1 rpm=$2 rps=$3 headers=$4 model t0 t1 s
    model="bench-$(echo "$name" | tr -c "a-z0-9" "-")-$headers-$$"
    # in a database with rbr loaded: without preloading, postgres does not know the setting
    psql -X -q -d rbr_bench_rate -c "LOAD 'rbr'" -c "ALTER SYSTEM SET rbr.grader_requests_per_minute = $rpm" \
        -c "SELECT pg_reload_conf()" >/dev/null
    sleep 0.5
    post config "{\"rate_limit_rps\": $R, \"rate_limit_headers\": $headers}"
    post reset '{}'
    t0=$(date +%s.%N)
    local pids=()
    for s in 1 2 3; do
        psql -X -q -At -d rbr_bench_rate >/dev/null <<SQL &
SET rbr.grader_url = '$base/v1';
SET rbr.grader_model = '$model';
SET rbr.grader_max_in_flight = $inflight;
SET rbr.grader_max_retries = 20;
SET rbr.grader_retry_base_ms = 100;
SET rbr.grader_requests_per_second = $rps;
SELECT count(*) FROM rbr_grade_many('ref', array_fill('apology'::text, ARRAY[$N]), array_fill('"q"'::jsonb, ARRAY[$N]),
       ARRAY(SELECT 's$s ' || i || ' [[rbr apology=0.6]]' FROM generate_series(1, $N) i));
SQL
        pids+=($!)
    done
    wait "${pids[@]}"
    t1=$(date +%s.%N)
    curl -s "$base/admin/stats" | T0=$t0 T1=$t1 R=$R NAME="$name" HDR=$headers node -e '
        let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
          const rl = JSON.parse(s).rate_limit, sec = Number(process.env.T1) - Number(process.env.T0);
          const R = Number(process.env.R), sent = rl.admitted + rl.limited;
          console.log([process.env.NAME.padEnd(18), (process.env.HDR === "true" ? "sent" : "none").padEnd(8), String(sent).padStart(6), String(rl.limited).padStart(6),
            sec.toFixed(1).padStart(7), (sent / sec).toFixed(1).padStart(8), (100 * rl.limited / sent).toFixed(1).padStart(7) + "%",
            (rl.admitted / sec).toFixed(1).padStart(11), (100 * rl.admitted / sec / R).toFixed(0).padStart(6) + "%"].join(" "));
        });'
}

echo "provider limit R = $R requests/s (token bucket of one second), server latency $lat ms;" \
     "3 sessions x $N questions, rbr.grader_max_in_flight = $inflight"
echo "command: $0 $R $N $lat $inflight"
printf '%-18s %-8s %6s %6s %7s %8s %8s %11s %7s\n' setting headers sent 429s seconds sent/s "429 %" admitted/s "% of R"
for h in true false; do
    run "per-session R" 0 "$R" $h
    run "per-session R/3" 0 "$(awk -v r="$R" 'BEGIN { printf "%.4f", r / 3 }')" $h
    run "shared budget" $((60 * R)) 0 $h
    run "nothing set" 0 0 $h
done

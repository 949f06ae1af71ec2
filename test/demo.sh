#!/usr/bin/env bash
# The demo (run by `make demo` through test/run.sh, against its throwaway
# cluster): the released policy, a sample dataset built from the paper's gold
# rows, grading, fitting per response type, scoring, error rates, a reward
# histogram, and two pictures (demo-out/).
#
# The grader is the project's test server (answers with the gold labels, 10%
# of answers flipped), unless RBR_GRADER_URL (and RBR_GRADER_MODEL,
# RBR_GRADER_API_KEY) name a real OpenAI-compatible endpoint; then only
# RBR_DEMO_PROMPTS prompts (default 10) are graded, to keep the cost small.
set -euo pipefail
cd "$(dirname "$0")/.."
pgc=${RBR_PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
source test/grader.sh

if [ -n "${RBR_GRADER_URL:-}" ]; then
    url=$RBR_GRADER_URL model=${RBR_GRADER_MODEL:-gpt-4o-mini} key=${RBR_GRADER_API_KEY:-}
    prompts=${RBR_DEMO_PROMPTS:-10} test_grader=false
    echo "rbr demo: grading with $url, model $model, $prompts prompts"
else
    trap grader_server_stop EXIT
    grader_server_start --labels ../shared/reference/gold_train.jsonl --noise 0.1 --latency-ms 20
    url=$RBR_TEST_GRADER_URL model=rbr-test-grader key=
    prompts=${RBR_DEMO_PROMPTS:-351} test_grader=true
fi

mkdir -p demo-out
# the key goes to the server as a setting of this session only, never in a file or a log
PGOPTIONS="-c rbr.grader_url=$url -c rbr.grader_model=$model${key:+ -c rbr.grader_api_key=$key}" \
    "$("$pgc" --bindir)/psql" -X -v ON_ERROR_STOP=1 -v prompts="$prompts" -v test_grader=$test_grader \
    -v spec="$(cat ../shared/reference/policy.json)" -d "${PGDATABASE:-postgres}" -f test/demo.sql
echo
echo "rbr demo: done. Pictures to open in a browser:"
echo "  rewards per class (RM only, RM + RBR, RBR only): $(pwd)/demo-out/rewards.svg"
echo "  grader calibration per proposition:             $(pwd)/demo-out/calibration.svg"

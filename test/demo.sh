#!/usr/bin/env bash
# The demo (run by `make demo` through test/run.sh, against its throwaway
# cluster): load the released policy, classify the gold rows, fit and score.
set -euo pipefail
cd "$(dirname "$0")/.."
pgc=${RBR_PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
mkdir -p demo-out
"$("$pgc" --bindir)/psql" -X -v ON_ERROR_STOP=1 -d "${PGDATABASE:-postgres}" -f test/demo.sql
echo
echo "rbr demo: done. Reward histogram (SVG, open it in a browser): $(pwd)/demo-out/rewards.svg"

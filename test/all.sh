#!/usr/bin/env bash
# Every test suite against the running throwaway cluster (see test/run.sh):
#   1. pg_regress: the SQL surface (sql/*.sql -> expected/*.out)
#   2. unit tests of the C numerics that need no server (test/unit)
#   3. integration tests (test/t/*.t, run by prove): HTTP grading, faults,
#      cancellation, crashes, concurrency, privileges
# Prints one summary line "tests: N passed, N failed" at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
pgc=${RBR_PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
export PATH="$("$pgc" --bindir):$PATH"
passed=0 failed=0
log=$(mktemp -d /tmp/rbr-test-logs.XXXXXX)

echo "== pg_regress"
make -s installcheck PG_CONFIG="$pgc" 2>&1 | tee "$log/regress.txt"
p=$(grep -cE '^ *(test +)?[a-z_0-9]+ +\.\.\. ok' "$log/regress.txt" || true)
f=$(grep -cE '\.\.\. FAILED' "$log/regress.txt" || true)
[ -f regression.diffs ] && [ "$f" = 0 ] && f=1
[ -f regression.diffs ] && head -c 20000 regression.diffs
passed=$((passed + p)); failed=$((failed + f))

if [ -f test/unit/Makefile ]; then
    echo "== unit tests"
    if make -s -C test/unit check 2>&1 | tee "$log/unit.txt"; then :; else failed=$((failed + 1)); fi
    passed=$((passed + $(grep -cE '^ok ' "$log/unit.txt" || true)))
    failed=$((failed + $(grep -cE '^not ok ' "$log/unit.txt" || true)))
fi

if compgen -G "test/t/*.t" >/dev/null; then
    echo "== integration tests"
    prove -v test/t/ 2>&1 | tee "$log/prove.txt"
    passed=$((passed + $(grep -cE '^ok ' "$log/prove.txt" || true)))
    failed=$((failed + $(grep -cE '^not ok ' "$log/prove.txt" || true)))
    grep -q '^Result: PASS' "$log/prove.txt" || failed=$((failed + 1))
fi

rm -rf "$log"
echo "tests: $passed passed, $failed failed"
[ "$failed" = 0 ]

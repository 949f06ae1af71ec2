#!/usr/bin/env bash
# Every test suite against the running throwaway cluster (see test/run.sh):
#   1. pg_regress: the SQL surface (sql/*.sql -> expected/*.out)
#   2. unit tests of the C numerics that need no server (test/unit), and the
#      self-test of the test grader server
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

echo "== test grader server self-test"
if bash test/grader-server/selftest.sh 2>&1 | tee "$log/server.txt"; then :; else failed=$((failed + 1)); fi
line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log/server.txt" | tail -1)
[ -n "$line" ] || { line="0 passed, 1 failed"; }
passed=$((passed + ${line%% passed*}))
f=${line#*passed, }; failed=$((failed + ${f%% failed*}))

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

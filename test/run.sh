#!/usr/bin/env bash
# test/run.sh demo|test: set up the machine, build and install rbr, start a
# throwaway cluster (and the test grader server), then run the demo or every
# test suite. The cluster and servers are stopped at the end whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: test/run.sh demo|test}

bash test/setup.sh
source test/cluster.sh
trap cluster_stop EXIT
cluster_start

case "$mode" in
    demo) bash test/demo.sh ;;
    test) bash test/all.sh ;;
    *) echo "usage: test/run.sh demo|test" >&2; exit 2 ;;
esac

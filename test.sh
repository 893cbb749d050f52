#!/usr/bin/env bash
# The tests (the default suite, CPU, ~10 minutes on 2 cores). Sets up .venv with the test extras on
# first use (scripts/ensure_venv.sh). Extra arguments go to pytest, e.g. ./test.sh tests/test_rl.py
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh "[test]"
# The default suite runs in 2 pytest-xdist worker processes (a test file stays on one worker, so its
# module fixtures are built once); RLHF_JAX_TEST_WORKERS=0 runs it in this process.
if [ $# -eq 0 ]; then set -- tests -n "${RLHF_JAX_TEST_WORKERS:-2}" --dist loadfile; fi
exec "$VENV/bin/python" -m pytest -q "$@"

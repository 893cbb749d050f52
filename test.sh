#!/usr/bin/env bash
# The tests (the default suite, CPU, ~10 minutes on 2 cores). Sets up .venv with the test extras on
# first use (scripts/ensure_venv.sh). Extra arguments go to pytest, e.g. ./test.sh tests/test_rl.py
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh "[test]"
if [ $# -eq 0 ]; then set -- tests; fi
exec "$VENV/bin/python" -m pytest -q "$@"

#!/usr/bin/env bash
# The main job: the whole recipe (pretrain -> SFT -> RM -> PPO -> evaluation) on the built-in task,
# into runs/pipeline (report.md, summary.json, plots). Sets up .venv on first use (scripts/ensure_venv.sh).
# Extra arguments go to experiments/run_pipeline.py, e.g. ./run.sh --config.seed=1 --workdir runs/seed1
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh ""
exec "$VENV/bin/python" experiments/run_pipeline.py --workdir runs/pipeline "$@"

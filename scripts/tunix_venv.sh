#!/usr/bin/env bash
# Create Tunix's own virtual environment for experiments/bench_ppo.py (--tunix_python): Tunix pins
# its own jax/flax, so it does not go into .venv. Usage, from the repository root:
#   scripts/tunix_venv.sh                 # -> .venv-tunix (git-ignored)
#   python experiments/bench_ppo.py --tunix_python=.venv-tunix/bin/python
# Needs Python >= 3.11 ($PYTHON, default python3) and the package index.
set -euo pipefail
VENV="${1:-.venv-tunix}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -c scripts/tunix-constraints.txt google-tunix==0.1.7
"$VENV/bin/python" -c "import tunix.rl.ppo.ppo_learner; print('Tunix environment ready: $VENV/bin/python')"

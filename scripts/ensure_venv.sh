# Sourced by run.sh and test.sh: make sure $VENV (default .venv) exists and holds rlhf_jax with the
# pinned versions of constraints.txt, installing them the first time (and again after constraints.txt
# or setup.py change). Needs only Python >= 3.10 ($PYTHON, default python3) and the package index.
# $1: the extras to install, e.g. "[test]" (empty: the main job's dependencies only).
VENV="${RLHF_JAX_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  found=$("$PYTHON" --version 2>/dev/null || echo "not found")
  echo "FATAL: rlhf_jax needs Python >= 3.10; PYTHON=$PYTHON is $found (set PYTHON=/path/to/python3.10 or newer)" >&2
  exit 1
fi
extras="${1:-}"
stamp="$VENV/.rlhf_jax-installed$(echo "$extras" | tr -d '[]')-$("$PYTHON" -c '
import hashlib
print(hashlib.sha256(open("constraints.txt", "rb").read() + open("setup.py", "rb").read()).hexdigest()[:16])')"
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  echo "Installing rlhf_jax$extras with the pinned versions of constraints.txt into $VENV (once; a few minutes)..."
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".$extras"
  touch "$stamp"
fi

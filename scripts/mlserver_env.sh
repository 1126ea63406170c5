#!/usr/bin/env bash
# Create (if needed) a separate venv for Seldon MLServer, the reference Open Inference Protocol server
# that benchmarks/compare_mlserver.py and tests/serve/test_mlserver.py compare ours with.
#   bash scripts/mlserver_env.sh            # -> .venv-mlserver (or $MLSERVER_VENV)
# A venv of its own because MLServer pins an older FastAPI (<0.116) than ours. Idempotent: a second run
# only checks that the pinned versions are installed. These pins are not in constraints.txt, which is
# for .venv only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${MLSERVER_VENV:-.venv-mlserver}"
PINS=(mlserver==1.7.1 onnxruntime==1.32.0 numpy==2.4.6)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# Every dependency pinned too (scripts/mlserver-constraints.txt), so a new upstream release cannot
# change what CI compares against.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c scripts/mlserver-constraints.txt "${PINS[@]}"

#!/usr/bin/env bash
# Create .venv (if needed) and install mnist-deploy with the pinned, tested versions in constraints.txt.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch is pinned to 2.13.0 (CPU build); an unpinned torch would pull several GB of CUDA packages.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"

#!/usr/bin/env bash
# Quickstart command 2: set everything up, then lint and run the whole test suite.
#   MNIST_DEPLOY_DATA=../shared/data/mnist bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system_deps.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"

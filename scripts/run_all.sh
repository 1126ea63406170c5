#!/usr/bin/env bash
# Quickstart command 1: set everything up and run the main job end to end:
# check the data, train the MLP, export every format with parity checks, verify, benchmark the runtimes.
#   [MNIST_DEPLOY_DATA=/path/to/mnist] bash scripts/run_all.sh [--out artifacts]
# Without MNIST_DEPLOY_DATA the MNIST files are downloaded into ./data.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="artifacts"
if [ "${1:-}" = "--out" ]; then OUT="$2"; fi
bash scripts/setup.sh
bash scripts/system_deps.sh
bash scripts/js_env.sh
MD=.venv/bin/mnist-deploy
$MD data
$MD train --out "$OUT" --plots
$MD export --artifacts "$OUT"
$MD verify --artifacts "$OUT"
$MD bench --artifacts "$OUT"

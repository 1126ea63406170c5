#!/usr/bin/env bash
# Quickstart command 2: set everything up, then lint and run the whole test suite.
#   [MNIST_DEPLOY_DATA=/path/to/mnist] bash scripts/test.sh [pytest args]
# Without MNIST_DEPLOY_DATA (and no ../shared/data/mnist), MNIST is downloaded into ./data first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/mlserver_env.sh  # MLServer in its own venv, for tests/serve/test_mlserver.py (~30-50 s the first time)
bash scripts/tritonclient_env.sh  # tritonclient[grpc] in its own venv, for tests/serve/test_grpc_v2.py (~30 s the first time)
bash scripts/system_deps.sh
bash scripts/js_env.sh  # npm ci in js/ (onnxruntime-node, onnxruntime-web) from the lock file
if [ -z "${MNIST_DEPLOY_DATA:-}" ] && [ ! -d ../shared/data/mnist ]; then
  # No local copy named: fetch MNIST into ./data once (MD5-checked), and run the tests on it.
  .venv/bin/mnist-deploy data >/dev/null
  export MNIST_DEPLOY_DATA="$PWD/data"
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"

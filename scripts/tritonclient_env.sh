#!/usr/bin/env bash
# Create (if needed) a separate venv for tritonclient[grpc], Triton's own Open Inference Protocol client,
# which tests/serve/test_grpc_v2.py runs against our gRPC service (tests/serve/_triton_grpc_client.py).
#   bash scripts/tritonclient_env.sh            # -> .venv-tritonclient (or $TRITONCLIENT_VENV)
# A venv of its own because tritonclient[grpc] pins protobuf<7 and onnx (in .venv) needs protobuf>=7.
# Idempotent: a second run only checks that the pinned versions are installed. These pins are not in
# constraints.txt, which is for .venv only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${TRITONCLIENT_VENV:-.venv-tritonclient}"
PINS=("tritonclient[grpc]==2.73.0" grpcio==1.85.3 protobuf==6.33.6 numpy==2.4.6)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# Every dependency pinned too (scripts/tritonclient-constraints.txt), so a new upstream release cannot
# change the client the tests use.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c scripts/tritonclient-constraints.txt \
  "${PINS[@]}"

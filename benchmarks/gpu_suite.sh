#!/usr/bin/env bash
# The CUDA suite in one command: train, parity, bench and serve on the GPU, into one folder.
#
#   bash benchmarks/gpu_suite.sh [--device cuda] [--out DIR] [--tiny] [--budget-s 480]
#   bash benchmarks/gpu_suite.sh --device cpu --tiny      # the CPU dry run (CI)
#
# Runs from this checkout with the machine's own Python ($PYTHON, else .venv/bin/python, else python3):
# the package is imported from the source tree through PYTHONPATH and nothing is installed, so a GPU
# machine's torch (whatever its version) is the one used. Output: $OUT or --out (default ./gpu-suite-out).
# benchmarks/gpu_suite.py has the steps; docs/gpu.md says what the folder holds.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || command -v python)"; fi
fi
if [ -z "$PY" ]; then echo "gpu_suite: no python3 found" >&2; exit 2; fi
# Wheels carried to a machine without a registry (benchmarks/gpu_wheels.sh made them): installed into a
# scratch folder, only when the serve step's imports are missing here.
if compgen -G "$ROOT/.whl/*.whl" >/dev/null && ! "$PY" -c "import fastapi, uvicorn, orjson, python_multipart, pydantic" 2>/dev/null; then
  SITE="${GPU_SUITE_SITE:-/tmp/gpu-suite-site}"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_suite: installed the carried wheels from .whl/ into $SITE" >&2
  else
    echo "gpu_suite: the carried wheels in .whl/ did not install; the steps that need them will say so" >&2
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/benchmarks/gpu_suite.py" "$@"

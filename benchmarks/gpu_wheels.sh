#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine lacks for the suite's serve step, into .whl/ (in .gitignore),
# for Python 3.12 on x86-64 Linux, at the versions constraints.txt pins (about 3 MB).
# The GPU machine reaches no registry; a device run that names .whl in `carry` gets them, and
# benchmarks/gpu_suite.sh installs them into /tmp/site before it starts. docs/gpu.md has the steps.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# What the GPU image lacks of serve's imports (its package list has click, anyio, h11, httpx,
# typing-extensions, annotated-doc, prometheus-client, pillow, uvloop).
NAMES="fastapi starlette pydantic pydantic_core annotated-types typing-inspection uvicorn orjson python-multipart"
pins=()
for name in $NAMES; do
  pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt || true)
  if [ -z "$pin" ]; then echo "gpu_wheels: $name is not pinned in constraints.txt" >&2; exit 2; fi
  pins+=("$pin")
done
mkdir -p .whl
PY="${PYTHON:-python3}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${pins[@]}"
ls -la .whl
du -sh .whl

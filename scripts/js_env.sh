#!/usr/bin/env bash
# ONNX Runtime for JavaScript (js/: onnxruntime-node, onnxruntime-web), installed with `npm ci` from the
# committed package-lock.json: the exact tested versions, nothing resolved at install time. Skipped (the
# Node and browser runtimes then report themselves unavailable, with the reason) where npm is missing.
# Idempotent: a second run only compares the lock file with the one installed.
set -euo pipefail
cd "$(dirname "$0")/../js"
if ! command -v npm >/dev/null 2>&1; then
  echo "note: npm not found; the onnxruntime-node and onnxruntime-web runtimes will be unavailable" >&2
  exit 0
fi
stamp=node_modules/.package-lock.json.installed
if [ -f "$stamp" ] && cmp -s package-lock.json "$stamp"; then
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
cp package-lock.json "$stamp"

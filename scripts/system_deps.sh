#!/usr/bin/env bash
# System packages the browser and load tests use: Debian's Chromium (driven by Playwright through
# executable_path, never a downloaded browser), Apache Bench (ab) for the load test and wrk (keep-alive,
# Lua-scripted POSTs) for benchmarks/bench_serve.py; a C++ compiler, CMake and Ninja for the C++ runner
# (native/, the torchscript-cpp / aoti-cpp runtimes) and for AOTInductor packages (the aoti format); Node.js
# and npm for ONNX Runtime in JavaScript (js/, scripts/js_env.sh).
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v ab >/dev/null 2>&1 || need+=(apache2-utils)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v ninja >/dev/null 2>&1 || need+=(ninja-build)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: ${need[*]} not installed and cannot apt-get here; the browser/load/native tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

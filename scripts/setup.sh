#!/usr/bin/env bash
# Install quantkit with its test dependencies. torch first: the CPU wheel 2.13.0 (a range-only request
# would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" python3 -m pip install -q -e ".[test]"

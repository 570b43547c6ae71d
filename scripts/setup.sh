#!/usr/bin/env bash
# Install quantkit with what converting needs. torch first: the CPU wheel 2.13.0 (a range-only request
# would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e .

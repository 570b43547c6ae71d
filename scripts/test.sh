#!/usr/bin/env bash
# The test command: the test extras (transformers, compressed-tensors, triton and the llama.cpp oracle
# llama-cpp-python==0.3.36, compiled here in a few minutes the first time), llama.cpp's own converter from
# the same sdist, then the suite. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" python3 -m pip install -q -e ".[test]"
QK_LLAMACPP_SRC="${QK_LLAMACPP_SRC:-$(bash scripts/fetch_llamacpp_src.sh)}"
export QK_LLAMACPP_SRC
python3 -m pytest -q "$@"

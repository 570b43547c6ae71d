#!/usr/bin/env bash
# The test command: the test extras (transformers, compressed-tensors, triton and the llama.cpp oracle
# llama-cpp-python==0.3.36, compiled here in a few minutes the first time), llama.cpp's own converter from
# the same sdist, then the suite on QK_TEST_WORKERS pytest-xdist workers (default 2, the CI machine's cores; a
# test file stays on one worker, so its module fixtures are built once and its subprocess tests don't race each
# other), its 40 slowest steps listed: CI must stay under 50 minutes. Arguments go to pytest.
# The tagged tests' results go to build/support.json; a full run (no arguments) then regenerates the README's
# support table from them (scripts/support_table.py), whether or not every test passed.
set -euo pipefail
cd "$(dirname "$0")/.."
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" python3 -m pip install -q -e ".[test]"
QK_LLAMACPP_SRC="${QK_LLAMACPP_SRC:-$(bash scripts/fetch_llamacpp_src.sh)}"
export QK_LLAMACPP_SRC
rc=0
# --support-json=FILE in one word: pytest reads an existing FILE given apart as a path to test, before the
# conftest that defines the option is loaded, and stopped with "unrecognized arguments" on every run after the first
python3 -m pytest -q -n "${QK_TEST_WORKERS:-2}" --dist loadfile --durations=40 --support-json=build/support.json "$@" || rc=$?
if [ $# -eq 0 ] && [ -f build/support.json ]; then
    python3 scripts/support_table.py build/support.json --readme README.md
else
    echo "support results of this (partial) run: build/support.json (README table left as is)"
fi
exit $rc

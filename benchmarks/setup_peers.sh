#!/usr/bin/env bash
# Peers for benchmarks/calibrated_speed.py, each in its own virtual environment / build folder (never the
# project's Python). Idempotent: a peer that is already set up (its .ok marker) is left alone; one that failed
# before (its .failed marker) is retried only with --retry.
#
#   bash benchmarks/setup_peers.sh [--dir DIR] [--peers "llmcompressor gptqmodel llamacpp"] [--retry]
#
#   DIR/venvs/llmcompressor   llm-compressor (CPU torch 2.13.0 first: a range-only torch request would pull
#                             the multi-GB CUDA build)
#   DIR/venvs/gptqmodel       GPTQModel (optional: needs a compiled build; skipped with a message if it fails)
#   DIR/llama.cpp/bin/llama-imatrix
#                             built from the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp (optional)
#
# DIR defaults to $QK_BENCH_CACHE or ~/.cache/quantkit-bench. Logs: DIR/logs/<peer>.log.
# Exit status 0 unless llm-compressor (the one required peer) could not be set up.
set -uo pipefail

DIR="${QK_BENCH_CACHE:-$HOME/.cache/quantkit-bench}"
PEERS="llmcompressor gptqmodel llamacpp"
RETRY=0
PY="${PYTHON:-python3.11}"
TORCH_WHEEL="/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
TORCH_PIN="torch==2.13.0"
LLAMACPP_SDIST="${LLAMACPP_SDIST:-/tmp/quantkit-llamacpp-src/llama_cpp_python-0.3.36.tar.gz}"
GPTQMODEL_TIMEOUT="${GPTQMODEL_TIMEOUT:-1800}"   # seconds for pip to build gptqmodel
LLAMACPP_TIMEOUT="${LLAMACPP_TIMEOUT:-2400}"     # seconds for cmake to build llama-imatrix
JOBS="${JOBS:-$(nproc)}"

while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --peers) PEERS="$2"; shift 2 ;;
    --retry) RETRY=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v "$PY" >/dev/null || PY=python3
mkdir -p "$DIR/venvs" "$DIR/logs"
DIR="$(cd "$DIR" && pwd)"
# Every install in a peer venv keeps the CPU torch: a dependency asking for a newer torch must then pick an
# older release of itself (or fail) instead of swapping in the multi-GB CUDA build.
PIN="$DIR/torch-cpu-constraint.txt"
echo "torch==2.13.0" >"$PIN"
say() { echo "[setup_peers] $*" >&2; }

# skip_or_go NAME MARKER_DIR: 0 = do the work, 1 = already done / failed before (message printed)
skip_or_go() {
  local name="$1" d="$2"
  if [ -f "$d/.ok" ]; then say "$name: ready ($d)"; return 1; fi
  if [ -f "$d/.failed" ] && [ "$RETRY" = 0 ]; then
    say "$name: SKIPPED, failed before: $(cat "$d/.failed") (--retry to try again; log $DIR/logs/$name.log)"
    return 1
  fi
  rm -f "$d/.failed"
  return 0
}

make_venv() {  # make_venv DIR: a venv with the CPU torch 2.13.0 in it
  local v="$1"
  [ -x "$v/bin/python" ] || "$PY" -m venv "$v" || return 1
  "$v/bin/python" -m pip install -q --upgrade pip wheel setuptools || return 1
  if "$v/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    return 0
  fi
  if [ -f "$TORCH_WHEEL" ]; then
    "$v/bin/python" -m pip install "$TORCH_WHEEL" || return 1
  else
    "$v/bin/python" -m pip install "$TORCH_PIN" --index-url https://download.pytorch.org/whl/cpu \
      || "$v/bin/python" -m pip install "$TORCH_PIN" || return 1
  fi
}

setup_llmcompressor() {
  local v="$DIR/venvs/llmcompressor" log="$DIR/logs/llmcompressor.log"
  skip_or_go llmcompressor "$v" || return 0
  mkdir -p "$v"
  say "llmcompressor: installing into $v (log $log)"
  {
    make_venv "$v" &&
    "$v/bin/python" -m pip install -c "$PIN" llmcompressor &&
    "$v/bin/python" -c "import torch, llmcompressor; from llmcompressor import oneshot; \
from llmcompressor.modifiers.quantization import GPTQModifier; from llmcompressor.modifiers.awq import AWQModifier; \
print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__)"
  } >"$log" 2>&1
  if [ $? -eq 0 ]; then
    touch "$v/.ok"; say "llmcompressor: ready ($(tail -1 "$log"))"
  else
    echo "pip install llmcompressor failed: $(grep -v '^WARNING: Location' "$log" | tail -1)" >"$v/.failed"
    say "llmcompressor: FAILED ($(cat "$v/.failed")); log $log"; return 1
  fi
}

setup_gptqmodel() {
  local v="$DIR/venvs/gptqmodel" log="$DIR/logs/gptqmodel.log"
  skip_or_go gptqmodel "$v" || return 0
  mkdir -p "$v"
  say "gptqmodel: trying (needs a compiled build; up to ${GPTQMODEL_TIMEOUT}s; log $log)"
  {
    make_venv "$v" &&
    # The build imports torch: no build isolation, or pip would fetch a second (CUDA) torch into the
    # isolated build env. CPU only: no CUDA extensions.
    "$v/bin/python" -m pip install -c "$PIN" packaging ninja numpy &&
    BUILD_CUDA_EXT=0 GPTQMODEL_FORCE_BUILD=1 CUDA_VISIBLE_DEVICES="" MAX_JOBS="$JOBS" \
      timeout "$GPTQMODEL_TIMEOUT" "$v/bin/python" -m pip install -c "$PIN" --no-build-isolation gptqmodel &&
    "$v/bin/python" -c "import gptqmodel; print('gptqmodel', gptqmodel.__version__)"
  } >"$log" 2>&1
  if [ $? -eq 0 ]; then
    touch "$v/.ok"; say "gptqmodel: ready ($(tail -1 "$log"))"
  else
    echo "gptqmodel install/build failed: $(grep -v '^WARNING: Location' "$log" | grep -iE 'error|timeout|killed|conflict' | tail -1 | cut -c1-300)" >"$v/.failed"
    say "gptqmodel: SKIPPED ($(cat "$v/.failed")); log $log"
  fi
  return 0
}

setup_llamacpp() {
  local d="$DIR/llama.cpp" log="$DIR/logs/llamacpp.log"
  skip_or_go llamacpp "$d" || return 0
  mkdir -p "$d"
  if ! command -v cmake >/dev/null; then
    echo "cmake not found" >"$d/.failed"; say "llamacpp: SKIPPED (cmake not found)"; return 0
  fi
  if [ ! -f "$LLAMACPP_SDIST" ]; then
    say "llamacpp: fetching the llama-cpp-python 0.3.36 sdist"
    mkdir -p "$(dirname "$LLAMACPP_SDIST")"
    python3 -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$(dirname "$LLAMACPP_SDIST")" >"$log" 2>&1
  fi
  if [ ! -f "$LLAMACPP_SDIST" ]; then
    echo "sdist $LLAMACPP_SDIST not found" >"$d/.failed"; say "llamacpp: SKIPPED (no sdist)"; return 0
  fi
  say "llamacpp: building llama-imatrix (up to ${LLAMACPP_TIMEOUT}s, $JOBS jobs; log $log)"
  local t0=$SECONDS gen=() isa=()
  grep -qw avx512f /proc/cpuinfo 2>/dev/null && isa=(-DGGML_AVX512=ON)
  command -v ninja >/dev/null && gen=(-G Ninja)
  {
    if [ ! -f "$d/src/CMakeLists.txt" ]; then
      rm -rf "$d/src" && mkdir -p "$d/src" &&
      tar xzf "$LLAMACPP_SDIST" -C "$d/src" --strip-components=3 llama_cpp_python-0.3.36/vendor/llama.cpp
    fi &&
    # These CPUs report AMX but llama.cpp's AMX path dies with SIGILL: keep it off. AVX-512 only where the CPU
    # has it (an AVX2-only host died with SIGILL in the first matmul).
    cmake -S "$d/src" -B "$d/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF "${isa[@]}" \
      -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=ON \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF &&
    timeout "$LLAMACPP_TIMEOUT" cmake --build "$d/build" --target llama-imatrix -j "$JOBS" &&
    mkdir -p "$d/bin" && cp "$d/build/bin/llama-imatrix" "$d/bin/" &&
    "$d/bin/llama-imatrix" --help >/dev/null 2>&1
  } >>"$log" 2>&1
  if [ $? -eq 0 ]; then
    touch "$d/.ok"; say "llamacpp: ready ($d/bin/llama-imatrix, built in $((SECONDS - t0))s)"
  else
    echo "llama-imatrix build failed after $((SECONDS - t0))s: $(grep -iE 'error|terminated' "$log" | tail -1)" >"$d/.failed"
    say "llamacpp: SKIPPED ($(cat "$d/.failed")); log $log"
  fi
  return 0
}

rc=0
for p in $PEERS; do
  case "$p" in
    llmcompressor|llm-compressor) setup_llmcompressor || rc=1 ;;
    gptqmodel|GPTQModel) setup_gptqmodel ;;
    llamacpp|llama.cpp|llama-imatrix) setup_llamacpp ;;
    *) say "unknown peer $p"; rc=2 ;;
  esac
done
echo "$DIR"
exit $rc

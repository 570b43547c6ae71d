#!/usr/bin/env bash
# One device run (fits 10 minutes): the kernel tests compiled for the GPU (no interpreter), then the
# benchmark. Everything lands in "$OUT": env.txt, test_kernels_cuda.txt, bench_log.txt,
# kernels_bench.json, kernels_bench.md.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (from anywhere; runs in the repo root)
#
# Needs torch with CUDA, triton, numpy, pytest and gguf. When gguf is missing (bare GPU images), a
# wheel in .whl/ is installed to /tmp/site: `pip download gguf --no-deps --only-binary=:all: -d .whl`
# here, then carry .whl to the device.
# Knobs: BENCH_BUDGET_S (default 270), BENCH_FORMATS (default below), BENCH_ARGS (extra args).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} > "$OUT/env.txt" 2>&1

if ! "$PY" -c "import gguf" 2>/dev/null; then
  if ls .whl/gguf-*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gguf-*.whl \
      >> "$OUT/env.txt" 2>&1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
fi
if ! "$PY" -c "import gguf, quantkit.kernels" >> "$OUT/env.txt" 2>&1; then
  echo "gpu_check: gguf / quantkit.kernels not importable (carry a gguf wheel in .whl/); see $OUT/env.txt" | tee -a "$OUT/env.txt"
  exit 3
fi

# 1) correctness: every format and path compiled for this GPU; one fixed GEMM config (no autotuning)
XDIST=""
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
QUANTKIT_TEST_CUDA=1 QUANTKIT_KERNEL_TUNE=0 timeout 260 "$PY" -m pytest tests/test_kernels.py -q -p no:cacheprovider $XDIST \
  2>&1 | tee "$OUT/test_kernels_cuda.txt"
test_rc=${PIPESTATUS[0]}

# 2) benchmark (stops starting new formats after BENCH_BUDGET_S; results are written after every shape)
FORMATS="${BENCH_FORMATS:-gptq4 awq q4_k q6_k q8_0 mxfp4_hf}"
# shellcheck disable=SC2086
timeout 330 "$PY" benchmarks/kernels.py "$OUT" --budget-s "${BENCH_BUDGET_S:-270}" --formats $FORMATS ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT/bench_log.txt"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$test_rc bench rc=$bench_rc" | tee -a "$OUT/env.txt"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

"""Wall time of quantkit's ggml block quantizers vs llama.cpp's ggml_quantize_chunk (single thread).

    python benchmarks/kquant_blocks_speed.py [--rows 4096 --cols 4096 --threads 1 --imatrix]

Both quantize the same float32 matrix; the script also checks that the bytes are identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from quantkit.quant.ggml_types import quantize  # noqa: E402
from oracles import ggml_lib  # noqa: E402


def _best(fn, reps: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (ggml runs single-threaded)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--imatrix", action="store_true", help="also time the importance-matrix path")
    ap.add_argument("--types", default="Q4_K,Q5_K,Q6_K,Q8_0")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    xt = torch.from_numpy(x)
    im = (rng.standard_normal(args.cols) ** 2).astype(np.float32)
    print(f"{args.rows}x{args.cols} float32, torch threads={args.threads}, ggml single-threaded")
    print(f"{'type':6} {'imatrix':7} {'ggml s':>8} {'quantkit s':>10} {'ratio':>6}  identical")
    for name in args.types.split(","):
        qt = T[name.strip().upper()]
        for use_im in ([False, True] if args.imatrix else [False]):
            imx = im if use_im else None
            tg, ref = _best(lambda: ggml_lib.quantize(x, qt, imx), args.reps)
            tq, ours = _best(lambda: quantize(xt, qt, None if imx is None else torch.from_numpy(imx)), args.reps)
            same = bool(np.array_equal(ref, ours.numpy()))
            print(f"{qt.name:6} {str(use_im):7} {tg:8.3f} {tq:10.3f} {tq / tg:6.2f}  {same}")


if __name__ == "__main__":
    main()

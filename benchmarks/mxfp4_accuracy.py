"""MXFP4 scale-rule accuracy: weight MSE of the floor / ceil / best rules.

Reads the 2-D weights of a GGUF model (dequantized with the `gguf` package) plus synthetic
Gaussian and heavy-tailed (Student-t, 3 dof) matrices, quantizes each with every rule, and prints
the MSE relative to the tensor's mean square (lower is better) and the share of blocks where
"best" picked the ceil exponent.

    python benchmarks/mxfp4_accuracy.py [--gguf PATH] [--layers N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from quantkit.quant.mxfp4 import RULES, quantize_mxfp4, mxfp4_error

DEFAULT_GGUF = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_weights(path: Path, layers: int):
    import gguf

    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if len(t.shape) != 2 or t.shape[0] % 32:
            continue
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        rows = gguf.quants.dequantize(t.data, t.tensor_type)
        yield t.name, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))


def synthetic():
    g = torch.Generator().manual_seed(0)
    yield "synthetic.gaussian", torch.randn(1024, 1024, generator=g)
    t = torch.distributions.StudentT(3.0).sample((1024, 1024))
    yield "synthetic.student_t3", t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--layers", type=int, default=4, help="only blk.0..N-1 of the GGUF (plus non-block tensors)")
    args = ap.parse_args()
    torch.manual_seed(0)

    totals = {r: 0.0 for r in RULES}
    print(f"{'tensor':40s} " + " ".join(f"{r:>9s}" for r in RULES) + "  best->ceil")
    sources = [synthetic()]
    if args.gguf.exists():
        sources.append(gguf_weights(args.gguf, args.layers))
    n_real = 0
    for src in sources:
        for name, w in src:
            ms = float(w.square().mean(dtype=torch.float64))
            rel = {}
            exps = {}
            for r in RULES:
                c, e = quantize_mxfp4(w, rule=r, name=name)
                rel[r] = mxfp4_error(w, c, e) / ms
                exps[r] = e
            share = float((exps["best"] != exps["floor"]).float().mean())
            print(f"{name:40s} " + " ".join(f"{rel[r]:9.5f}" for r in RULES) + f"  {share:9.3f}")
            if not name.startswith("synthetic."):
                n_real += 1
                for r in RULES:
                    totals[r] += rel[r]
    if n_real:
        print(f"{'mean over ' + str(n_real) + ' model tensors':40s} " + " ".join(f"{totals[r] / n_real:9.5f}" for r in RULES))


if __name__ == "__main__":
    main()

"""GPTQ's column-by-column step inside a lazy block, compiled: row by row, since rows are independent.

The torch form issues ~8 small ops per column (most of a CPU solve's time for hidden sizes below a few
thousand); here a row's columns run in one compiled loop whose inner update is a contiguous axpy.
Same arithmetic per element and in the same order as the torch form, so results are deterministic and
independent of how many threads or processes run.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from quantkit.quant.ggml_cpu._common import OPTS


@njit(**OPTS)
def _segment(W1, Err1, U1, codes, s, z, a, b, col0, maxq):  # pragma: no cover - compiled
    lo = W1.dtype.type(0)
    loss = 0.0
    out, bs = W1.shape
    for r in range(out):
        sr = s[r]
        zr = z[r]
        w = W1[r]
        for i in range(a, b):
            wi = w[i]
            c = np.rint(wi / sr) + zr
            if c < lo:
                c = lo
            elif c > maxq:
                c = maxq
            err = (wi - sr * (c - zr)) / U1[i, i]
            loss += err * err
            codes[r, col0 + i] = np.uint8(c)
            Err1[r, i] = err
            u = U1[i]
            for k in range(i + 1, bs):
                w[k] -= err * u[k]
    return loss


def usable(*tensors: torch.Tensor) -> bool:
    """The compiled step runs on CPU tensors of float32/float64."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)


def segment(
    W1: torch.Tensor,
    Err1: torch.Tensor,
    U1: torch.Tensor,
    codes: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    a: int,
    b: int,
    col0: int,
    maxq: int,
) -> float:
    """Quantizes block columns a..b-1 (block starting at column col0) with per-row scale s and zero z:
    codes into `codes`, scaled errors into Err1, the rest of the block updated in W1 (all in place).
    Returns the summed squared scaled error."""
    dt = W1.dtype
    Wn = W1.numpy()
    return _segment(
        Wn, Err1.numpy(), U1.contiguous().numpy(), codes.numpy(),
        s.to(dt).contiguous().numpy(), z.to(dt).contiguous().numpy(),
        a, b, col0, Wn.dtype.type(maxq),
    )


@njit(**OPTS)
def _grid_segment(W1, err, codes, a, b, Ub, i1, i2, qmax, z):  # pragma: no cover - compiled
    zero = W1.dtype.type(0)
    R = W1.shape[0]
    for r in range(R):
        w = W1[r]
        for c in range(i1, i2):
            ac = a[r, c]
            bc = b[r, c]
            wc = w[c]
            code = zero
            if ac != zero:
                code = np.rint((wc - bc) / ac) + z
                if code < zero:
                    code = zero
                elif code > qmax:
                    code = qmax
            e = (wc - (ac * (code - z) + bc)) / Ub[c, c]
            codes[r, c] = np.int64(code)
            err[r, c] = e
            u = Ub[c]
            for k in range(c + 1, i2):
                w[k] -= e * u[k]


def grid_segment(W1: torch.Tensor, err: torch.Tensor, codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 Ub: torch.Tensor, i1: int, i2: int, qmax: int, z: int) -> None:
    """Columns i1..i2-1 of a block on fixed per-element grids (value = a * (code - z) + b), the error fed
    forward inside i1..i2 only (kquant_gptq's lazy step); codes (int64), scaled errors and W1 in place."""
    f = W1.numpy().dtype.type
    _grid_segment(W1.numpy(), err.numpy(), codes.numpy(), a.contiguous().numpy(), b.contiguous().numpy(),
                  Ub.contiguous().numpy(), i1, i2, f(qmax), f(z))

"""GPTQ's column-by-column step inside a lazy block, compiled: row by row, since rows are independent.

The torch form issues ~8 small ops per column (most of a CPU solve's time for hidden sizes below a few
thousand); here a row's columns run in one compiled loop whose inner update is a contiguous axpy.
Same arithmetic per element and in the same order as the torch form, so results are deterministic and
independent of how many threads or processes run: rows split over threads (the kernels release the GIL), each
row's loss kept apart and summed in row order.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from quantkit.quant.ggml_cpu._common import OPTS
from quantkit.threads import pool as thread_pool


@njit(**OPTS)
def _segment(W1, Err1, U1, codes, s, z, a, b, col0, maxq, r0, r1, row_loss):  # pragma: no cover - compiled
    lo = W1.dtype.type(0)
    bs = W1.shape[1]
    for r in range(r0, r1):
        sr = s[r]
        zr = z[r]
        w = W1[r]
        loss = 0.0
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
        row_loss[r] = loss


MIN_ROWS = 64  # fewer rows per thread than this: one thread (a thread hop costs more than it saves)


def _rows_on_threads(run, rows: int, threads: int) -> None:
    """run(r0, r1) over rows 0..rows-1, split into contiguous parts on up to `threads` threads."""
    k = max(1, min(threads, rows // MIN_ROWS))
    if k == 1:
        run(0, rows)
        return
    pool = thread_pool("gptq", k - 1)
    cuts = [rows * j // k for j in range(k + 1)]
    futures = [pool.submit(run, cuts[j], cuts[j + 1]) for j in range(1, k)]
    run(cuts[0], cuts[1])  # the first part on the caller: one thread hop less per call
    for f in futures:
        f.result()


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
    threads: int = 1,
) -> float:
    """Quantizes block columns a..b-1 (block starting at column col0) with per-row scale s and zero z:
    codes into `codes`, scaled errors into Err1, the rest of the block updated in W1 (all in place), rows
    spread over `threads` threads. Returns the summed squared scaled error."""
    dt = W1.dtype
    Wn, En, Un, Cn = W1.numpy(), Err1.numpy(), U1.contiguous().numpy(), codes.numpy()
    sn, zn = s.to(dt).contiguous().numpy(), z.to(dt).contiguous().numpy()
    mq = Wn.dtype.type(maxq)
    row_loss = np.zeros(Wn.shape[0], dtype=np.float64)
    _rows_on_threads(lambda r0, r1: _segment(Wn, En, Un, Cn, sn, zn, a, b, col0, mq, r0, r1, row_loss),
                     Wn.shape[0], threads)
    return float(row_loss.sum())


@njit(**OPTS)
def _grid_segment(W1, err, codes, a, b, Ub, i1, i2, qmax, z, r0, r1):  # pragma: no cover - compiled
    zero = W1.dtype.type(0)
    for r in range(r0, r1):
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
                 Ub: torch.Tensor, i1: int, i2: int, qmax: int, z: int, threads: int = 1) -> None:
    """Columns i1..i2-1 of a block on fixed per-element grids (value = a * (code - z) + b), the error fed
    forward inside i1..i2 only (kquant_gptq's lazy step); codes (int64), scaled errors and W1 in place."""
    Wn = W1.numpy()
    f = Wn.dtype.type
    args = (Wn, err.numpy(), codes.numpy(), a.contiguous().numpy(), b.contiguous().numpy(),
            Ub.contiguous().numpy(), i1, i2, f(qmax), f(z))
    _rows_on_threads(lambda r0, r1: _grid_segment(*args, r0, r1), Wn.shape[0], threads)

"""CPU (numba) ggml codecs, bit-exact like the torch ones (kquants.py / ggml_legacy.py) that CUDA runs.

Entry points take and return torch tensors: the scale searches with the torch functions' signatures, and
whole-block quantizers for Q4_0..Q8_0 (no imatrix), Q3_K, Q4_K, Q5_K and Q6_K. Kernels are compiled on first
use and cached on disk (numba's cache), so only the first run on a machine pays for it (~10 s).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .. import block_layout as kq
from ._common import F
from .blocks import (_im_weights, _q3K_pack, _q3K_ref_scales, _q6K_pack, _qxK_pack, _qxK_ref_scales,
                     _qxK_ref_weights, _legacy)
from .search import _q3, _qkx, _qp, _qx


def enabled() -> bool:
    """The CPU kernels are used unless QUANTKIT_KQUANT_BACKEND=torch (tests run both)."""
    return os.environ.get("QUANTKIT_KQUANT_BACKEND", "numba") != "torch"


# ------------------------------------------------------------------ torch-facing wrappers

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad=False):
    xn, wn = _np(x), _np(w)
    n, B = xn.shape
    scale, negmin, L = np.empty(B, F), np.empty(B, F), np.empty((n, B), F)
    _qkx(xn, wn, int(nmax), F(rmin), F(rdelta), int(nstep), bool(use_mad), scale, negmin, L)
    return torch.from_numpy(scale), torch.from_numpy(negmin), torch.from_numpy(L.astype(np.int32))


def make_qx_quants(x, nmax, w=None):
    xn = _np(x)
    wn = xn * xn if w is None else _np(w)
    scale, L = np.empty(xn.shape[1], F), np.empty(xn.shape, np.int32)
    _qx(xn, wn, int(nmax), scale, L)
    return torch.from_numpy(scale), torch.from_numpy(L)


def make_qp_quants(x, nmax, w):
    xt, wt = _np(x.t()), _np(w.t())  # the kernel is block-major
    scale, L = np.empty(xt.shape[0], F), np.empty(xt.shape, np.int32)
    _qp(xt, wt, int(nmax), scale, L)
    return torch.from_numpy(scale), torch.from_numpy(L).t().contiguous()


def make_q3_quants(x, nmax):
    xt = np.ascontiguousarray(_np(x).T)
    scale, L = np.empty(xt.shape[0], F), np.empty(xt.shape, np.int32)
    _q3(xt, int(nmax), scale, L)
    return torch.from_numpy(scale), torch.from_numpy(np.ascontiguousarray(L.T))


_LEGACY = {"q4_0": (0, 18), "q4_1": (1, 20), "q5_0": (2, 22), "q5_1": (3, 24), "q8_0": (4, 34)}


def legacy_blocks(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 reference quantization (no imatrix) of x [rows, n] -> bytes [rows, row_bytes]."""
    code, size = _LEGACY[kind]
    xb = _np(x).reshape(-1, 32)
    out = np.empty((xb.shape[0], size), np.uint8)
    _legacy(xb, code, out)
    return torch.from_numpy(out).reshape(x.shape[0], -1)


def warm_up() -> float:
    """Load every kernel (numba's on-disk cache, or a compile on the first run on a machine); returns seconds.
    Benchmarks call this before timing, as llama.cpp's library is loaded before its timing starts."""
    import time
    t = time.perf_counter()
    x = torch.linspace(-1, 1, 32 * 16).reshape(32, 16)
    make_qkx_quants(x, x.abs(), 31, -0.5, 0.1, 15)
    make_qx_quants(x, 32, None)
    make_qp_quants(x.abs()[:8], 63, x.abs()[:8])
    make_q3_quants(x[:16], 4)
    for kind in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
        legacy_blocks(x.t().contiguous(), kind)
    rows = torch.linspace(-1, 1, 2 * 256).reshape(2, 256)
    im = torch.linspace(0.5, 1, 256)
    for imx in (None, im):
        quantize_qxK(rows, imx, 15)
        quantize_qxK(rows, imx, 31)
        quantize_q6K(rows, imx)
        quantize_q3K(rows, imx)
    return time.perf_counter() - t


def _sub_major(x: torch.Tensor, n: int) -> np.ndarray:
    return _np(kq._sub_major(x, n))


def quantize_qxK(x: torch.Tensor, imatrix: torch.Tensor | None, nmax: int) -> torch.Tensor:
    """Q4_K (nmax 15) / Q5_K (nmax 31) rows -> block bytes, all in the CPU kernels."""
    rows = x.shape[0]
    xb = _sub_major(x, 32)
    B = xb.shape[1]
    S = B // 8
    w = np.empty_like(xb)
    scales, negmin, L = np.empty(B, F), np.empty(B, F), np.empty_like(xb)
    ls, lm = np.empty((S, 8), np.int32), np.empty((S, 8), np.int32)
    dblk, mblk = np.empty(S, F), np.empty(S, F)
    if imatrix is None:
        _qxK_ref_weights(xb, w)
        if nmax == 15:
            _qkx(xb, w, 15, F(-1.0), F(0.1), 20, False, scales, negmin, L)
        else:
            _qkx(xb, w, 31, F(-0.5), F(0.1), 15, False, scales, negmin, L)
        _qxK_ref_scales(scales.reshape(S, 8), negmin.reshape(S, 8), ls, lm, dblk, mblk)
    else:
        sw = np.empty((8, S), F)
        _im_weights(xb, _np(imatrix), 32, F(2), w, sw)
        _qkx(xb, w, nmax, F(-0.9), F(0.05), 36, False, scales, negmin, L)
        swt = np.ascontiguousarray(sw.T)
        _qp(scales.reshape(S, 8), swt, 63, dblk, ls)  # block-major: one super-block per row
        _qp(negmin.reshape(S, 8), swt, 63, mblk, lm)
        if nmax == 31:
            np.minimum(ls, 63, out=ls)
            np.minimum(lm, 63, out=lm)
    out = np.empty((S, 176 if nmax == 31 else 144), np.uint8)
    _qxK_pack(xb, L, ls, lm, dblk, mblk, nmax, out)
    return torch.from_numpy(out).reshape(rows, -1)


def quantize_q6K(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    xb = _sub_major(x, 16)
    B = xb.shape[1]
    if imatrix is None:
        w = xb * xb
    else:
        w = _np(kq._imatrix_cols(imatrix, rows, 16))
    scales, L = np.empty(B, F), np.empty(xb.shape, np.int32)
    _qx(xb, w, 32, scales, L)
    out = np.empty((B // 16, 210), np.uint8)
    _q6K_pack(xb, L, scales.reshape(-1, 16), out)
    return torch.from_numpy(out).reshape(rows, -1)


def quantize_q3K(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    xb = _sub_major(x, 16)
    B = xb.shape[1]
    S = B // 16
    ls, dblk = np.empty((S, 16), np.int32), np.empty(S, F)
    if imatrix is None:
        xt = np.ascontiguousarray(xb.T)
        scales, Lt = np.empty(B, F), np.empty(xt.shape, np.int32)
        _q3(xt, 4, scales, Lt)
        L = np.ascontiguousarray(Lt.T)
        _q3K_ref_scales(scales.reshape(S, 16), ls, dblk)
    else:
        w, sw = np.empty_like(xb), np.empty((16, S), F)
        _im_weights(xb, _np(imatrix), 16, F(2), w, sw)
        scales, L = np.empty(B, F), np.empty(xb.shape, np.int32)
        _qx(xb, w, 4, scales, L)
        Ls = np.empty((16, S), np.int32)
        _qx(np.ascontiguousarray(scales.reshape(S, 16).T), sw, 32, dblk, Ls)
        ls[:] = Ls.T
    out = np.empty((S, 110), np.uint8)
    _q3K_pack(xb, L, ls, dblk, out)
    return torch.from_numpy(out).reshape(rows, -1)

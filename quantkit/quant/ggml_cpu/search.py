"""numba versions of ggml's scale searches (make_qkx2/3_quants, make_qx_quants, make_qp_quants, make_q3_quants).

The torch versions (kquants.py) run every candidate scale as a separate pass over the tensor, which is
memory-bound on a CPU; these loop over a chunk of blocks that stays in L1/L2, with the innermost loop across
blocks so LLVM vectorizes it while each block still sums its elements strictly in ggml's order. Layout as the
torch functions: x, w [n, B] (element index first, one column per block); the per-block greedy searches
(qp, q3) take block-major [B, n]. Every float is float32 and every operation one IEEE op (no fastmath; numpy
error model, so x/0 = inf as in C).
"""

import math

import numpy as np
from numba import njit

from ._common import F
from ._common import OPTS as _OPTS

_CH = 256  # blocks per chunk: the chunk's working set stays in L1/L2
_MAGIC = F(12582912.0)  # 1.5 * 2^23
_EPS = F(1e-15)  # GROUP_MAX_EPS


@njit(inline="always", **_OPTS)
def _nearest_int(v):
    """ggml's nearest_int for any finite float32: the low 23 mantissa bits of fl(v + 1.5*2^23), minus 2^22."""
    s = v + _MAGIC
    if abs(v) < F(4194304.0):
        return np.int32(s - _MAGIC)
    m, _ = math.frexp(abs(s))
    return np.int32((np.int64(m * 16777216.0) & 0x7FFFFF) - 0x400000)


@njit(inline="always", **_OPTS)
def _absmax(v):
    """(max |v|, the signed value at its first occurrence) of a 1-D array, as ggml's strict '>' scans."""
    amax = F(0)
    mx = F(0)
    for k in range(v.shape[0]):
        a = abs(v[k])
        if a > amax:
            amax = a
            mx = v[k]
    return amax, mx


# ------------------------------------------------------------------ make_qkx2/3_quants

@njit(inline="always", **_OPTS)
def _levels_acc(x, w, p, Lrow, acc, fn):
    for j in range(x.shape[0]):
        l = min(max(np.rint(p[0, j] * (x[j] - p[1, j])), F(0)), fn)
        Lrow[j] = l
        wl = w[j] * l
        acc[0, j] += wl
        acc[1, j] += wl * l
        acc[2, j] += wl * x[j]


@njit(inline="always", **_OPTS)
def _err_acc(x, w, L, sm, err, use_mad):
    if use_mad:
        for j in range(x.shape[0]):
            err[j] += w[j] * abs(sm[0, j] * L[j] + sm[1, j] - x[j])
    else:
        for j in range(x.shape[0]):
            d = sm[0, j] * L[j] + sm[1, j] - x[j]
            err[j] += w[j] * (d * d)


@njit(**_OPTS)
def _qkx(x, w, nmax, rmin, rdelta, nstep, use_mad, scale_out, negmin_out, L_out):
    n, B = x.shape
    fn = F(nmax)
    mx = np.empty(_CH, F)
    sw = np.empty(_CH, F)
    sx = np.empty(_CH, F)
    best = np.empty(_CH, F)
    cur = np.empty(_CH, F)
    mn0 = np.empty(_CH, F)
    p = np.empty((2, _CH), F)  # candidate iscale, min
    sm = np.empty((2, _CH), F)  # candidate scale, min
    bs = np.empty((2, _CH), F)  # best scale, min
    acc = np.empty((3, _CH), F)  # sum_l, sum_l2, sum_xl
    Laux = np.empty((n, _CH), F)
    for b0 in range(0, B, _CH):
        m = min(_CH, B - b0)
        for j in range(m):
            v = x[0, b0 + j]
            ww = w[0, b0 + j]
            mn0[j] = v
            mx[j] = v
            sw[j] = ww
            sx[j] = ww * v
        for i in range(1, n):
            xi = x[i, b0:b0 + m]
            wi = w[i, b0:b0 + m]
            for j in range(m):
                v = xi[j]
                mn0[j] = v if v < mn0[j] else mn0[j]
                mx[j] = v if v > mx[j] else mx[j]
                sw[j] += wi[j]
                sx[j] += wi[j] * v
        for j in range(m):
            if mn0[j] > 0:
                mn0[j] = F(0)
            isc = fn / (mx[j] - mn0[j])
            p[0, j] = isc
            p[1, j] = mn0[j]
            sm[0, j] = F(1) / isc
            sm[1, j] = mn0[j]
            best[j] = F(0)
            acc[0, j] = F(0)
            acc[1, j] = F(0)
            acc[2, j] = F(0)
        for i in range(n):
            _levels_acc(x[i, b0:b0 + m], w[i, b0:b0 + m], p, L_out[i, b0:b0 + m], acc, fn)
            _err_acc(x[i, b0:b0 + m], w[i, b0:b0 + m], L_out[i, b0:b0 + m], sm, best, use_mad)
        for j in range(m):
            bs[0, j] = sm[0, j]
            bs[1, j] = mn0[j]
        for s in range(nstep + 1):
            c = (rmin + rdelta * F(s)) + fn
            for j in range(m):
                p[0, j] = c / (mx[j] - bs[1, j])
                p[1, j] = bs[1, j]
                acc[0, j] = F(0)
                acc[1, j] = F(0)
                acc[2, j] = F(0)
                cur[j] = F(0)
            for i in range(n):
                _levels_acc(x[i, b0:b0 + m], w[i, b0:b0 + m], p, Laux[i, :m], acc, fn)
            for j in range(m):
                sl = acc[0, j]
                sl2 = acc[1, j]
                sxl = acc[2, j]
                D = sw[j] * sl2 - sl * sl
                a = (sw[j] * sxl - sx[j] * sl) / D
                b = (sl2 * sx[j] - sl * sxl) / D
                if b > 0:
                    b = F(0)
                    a = sxl / sl2
                sm[0, j] = a
                sm[1, j] = b
            for i in range(n):
                _err_acc(x[i, b0:b0 + m], w[i, b0:b0 + m], Laux[i, :m], sm, cur, use_mad)
            for j in range(m):
                sl = acc[0, j]
                D = sw[j] * acc[1, j] - sl * sl
                if D > 0 and cur[j] < best[j]:
                    best[j] = cur[j]
                    bs[0, j] = sm[0, j]
                    bs[1, j] = sm[1, j]
                    for i in range(n):
                        L_out[i, b0 + j] = Laux[i, j]
        for j in range(m):
            if mx[j] <= mn0[j]:  # all equal (ggml returns early): levels 0, scale 0
                scale_out[b0 + j] = F(0)
                negmin_out[b0 + j] = -mn0[j]
                for i in range(n):
                    L_out[i, b0 + j] = F(0)
            else:
                scale_out[b0 + j] = bs[0, j]
                negmin_out[b0 + j] = -bs[1, j]


# ------------------------------------------------------------------ make_qx_quants (rmse_type 1)

@njit(inline="always", **_OPTS)
def _qx_acc(x, w, isc, acc, nmax):
    lo, hi = F(-nmax), F(nmax - 1)
    for j in range(x.shape[0]):
        l = min(max(np.rint(isc[j] * x[j]), lo), hi)
        wl = w[j] * l
        acc[0, j] += (w[j] * x[j]) * l
        acc[1, j] += wl * l


@njit(**_OPTS)
def _qx(x, w, nmax, scale_out, L_out):
    n, B = x.shape
    fn = F(nmax)
    mxv = np.empty(_CH, F)
    amax = np.empty(_CH, F)
    isc = np.empty(_CH, F)
    bis = np.empty(_CH, F)
    best = np.empty(_CH, F)
    scale = np.empty(_CH, F)
    acc = np.empty((2, _CH), F)
    lo, hi = F(-nmax), F(nmax - 1)
    for b0 in range(0, B, _CH):
        m = min(_CH, B - b0)
        for j in range(m):
            amax[j] = F(0)
            mxv[j] = F(0)
        for i in range(n):  # first max of |x|, as ggml's strict '>'
            xi = x[i, b0:b0 + m]
            for j in range(m):
                a = abs(xi[j])
                if a > amax[j]:
                    amax[j] = a
                    mxv[j] = xi[j]
        for j in range(m):
            isc[j] = -fn / mxv[j]
            acc[0, j] = F(0)
            acc[1, j] = F(0)
        for i in range(n):
            _qx_acc(x[i, b0:b0 + m], w[i, b0:b0 + m], isc, acc, nmax)
        for j in range(m):
            bis[j] = isc[j]
            scale[j] = acc[0, j] / acc[1, j] if acc[1, j] != 0 else F(0)
            best[j] = scale[j] * acc[0, j]
        for s in range(-9, 10):
            if s == 0:
                continue
            c = -(fn + F(0.1) * F(s))
            for j in range(m):
                isc[j] = c / mxv[j]
                acc[0, j] = F(0)
                acc[1, j] = F(0)
            for i in range(n):
                _qx_acc(x[i, b0:b0 + m], w[i, b0:b0 + m], isc, acc, nmax)
            for j in range(m):
                slx = acc[0, j]
                sl2 = acc[1, j]
                if sl2 > 0 and slx * slx > best[j] * sl2:
                    bis[j] = isc[j]
                    scale[j] = slx / sl2
                    best[j] = scale[j] * slx
        for j in range(m):
            zero = amax[j] < _EPS
            scale_out[b0 + j] = F(0) if zero else scale[j]
            for i in range(n):
                L_out[i, b0 + j] = 0 if zero else np.int32(min(max(np.rint(x[i, b0 + j] * bis[j]), lo), hi)) + nmax


# ------------------------------------------------------------------ make_qp_quants / make_q3_quants

@njit(inline="always", **_OPTS)
def _greedy(x, w, L, j, sx, s2, lo, hi, qp):
    """The 5-pass greedy level refinement of one block (row j of the block-major x, w, L); returns
    (sumlx, suml2)."""
    n = x.shape[1]
    for _ in range(5):
        changed = False
        for i in range(n):
            xi = x[j, i]
            wi = w[j, i]
            Li = F(L[j, i])
            slx = sx - (wi * xi) * Li
            sl2 = s2 - (wi * Li) * Li
            nl = _nearest_int((xi * sl2) / slx)
            nl = min(nl, hi) if qp else min(max(nl, lo), hi)
            nf = F(nl)
            slx2 = slx + (wi * xi) * nf
            sl22 = sl2 + (wi * nf) * nf
            if slx > 0 and (sl2 if qp else sl22) > 0 and nl != L[j, i] and (slx2 * slx2) * s2 > (sx * sx) * sl22:
                L[j, i] = (nl & 0xFF) if qp else nl
                sx = slx2
                s2 = sl22
                changed = True
        if not changed:
            break
    return sx, s2


@njit(**_OPTS)
def _qp(x, w, nmax, scale_out, L_out):
    """Block-major: x, w, L_out [B, n]."""
    B, n = x.shape
    fn = F(nmax)
    for j in range(B):
        mx = F(0)
        for i in range(n):
            mx = max(mx, x[j, i])
        if mx < _EPS:
            scale_out[j] = F(0)
            for i in range(n):
                L_out[j, i] = 0
            continue
        iscale = fn / mx
        scale = F(1) / iscale
        best = F(0)
        for i in range(n):
            li = F(_nearest_int(iscale * x[j, i]) & 0xFF)  # ggml keeps these in a uint8_t array
            d = x[j, i] - scale * li
            best += (w[j, i] * d) * d
        for s in range(-4, 5):
            if s == 0:
                continue
            isc = (F(0.1) * F(s) + fn) / mx
            sc = F(1) / isc
            mse = F(0)
            for i in range(n):
                li = F(min(_nearest_int(isc * x[j, i]), nmax))
                d = x[j, i] - sc * li
                mse += (w[j, i] * d) * d
            if mse < best:
                best = mse
                iscale = isc
        sx = F(0)
        s2 = F(0)
        for i in range(n):
            li = min(_nearest_int(iscale * x[j, i]), nmax)
            lf = F(li)
            sx += (w[j, i] * x[j, i]) * lf
            s2 += (w[j, i] * lf) * lf
            L_out[j, i] = li & 0xFF
        sx, s2 = _greedy(x, w, L_out, j, sx, s2, 0, nmax, True)
        scale_out[j] = sx / s2 if s2 > 0 else F(0)


@njit(**_OPTS)
def _q3(x, nmax, scale_out, L_out):
    """Block-major: x, L_out [B, n]."""
    B, n = x.shape
    w = np.empty_like(x)
    for j in range(B):
        for i in range(n):
            w[j, i] = x[j, i] * x[j, i]
    for j in range(B):
        amax, mxv = _absmax(x[j])
        if amax < _EPS:
            scale_out[j] = F(0)
            for i in range(n):
                L_out[j, i] = 0
            continue
        iscale = F(-nmax) / mxv
        sx = F(0)
        s2 = F(0)
        for i in range(n):
            li = min(max(_nearest_int(iscale * x[j, i]), -nmax), nmax - 1)
            lf = F(li)
            sx += (w[j, i] * x[j, i]) * lf
            s2 += (w[j, i] * lf) * lf
            L_out[j, i] = li
        sx, s2 = _greedy(x, w, L_out, j, sx, s2, -nmax, nmax - 1, False)
        scale_out[j] = sx / s2 if s2 > 0 else F(0)
        for i in range(n):
            L_out[j, i] += nmax

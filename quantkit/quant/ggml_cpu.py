"""CPU (numba) versions of ggml's scale searches and 32-element block quantizers, bit-exact like the torch ones.

The torch versions (kquants.py / ggml_legacy.py) run every candidate scale as a separate pass over the
tensor, which is memory-bound on a CPU; these loop over a chunk of blocks that stays in L1/L2, with the
innermost loop across blocks so LLVM vectorizes it while each block still sums its elements strictly in
ggml's order. Same layouts as the torch functions: x, w [n, B] (element index first, one column per block).
Every float is float32 and every operation a single IEEE op (no fastmath, numpy error model: x/0 = inf).
Compiled on first use and cached on disk (numba's cache), so only the first run on a machine pays for it.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from numba import njit

F = np.float32
_OPTS = dict(error_model="numpy", boundscheck=False, nogil=True, cache=True)
_CH = 256  # blocks per chunk: the chunk's working set stays in L1/L2
_MAGIC = F(12582912.0)  # 1.5 * 2^23
_EPS = F(1e-15)  # GROUP_MAX_EPS


def enabled() -> bool:
    """The CPU kernels are used unless QUANTKIT_KQUANT_BACKEND=torch (tests run both)."""
    return os.environ.get("QUANTKIT_KQUANT_BACKEND", "numba") != "torch"


@njit(inline="always", **_OPTS)
def _nearest_int(v):
    """ggml's nearest_int for any finite float32: the low 23 mantissa bits of fl(v + 1.5*2^23), minus 2^22."""
    s = v + _MAGIC
    if abs(v) < F(4194304.0):
        return np.int32(s - _MAGIC)
    m, _ = math.frexp(abs(s))
    return np.int32((np.int64(m * 16777216.0) & 0x7FFFFF) - 0x400000)


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
        amax = F(0)
        mxv = F(0)
        for i in range(n):
            a = abs(x[j, i])
            if a > amax:
                amax = a
                mxv = x[j, i]
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


# ------------------------------------------------------------------ 32-element reference quantizers

_HALF_MINUS = np.nextafter(F(0.5), F(0))


@njit(inline="always", **_OPTS)
def _roundf(v):
    """C roundf (half away from zero): trunc(v + copysign(0.49999997, v)), exact for every finite float32."""
    return np.trunc(v + (_HALF_MINUS if v > 0 else (-_HALF_MINUS if v < 0 else F(0))))


@njit(**_OPTS)
def _ref_sym(xb, nmax, d_out, q_out):
    """Q4_0/Q5_0 ref: d = max/-nmax, q = min(2nmax-1, (int)(x/d + nmax + 0.5)); q uint8 [B, 32]."""
    B = xb.shape[0]
    top = 2 * nmax - 1
    half = F(nmax) + F(0.5)
    for b in range(B):
        amax = F(0)
        mxv = F(0)
        for k in range(32):
            a = abs(xb[b, k])
            if a > amax:
                amax = a
                mxv = xb[b, k]
        d = mxv / F(-nmax)
        idv = F(1) / d if d != 0 else F(0)
        d_out[b] = d
        for k in range(32):
            q_out[b, k] = min(np.int32(xb[b, k] * idv + half), top)


@njit(**_OPTS)
def _ref_asym(xb, nmax, clamp, d_out, m_out, q_out):
    """Q4_1/Q5_1 ref: d = (max-min)/nmax, q = (int)((x-min)/d + 0.5)."""
    B = xb.shape[0]
    for b in range(B):
        mn = xb[b, 0]
        mx = xb[b, 0]
        for k in range(1, 32):
            v = xb[b, k]
            mn = v if v < mn else mn
            mx = v if v > mx else mx
        d = (mx - mn) / F(nmax)
        idv = F(1) / d if d != 0 else F(0)
        d_out[b] = d
        m_out[b] = mn
        for k in range(32):
            q = np.int32((xb[b, k] - mn) * idv + F(0.5))
            q_out[b, k] = min(q, nmax) if clamp else q


@njit(**_OPTS)
def _ref_q8(xb, d_out, q_out):
    B = xb.shape[0]
    for b in range(B):
        amax = F(0)
        for k in range(32):
            amax = max(amax, abs(xb[b, k]))
        d = amax / F(127)
        idv = F(1) / d if d != 0 else F(0)
        d_out[b] = d
        for k in range(32):
            q_out[b, k] = np.int32(_roundf(xb[b, k] * idv))


# ------------------------------------------------------------------ Q4_K / Q5_K / Q6_K block assembly

@njit(inline="always", **_OPTS)
def _fp16(v):
    """float32 -> (fp16 bits, the fp16 value as float32), round-to-nearest-even like ggml's FP32_TO_FP16."""
    sign = 0x8000 if math.copysign(1.0, v) < 0 else 0
    a = abs(np.float64(v))
    if a >= 65520.0:
        return sign | 0x7C00, F(np.inf) if sign == 0 else F(-np.inf)
    if a < 6.103515625e-05:  # below 2^-14: subnormal steps of 2^-24
        q = np.rint(a * 16777216.0)
        val = q / 16777216.0
        return sign | np.int64(q), F(-val if sign else val)
    m, e = math.frexp(a)
    q = np.rint(m * 2048.0)
    if q == 2048.0:
        q = 1024.0
        e += 1
    ex = e - 1 + 15
    if ex >= 31:
        return sign | 0x7C00, F(np.inf) if sign == 0 else F(-np.inf)
    val = math.ldexp(q, e - 11)
    return sign | (ex << 10) | (np.int64(q) - 1024), F(-val if sign else val)


@njit(**_OPTS)
def _qxK_ref_weights(xb, w):
    """quantize_row_q4_K/q5_K_ref weights: av_x + |x|, av_x = sqrt(mean x^2) of each 32-element sub-block."""
    n, B = xb.shape
    for b in range(B):
        s2 = F(0)
        for i in range(n):
            s2 += xb[i, b] * xb[i, b]
        av = np.sqrt(s2 / F(32))
        for i in range(n):
            w[i, b] = av + abs(xb[i, b])


@njit(**_OPTS)
def _im_weights(xb, im, sub, sigma_mul, w, sw):
    """Imatrix weights qw * sqrt(sigma2 + x^2), sigma2 = sigma_mul * (sum of the 256-element super-block's
    squares) / 256, summed in row order; sw[j, s] = sum of sub-block j's weights. xb [sub, B]."""
    n, B = xb.shape
    per = 256 // sub
    ncol = im.shape[0] // sub  # sub-blocks per row
    for s0 in range(0, B, per):
        s2 = F(0)
        for j in range(per):
            for i in range(n):
                s2 += xb[i, s0 + j] * xb[i, s0 + j]
        sigma2 = (sigma_mul * s2) / F(256)
        for j in range(per):
            b = s0 + j
            base = (b % ncol) * sub
            acc = F(0)
            for i in range(n):
                v = im[base + i] * np.sqrt(sigma2 + xb[i, b] * xb[i, b])
                w[i, b] = v
                acc += v
            sw[j, s0 // per] = acc


@njit(**_OPTS)
def _qxK_ref_scales(scales, mins, ls, lm, dblk, mblk):
    """6-bit scales/mins from the per-sub-block ones, as quantize_row_q4_K/q5_K_ref. scales, mins [S, 8]."""
    S = scales.shape[0]
    for s in range(S):
        ms = F(0)
        mm = F(0)
        for j in range(8):
            if scales[s, j] > ms:
                ms = scales[s, j]
            if mins[s, j] > mm:
                mm = mins[s, j]
        inv_s = F(63) / ms if ms > 0 else F(0)
        inv_m = F(63) / mm if mm > 0 else F(0)
        for j in range(8):
            ls[s, j] = min(_nearest_int(inv_s * scales[s, j]) & 0xFF, 63)
            lm[s, j] = min(_nearest_int(inv_m * mins[s, j]) & 0xFF, 63)
        dblk[s] = ms / F(63)
        mblk[s] = mm / F(63)


@njit(**_OPTS)
def _qxK_pack(xb, L, ls, lm, dblk, mblk, nmax, out):
    """Final levels from the fp16-rounded scales, then ggml's block_q4_K / block_q5_K bytes. xb, L [32, B]."""
    S = ls.shape[0]
    five = nmax == 31
    qs0 = 48 if five else 16
    Lb = np.empty(256, np.int32)
    for s in range(S):
        db, dv = _fp16(dblk[s])
        mb, mv = _fp16(mblk[s])
        out[s, 0] = db & 0xFF
        out[s, 1] = db >> 8
        out[s, 2] = mb & 0xFF
        out[s, 3] = mb >> 8
        for j in range(4):
            out[s, 4 + j] = (ls[s, j] | ((ls[s, j + 4] >> 4) << 6)) & 0xFF
            out[s, 8 + j] = (lm[s, j] | ((lm[s, j + 4] >> 4) << 6)) & 0xFF
            out[s, 12 + j] = ((ls[s, j + 4] & 0xF) | ((lm[s, j + 4] & 0xF) << 4)) & 0xFF
        for j in range(8):
            b = 8 * s + j
            d = dv * F(ls[s, j])
            dm = mv * F(lm[s, j])
            for i in range(32):
                if d != 0:
                    Lb[32 * j + i] = min(max(_nearest_int((xb[i, b] + dm) / d), 0), nmax)
                else:
                    Lb[32 * j + i] = np.int32(L[i, b])
        if five:
            for k in range(32):
                out[s, 16 + k] = 0
        for g in range(4):
            for k in range(32):
                l1 = Lb[64 * g + k]
                l2 = Lb[64 * g + 32 + k]
                if five:
                    h = out[s, 16 + k]
                    if l1 > 15:
                        l1 -= 16
                        h |= 1 << (2 * g)
                    if l2 > 15:
                        l2 -= 16
                        h |= 2 << (2 * g)
                    out[s, 16 + k] = h
                out[s, qs0 + 32 * g + k] = (l1 | (l2 << 4)) & 0xFF


@njit(**_OPTS)
def _q6K_pack(xb, L, scales, out):
    """block_q6_K from the 16-element searches: int8 scales, fp16 d, final levels. xb, L [16, B], scales [S, 16]."""
    S = scales.shape[0]
    Lb = np.empty(256, np.int32)
    for s in range(S):
        ma = F(0)
        mxs = F(0)
        for j in range(16):
            a = abs(scales[s, j])
            if a > ma:
                ma = a
                mxs = scales[s, j]
        if ma < _EPS:
            for k in range(210):
                out[s, k] = 0
            continue
        iscale = F(-128) / mxs
        db, dv = _fp16(F(1) / iscale)
        for j in range(16):
            sc = min(_nearest_int(iscale * scales[s, j]), 127)
            sc = ((sc + 128) & 0xFF) - 128  # int8
            out[s, 192 + j] = sc & 0xFF
            d = dv * F(sc)
            b = 16 * s + j
            for i in range(16):
                if d != 0:
                    Lb[16 * j + i] = min(max(_nearest_int(xb[i, b] / d), -32), 31) + 32
                else:
                    Lb[16 * j + i] = L[i, b]
        out[s, 208] = db & 0xFF
        out[s, 209] = db >> 8
        for h in range(2):
            for k in range(32):
                q1 = Lb[128 * h + k]
                q2 = Lb[128 * h + 32 + k]
                q3 = Lb[128 * h + 64 + k]
                q4 = Lb[128 * h + 96 + k]
                out[s, 64 * h + k] = ((q1 & 0xF) | ((q3 & 0xF) << 4)) & 0xFF
                out[s, 64 * h + 32 + k] = ((q2 & 0xF) | ((q4 & 0xF) << 4)) & 0xFF
                out[s, 128 + 32 * h + k] = ((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)) & 0xFF


@njit(**_OPTS)
def _q3K_ref_scales(scales, l_out, d_out):
    """quantize_row_q3_K_ref's 6-bit scales: iscale = -32/max (signed, first max |s|). scales [S, 16]."""
    S = scales.shape[0]
    for s in range(S):
        ma = F(0)
        mxs = F(0)
        for j in range(16):
            a = abs(scales[s, j])
            if a > ma:
                ma = a
                mxs = scales[s, j]
        if mxs == 0:
            d_out[s] = F(0)
            for j in range(16):
                l_out[s, j] = 0  # packs to all-zero scale bytes, as ggml's memset
            continue
        iscale = F(-32) / mxs
        for j in range(16):
            l = ((_nearest_int(iscale * scales[s, j]) + 128) & 0xFF) - 128  # int8_t
            l_out[s, j] = min(max(l, -32), 31) + 32
        d_out[s] = F(1) / iscale


@njit(**_OPTS)
def _q3K_pack(xb, L, ls, dblk, out):
    """block_q3_K: hmask[32], qs[64], scales[12], d. xb, L [16, B] (L with the +4 offset), ls [S, 16] in 0..63."""
    S = ls.shape[0]
    Lb = np.empty(256, np.int32)
    for s in range(S):
        db, dv = _fp16(dblk[s])
        for j in range(8):
            out[s, 96 + j] = ((ls[s, j] & 0xF) | ((ls[s, j + 8] & 0xF) << 4)) & 0xFF
        for k in range(4):
            out[s, 104 + k] = 0
        for j in range(16):
            out[s, 104 + (j % 4)] |= ((ls[s, j] >> 4) & 3) << (2 * (j // 4))
        out[s, 108] = db & 0xFF
        out[s, 109] = db >> 8
        for j in range(16):
            d = dv * F(ls[s, j] - 32)
            b = 16 * s + j
            for i in range(16):
                if d != 0:
                    Lb[16 * j + i] = min(max(_nearest_int(xb[i, b] / d), -4), 3) + 4
                else:
                    Lb[16 * j + i] = L[i, b]
        for k in range(32):
            h = 0
            for j in range(8):
                if Lb[32 * j + k] > 3:
                    h |= 1 << j
                    Lb[32 * j + k] -= 4
            out[s, k] = h
        for h in range(2):
            for k in range(32):
                v = 0
                for j in range(4):
                    v |= Lb[128 * h + 32 * j + k] << (2 * j)
                out[s, 32 + 32 * h + k] = v & 0xFF


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


def _qp_cols(x: np.ndarray, w: np.ndarray, nmax: int, scale: np.ndarray) -> np.ndarray:
    """make_qp_quants on [n, B] inputs (one block per column); returns L [n, B]."""
    L = np.empty(x.shape[::-1], np.int32)
    _qp(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), int(nmax), scale, L)
    return np.ascontiguousarray(L.T)


def make_qp_quants(x, nmax, w):
    xn, wn = _np(x), _np(w)
    scale = np.empty(xn.shape[1], F)
    L = _qp_cols(xn, wn, nmax, scale)
    return torch.from_numpy(scale), torch.from_numpy(L)


def make_q3_quants(x, nmax):
    xt = np.ascontiguousarray(_np(x).T)
    scale, L = np.empty(xt.shape[0], F), np.empty(xt.shape, np.int32)
    _q3(xt, int(nmax), scale, L)
    return torch.from_numpy(scale), torch.from_numpy(np.ascontiguousarray(L.T))


def ref_sym(xb: torch.Tensor, nmax: int):
    xn = _np(xb)
    d, q = np.empty(xn.shape[0], F), np.empty(xn.shape, np.int32)
    _ref_sym(xn, int(nmax), d, q)
    return torch.from_numpy(d), torch.from_numpy(q)


def ref_asym(xb: torch.Tensor, nmax: int, clamp: bool):
    xn = _np(xb)
    d, m, q = np.empty(xn.shape[0], F), np.empty(xn.shape[0], F), np.empty(xn.shape, np.int32)
    _ref_asym(xn, int(nmax), bool(clamp), d, m, q)
    return torch.from_numpy(d), torch.from_numpy(m), torch.from_numpy(q & 0xFF)


def ref_q8(xb: torch.Tensor):
    xn = _np(xb)
    d, q = np.empty(xn.shape[0], F), np.empty(xn.shape, np.int32)
    _ref_q8(xn, d, q)
    return torch.from_numpy(d), torch.from_numpy(q)


@njit(**_OPTS)
def _pack_nibbles_qh(q, out, qs_off, qh_off):
    """q [B, 32] -> qs at qs_off (low nibble j, high nibble j+16) and, if qh_off >= 0, the 32 fifth bits."""
    B = q.shape[0]
    for b in range(B):
        for k in range(16):
            out[b, qs_off + k] = np.uint8((q[b, k] & 0xF) | ((q[b, k + 16] & 0xF) << 4))
        if qh_off >= 0:
            h = 0
            for k in range(32):
                h |= ((q[b, k] >> 4) & 1) << k
            for k in range(4):
                out[b, qh_off + k] = np.uint8((h >> (8 * k)) & 0xFF)


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)  # round-to-nearest-even, as ggml


def legacy_blocks(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 reference quantization (no imatrix) of x [rows, n] -> bytes [rows, row_bytes]."""
    rows = x.shape[0]
    xb = _np(x).reshape(-1, 32)
    B = xb.shape[0]
    d = np.empty(B, F)
    q = np.empty((B, 32), np.int32)
    if kind == "q8_0":
        _ref_q8(xb, d, q)
        out = np.empty((B, 34), np.uint8)
        out[:, 0:2] = _f16(d)
        out[:, 2:] = q.astype(np.int8).view(np.uint8)
        return torch.from_numpy(out).reshape(rows, -1)
    if kind in ("q4_0", "q5_0"):
        _ref_sym(xb, 8 if kind == "q4_0" else 16, d, q)
        hdr = [d]
    else:
        m = np.empty(B, F)
        _ref_asym(xb, 15 if kind == "q4_1" else 31, kind == "q4_1", d, m, q)
        hdr = [d, m]
    five = kind in ("q5_0", "q5_1")
    out = np.empty((B, 2 * len(hdr) + 4 * five + 16), np.uint8)
    for i, v in enumerate(hdr):
        out[:, 2 * i:2 * i + 2] = _f16(v)
    _pack_nibbles_qh(q, out, 2 * len(hdr) + 4 * five, 2 * len(hdr) if five else -1)
    return torch.from_numpy(out).reshape(rows, -1)


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
    return time.perf_counter() - t


def _sub_major(x: torch.Tensor, n: int) -> np.ndarray:
    """[rows, n_per_row] -> [n, B] float32 (one column per n-element group)."""
    return np.ascontiguousarray(_np(x).reshape(-1, n).T)


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
        w = np.ascontiguousarray(np.broadcast_to(_np(imatrix).reshape(-1, 16), (rows, xb.shape[1] // rows, 16))
                                 .reshape(-1, 16).T)
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

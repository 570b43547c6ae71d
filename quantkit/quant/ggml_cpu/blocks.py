"""numba block assembly: ggml's 32-element reference quantizers and the Q3_K..Q6_K scale quantization, fp16
rounding and byte packing (block_q*_K layouts as in ggml-common.h)."""

import math

import numpy as np
from numba import njit

from ._common import F
from ._common import OPTS as _OPTS
from .search import _EPS, _absmax, _nearest_int


# ------------------------------------------------------------------ 32-element reference quantizers

_HALF_MINUS = np.nextafter(F(0.5), F(0))


@njit(inline="always", **_OPTS)
def _roundf(v):
    """C roundf (half away from zero): trunc(v + copysign(0.49999997, v)), exact for every finite float32."""
    return np.trunc(v + (_HALF_MINUS if v > 0 else (-_HALF_MINUS if v < 0 else F(0))))


@njit(inline="always", **_OPTS)
def _put_f16(out, b, off, v):
    bits, _ = _fp16(v)
    out[b, off] = bits & 0xFF
    out[b, off + 1] = bits >> 8


@njit(**_OPTS)
def _legacy(xb, kind, out):
    """ggml's quantize_row_q*_ref for 32-element blocks, straight to block bytes. xb [B, 32];
    kind 0 Q4_0, 1 Q4_1, 2 Q5_0, 3 Q5_1, 4 Q8_0."""
    q = np.empty(32, np.int32)
    for b in range(xb.shape[0]):
        x = xb[b]
        if kind == 4:  # d = amax/127, q = roundf(x/d)
            amax = F(0)
            for k in range(32):
                amax = max(amax, abs(x[k]))
            d = amax / F(127)
            idv = F(1) / d if d != 0 else F(0)
            _put_f16(out, b, 0, d)
            for k in range(32):
                out[b, 2 + k] = np.int32(_roundf(x[k] * idv)) & 0xFF
            continue
        if kind == 0 or kind == 2:  # d = max/-nmax, q = min(2nmax-1, (int)(x/d + nmax + 0.5))
            nmax = 8 if kind == 0 else 16
            _, mxv = _absmax(x)
            d = mxv / F(-nmax)
            idv = F(1) / d if d != 0 else F(0)
            half = F(nmax) + F(0.5)
            for k in range(32):
                q[k] = min(np.int32(x[k] * idv + half), 2 * nmax - 1)
            _put_f16(out, b, 0, d)
            head = 2
        else:  # d = (max-min)/nmax, q = (int)((x-min)/d + 0.5); Q4_1 caps at 15, Q5_1 keeps the uint8
            nmax = 15 if kind == 1 else 31
            mn = x[0]
            mx = x[0]
            for k in range(1, 32):
                mn = x[k] if x[k] < mn else mn
                mx = x[k] if x[k] > mx else mx
            d = (mx - mn) / F(nmax)
            idv = F(1) / d if d != 0 else F(0)
            for k in range(32):
                v = np.int32((x[k] - mn) * idv + F(0.5))
                q[k] = min(v, 15) if kind == 1 else v & 0xFF
            _put_f16(out, b, 0, d)
            _put_f16(out, b, 2, mn)
            head = 4
        five = kind == 2 or kind == 3
        qs = head + 4 if five else head
        for k in range(16):
            out[b, qs + k] = ((q[k] & 0xF) | ((q[k + 16] & 0xF) << 4)) & 0xFF
        if five:
            h = np.int64(0)
            for k in range(32):
                h |= np.int64((q[k] >> 4) & 1) << k
            for k in range(4):
                out[b, head + k] = (h >> (8 * k)) & 0xFF


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
        ma, mxs = _absmax(scales[s])
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
        ma, mxs = _absmax(scales[s])
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

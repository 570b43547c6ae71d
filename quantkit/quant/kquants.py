"""ggml k-quants (Q2_K..Q6_K) and ggml's scale searches: bit-exact torch ports of ggml-quants.c.

Layout convention of the search routines: tensors are [n, B] (element index first) so that
ggml's *sequential* float32 sums become n in-order adds of contiguous [B] vectors; the sums
decide ties between candidate scales, so their order must match ggml's exactly.
Every float op is a single IEEE float32 op (no fused ops, no scalar/tensor reciprocal tricks).
"""

from __future__ import annotations

import numpy as np
import torch

from .block_layout import _imatrix_cols, _sub_major  # noqa: F401  (shared with the CPU kernels)

QK_K = 256
GROUP_MAX_EPS = float(np.float32(1e-15))
_F32 = torch.float32


def _t(v: float, ref: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=_F32, device=ref.device)


def fdiv(a, b) -> torch.Tensor:
    """IEEE float32 a/b. `scalar / tensor` in torch is reciprocal-times (inexact), and CUDA turns
    `tensor / cpu_scalar` into a multiply too, so both operands are made device tensors."""
    if not torch.is_tensor(a):
        a = _t(a, b)
    if not torch.is_tensor(b):
        b = _t(b, a)
    return torch.div(a, b)


def fsqrt(t: torch.Tensor) -> torch.Tensor:
    # torch's vectorized float32 sqrt is not correctly rounded on AVX512; via float64 it is.
    return t.double().sqrt().float()


def nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: add 1.5*2^23 in float32 and read the mantissa (int32 result)."""
    return ((f + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


def round_clamp_(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """In place: nearest_int then clamp, kept in float. Equal to nearest_int for |v| < 2^22, which
    holds wherever this is used (v is a scaled value of the same block, bounded by ~nmax)."""
    return v.round_().clamp_(lo, hi)


_ZIDX: dict[tuple, torch.Tensor] = {}


def seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 strictly in index order, in float32 (as ggml's scalar loops do).
    On CPU index_add_ with an all-zero index adds the slices one after another in one op;
    CUDA's index_add_ uses atomics (unordered), so there the adds are issued one by one."""
    n = t.shape[0]
    if t.device.type == "cpu":
        key = (n, t.device)
        idx = _ZIDX.get(key)
        if idx is None:
            idx = _ZIDX[key] = torch.zeros(n, dtype=torch.long, device=t.device)
        out = torch.zeros((1,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        return out.index_add_(0, idx, t)[0]
    acc = t[0].clone()
    for i in range(1, n):
        acc.add_(t[i])
    return acc


_CPU = []  # [module or None] once imported


def cpu_kernels(x: torch.Tensor):
    """The numba module (ggml_cpu) when x is on the CPU and that backend is on, else None (torch path, also
    taken where numba cannot be imported, e.g. a bare GPU image)."""
    if x.device.type != "cpu":
        return None
    if not _CPU:
        try:
            from . import ggml_cpu
        except ImportError:
            ggml_cpu = None
        _CPU.append(ggml_cpu)
    return _CPU[0] if _CPU[0] is not None and _CPU[0].enabled() else None


def wrap_u8(l: torch.Tensor) -> torch.Tensor:
    return l & 0xFF


def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor | None):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw): symmetric scale search. x [n, B].
    Returns (scale [B], L [n, B] int32 with +nmax offset)."""
    if (cpu := cpu_kernels(x)) is not None:
        return cpu.make_qx_quants(x, nmax, w)
    n, B = x.shape
    ax = x.abs()
    idx = torch.argmax(ax, dim=0, keepdim=True)  # first max, as ggml's strict '>'
    amax = ax.gather(0, idx)[0]
    mx = x.gather(0, idx)[0]
    zero = amax < GROUP_MAX_EPS
    if w is None:
        w = x * x
    wx = w * x
    # preallocated work buffers: fresh large tensors per op cost page faults on every candidate
    buf = torch.empty((n, 2, B), dtype=_F32, device=x.device)
    b0, b1 = buf[:, 0], buf[:, 1]
    lbuf = torch.empty_like(x)

    def sums(iscale):
        l = round_clamp_(torch.mul(x, iscale, out=lbuf), -nmax, nmax - 1)
        torch.mul(wx, l, out=b0)
        torch.mul(w, l, out=b1)
        b1.mul_(l)
        s = seqsum(buf)
        return s[0], s[1]

    best_iscale = fdiv(float(-nmax), mx)
    sumlx, suml2 = sums(best_iscale)
    scale = torch.where(suml2 != 0, fdiv(sumlx, suml2), torch.zeros_like(sumlx))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        c = -(np.float32(nmax) + np.float32(0.1) * np.float32(i))
        iscale = fdiv(float(c), mx)
        sumlx, suml2 = sums(iscale)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(upd, iscale, best_iscale)
        scale = torch.where(upd, fdiv(sumlx, suml2), scale)
        best = torch.where(upd, scale * sumlx, best)
    # the winning candidate's levels, recomputed once instead of tracked per candidate
    L = round_clamp_(x * best_iscale, -nmax, nmax - 1)
    L = L.to(torch.int32) + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L)
    return scale, L


def make_qkx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool = False):
    """make_qkx2_quants / make_qkx3_quants with explicit weights (the two are identical for
    non-NaN input). x, w [n, B]. Returns (scale, the_min, L int32)."""
    if (cpu := cpu_kernels(x)) is not None:
        return cpu.make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad)
    n, B = x.shape
    mn = x.amin(0)
    mx = x.amax(0)
    sw = seqsum(torch.stack([w, w * x], dim=1))
    sum_w, sum_x = sw[0], sw[1]
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    mn0 = mn
    degenerate = mx <= mn
    iscale = fdiv(float(nmax), mx - mn)
    scale = fdiv(1.0, iscale)
    L0 = round_clamp_((x - mn) * iscale, 0, nmax)
    diff = (L0 * scale + mn) - x
    best = seqsum(w * (diff.abs() if use_mad else diff * diff))
    # winner bookkeeping per block: (iscale, min) that produced its levels; -1 marks the initial L0
    win_iscale = torch.full_like(mn, -1.0)
    win_mn = mn
    buf = torch.empty((n, 3, B), dtype=_F32, device=x.device)
    b0, b1, b2 = buf[:, 0], buf[:, 1], buf[:, 2]
    err = torch.empty((n, B), dtype=_F32, device=x.device)
    lbuf = torch.empty((n, B), dtype=_F32, device=x.device)
    for i in range(nstep + 1):
        c = (np.float32(rmin) + np.float32(rdelta) * np.float32(i)) + np.float32(nmax)
        iscale = fdiv(float(c), mx - mn)
        l = round_clamp_(torch.sub(x, mn, out=lbuf).mul_(iscale), 0, nmax)
        torch.mul(w, l, out=b0)
        torch.mul(b0, l, out=b1)
        torch.mul(b0, x, out=b2)
        s = seqsum(buf)
        sum_l, sum_l2, sum_xl = s[0], s[1], s[2]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = fdiv(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = fdiv(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, fdiv(sum_xl, sum_l2), this_scale)
        torch.mul(l, this_scale, out=err)
        err.add_(this_min).sub_(x)
        (err.abs_() if use_mad else err.mul_(err)).mul_(w)
        cur = seqsum(err)
        upd = (D > 0) & (cur < best)
        win_iscale = torch.where(upd, iscale, win_iscale)
        win_mn = torch.where(upd, mn, win_mn)
        best = torch.where(upd, cur, best)
        scale = torch.where(upd, this_scale, scale)
        mn = torch.where(upd, this_min, mn)
    L = round_clamp_((x - win_mn).mul_(win_iscale), 0, nmax)
    L = torch.where(win_iscale < 0, L0, L)
    z = torch.zeros_like(scale)
    scale = torch.where(degenerate, z, scale)
    L = torch.where(degenerate, torch.zeros_like(L), L).to(torch.int32)
    mn = torch.where(degenerate, mn0, mn)
    return scale, -mn, L


def _greedy_refine(x, w, wx, L, sumlx, suml2, lo, hi, qp: bool):
    """The 5-pass greedy level refinement of make_qp_quants (qp=True: levels capped at hi only,
    stored as uint8, requires sl2 > 0 before the move) and make_q3_quants (qp=False: levels in
    [lo, hi], requires sl2 > 0 after the move). Per block it stops after a pass without moves, as
    ggml does; later passes only revisit the blocks that still moved."""
    n = x.shape[0]
    act = None
    for _ in range(5):
        if act is None:
            xs, ws, wxs, Ls, sx, s2 = x, w, wx, L, sumlx, suml2
        else:
            xs, ws, wxs, Ls, sx, s2 = x[:, act], w[:, act], wx[:, act], L[:, act], sumlx[act], suml2[act]
        changed = torch.zeros(xs.shape[1], dtype=torch.bool, device=x.device)
        for i in range(n):
            Li = Ls[i].float()
            slx = sx - wxs[i] * Li
            sl2 = s2 - (ws[i] * Li) * Li
            new_l = nearest_int(fdiv(xs[i] * sl2, slx))
            new_l = new_l.clamp_(max=hi) if qp else new_l.clamp_(lo, hi)
            nl = new_l.float()
            slx2 = slx + wxs[i] * nl
            sl22 = sl2 + (ws[i] * nl) * nl
            acc = (slx > 0) & ((sl2 if qp else sl22) > 0) & (new_l != Ls[i])
            acc &= (slx2 * slx2) * s2 > (sx * sx) * sl22
            Ls[i] = torch.where(acc, wrap_u8(new_l) if qp else new_l, Ls[i])
            sx = torch.where(acc, slx2, sx)
            s2 = torch.where(acc, sl22, s2)
            changed |= acc
        if act is None:
            sumlx, suml2 = sx, s2
            act = torch.nonzero(changed)[:, 0]
        else:
            L[:, act] = Ls
            sumlx[act] = sx
            suml2[act] = s2
            act = act[changed]
        if act.numel() == 0:
            break
    return L, sumlx, suml2


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor):
    """make_qp_quants: positive scale search with greedy refinement. x, w [n, S].
    Returns (scale [S], L [n, S] int32 holding the uint8 values ggml stores)."""
    if (cpu := cpu_kernels(x)) is not None:
        return cpu.make_qp_quants(x, nmax, w)
    n = x.shape[0]
    mx = x.amax(0).clamp(min=0)
    zero = mx < GROUP_MAX_EPS
    iscale = fdiv(float(nmax), mx)
    Lf = wrap_u8(nearest_int(iscale * x)).float()  # ggml keeps these in a uint8_t array
    diff = x - fdiv(1.0, iscale) * Lf
    best = seqsum((w * diff) * diff)
    for i in range(-4, 5):
        if i == 0:
            continue
        c = np.float32(0.1) * np.float32(i) + np.float32(nmax)
        iscale_is = fdiv(float(c), mx)
        l = nearest_int(iscale_is * x).clamp_(max=nmax)
        diff = x - fdiv(1.0, iscale_is) * l.float()
        mse = seqsum((w * diff) * diff)
        upd = mse < best
        best = torch.where(upd, mse, best)
        iscale = torch.where(upd, iscale_is, iscale)
    l = nearest_int(iscale * x).clamp_(max=nmax)
    lf = l.float()
    wx = w * x
    sumlx = seqsum(wx * lf)
    suml2 = seqsum((w * lf) * lf)
    L, sumlx, suml2 = _greedy_refine(x, w, wx, wrap_u8(l), sumlx, suml2, 0, nmax, qp=True)
    scale = torch.where(suml2 > 0, fdiv(sumlx, suml2), torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L)
    return scale, L


# ---------------------------------------------------------------- byte helpers

def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[S] float32 -> [S, 2] uint8 (ggml's fp32->fp16 is round-to-nearest-even, as torch)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def fp16_from(b: torch.Tensor) -> torch.Tensor:
    """[S, 2] uint8 -> [S] float32."""
    return b.contiguous().view(torch.float16).reshape(-1).float()


# ---------------------------------------------------------------- Q4_K / Q5_K

def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """ls, lm [S, 8] int (uint8 values) -> [S, 12] int, ggml's 6-bit scale/min packing."""
    a = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    c = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([a, b, c], dim=1) & 0xFF


def get_scale_min_k4(q: torch.Tensor):
    """[S, 12] packed (int) -> (sc, m) each [S, 8] int."""
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def _quantize_qxK(x: torch.Tensor, imatrix: torch.Tensor | None, nmax: int) -> torch.Tensor:
    """Shared Q4_K (nmax 15) / Q5_K (nmax 31) quantizer. x [rows, n_per_row] float32."""
    if (cpu := cpu_kernels(x)) is not None:
        return cpu.quantize_qxK(x, imatrix, nmax)
    rows = x.shape[0]
    S = x.numel() // QK_K
    xb = _sub_major(x, 32)  # [32, B], B = 8*S
    if imatrix is None:
        # quantize_row_qxK_ref: per-32 weights av_x + |x|, then max-based 6-bit scales
        av_x = fsqrt(fdiv(seqsum(xb * xb), 32.0))
        weights = av_x + xb.abs()
        if nmax == 15:
            scales, mins, L = make_qkx_quants(xb, weights, 15, -1.0, 0.1, 20)
        else:
            scales, mins, L = make_qkx_quants(xb, weights, 31, -0.5, 0.1, 15)
        scales = scales.reshape(S, 8)
        mins = mins.reshape(S, 8)
        zero = torch.zeros_like(scales[:, 0])
        max_scale = scales.amax(1)  # ggml starts from +0 and keeps it unless a value is > 0
        max_scale = torch.where(max_scale > 0, max_scale, zero)
        max_min = mins.amax(1)
        max_min = torch.where(max_min > 0, max_min, zero)
        inv_scale = torch.where(max_scale > 0, fdiv(63.0, max_scale), zero)
        inv_min = torch.where(max_min > 0, fdiv(63.0, max_min), zero)
        ls = wrap_u8(nearest_int(inv_scale[:, None] * scales)).clamp_(max=63)
        lm = wrap_u8(nearest_int(inv_min[:, None] * mins)).clamp_(max=63)
        d_block = fdiv(max_scale, 63.0)
        m_block = fdiv(max_min, 63.0)
    else:
        # quantize_row_qxK_impl: imatrix weights qw*sqrt(sigma2 + x^2), qkx3 search, qp scales
        xs = _sub_major(x, QK_K)  # [256, S]
        sigma2 = fdiv(2 * seqsum(xs * xs), float(QK_K))
        qw = _imatrix_cols(imatrix, rows, 32)
        weights = qw * fsqrt(sigma2.repeat_interleave(8) + xb * xb)
        sw = seqsum(weights).reshape(S, 8).t()
        scales, mins, L = make_qkx_quants(xb, weights, nmax, -0.9, 0.05, 36)
        d_block, ls = make_qp_quants(scales.reshape(S, 8).t().contiguous(), 63, sw)
        m_block, lm = make_qp_quants(mins.reshape(S, 8).t().contiguous(), 63, sw)
        ls, lm = ls.t(), lm.t()
        if nmax == 31:
            ls = ls.clamp(max=63)
            lm = lm.clamp(max=63)
    packed = _pack_scale_min_k4(ls, lm)
    d16 = fp16_bytes(d_block)
    dm16 = fp16_bytes(m_block)
    sc, m = get_scale_min_k4(packed)
    dq = (fp16_from(d16)[:, None] * sc.float()).reshape(-1)
    dmq = (fp16_from(dm16)[:, None] * m.float()).reshape(-1)
    newL = nearest_int(fdiv(xb + dmq, dq)).clamp_(0, nmax)
    L = torch.where(dq != 0, newL, L)
    Lr = L.t().reshape(S, 4, 2, 32)
    lo, hi = Lr[:, :, 0, :], Lr[:, :, 1, :]
    qs = ((lo & 0xF) | ((hi & 0xF) << 4)).reshape(S, 128)
    parts = [d16, dm16, packed.to(torch.uint8)]
    if nmax == 31:
        shifts = (2 * torch.arange(4, device=x.device)).reshape(1, 4, 1)
        qh = ((((lo >> 4) & 1) << shifts) | (((hi >> 4) & 1) << (shifts + 1))).sum(1)
        parts.append(qh.to(torch.uint8))
    parts.append(qs.to(torch.uint8))
    return torch.cat(parts, dim=1).reshape(rows, -1)


def quantize_q4_K(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    return _quantize_qxK(x, imatrix, 15)


def quantize_q5_K(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    return _quantize_qxK(x, imatrix, 31)


def _dequantize_qxK(b: torch.Tensor, high_bits: bool) -> torch.Tensor:
    S = b.shape[0]
    d = fp16_from(b[:, 0:2])
    dmin = fp16_from(b[:, 2:4])
    sc, m = get_scale_min_k4(b[:, 4:16].int())
    qs = b[:, -128:].int().reshape(S, 4, 32)
    q = torch.stack([qs & 0xF, qs >> 4], dim=2)  # [S, 4, 2, 32]
    if high_bits:
        qh = b[:, 16:48].int().reshape(S, 1, 1, 32)
        bit = (2 * torch.arange(4, device=b.device)).reshape(1, 4, 1, 1) + torch.arange(2, device=b.device).reshape(1, 1, 2, 1)
        q = q + ((qh >> bit) & 1) * 16
    q = q.reshape(S, 8, 32).float()
    d1 = (d[:, None] * sc.float())[:, :, None]
    m1 = (dmin[:, None] * m.float())[:, :, None]
    return (d1 * q - m1).reshape(S, QK_K)


def dequantize_q4_K(b: torch.Tensor) -> torch.Tensor:
    return _dequantize_qxK(b.reshape(-1, 144), False)


def dequantize_q5_K(b: torch.Tensor) -> torch.Tensor:
    return _dequantize_qxK(b.reshape(-1, 176), True)


# ---------------------------------------------------------------- Q6_K

def quantize_q6_K(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    if (cpu := cpu_kernels(x)) is not None:
        return cpu.quantize_q6K(x, imatrix)
    rows = x.shape[0]
    S = x.numel() // QK_K
    xb = _sub_major(x, 16)  # [16, B], B = 16*S
    qw = None if imatrix is None else _imatrix_cols(imatrix, rows, 16)
    scales, L = make_qx_quants(xb, 32, qw)
    scales = scales.reshape(S, 16)
    idx = torch.argmax(scales.abs(), dim=1, keepdim=True)
    max_scale = scales.gather(1, idx)[:, 0]
    zero_blk = max_scale.abs() < GROUP_MAX_EPS
    iscale = fdiv(-128.0, max_scale)
    d16 = fp16_bytes(fdiv(1.0, iscale))
    sc = nearest_int(iscale[:, None] * scales).clamp_(max=127)
    sc = ((sc + 128) & 0xFF) - 128  # stored as int8
    dq = (fp16_from(d16)[:, None] * sc.float()).reshape(-1)
    newL = nearest_int(fdiv(xb, dq)).clamp_(-32, 31) + 32
    L = torch.where(dq != 0, newL, L)
    Lr = L.t().reshape(S, 2, 4, 32)
    q1, q2, q3, q4 = Lr[:, :, 0], Lr[:, :, 1], Lr[:, :, 2], Lr[:, :, 3]
    ql = torch.stack([(q1 & 0xF) | ((q3 & 0xF) << 4), (q2 & 0xF) | ((q4 & 0xF) << 4)], dim=2).reshape(S, 128)
    qh = ((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)).reshape(S, 64)
    out = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), (sc & 0xFF).to(torch.uint8), d16], dim=1)
    out[zero_blk] = 0
    return out.reshape(rows, -1)


def dequantize_q6_K(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 210)
    S = b.shape[0]
    ql = b[:, 0:128].int().reshape(S, 2, 2, 32)
    qh = b[:, 128:192].int().reshape(S, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float().reshape(S, 16)
    d = fp16_from(b[:, 208:210])
    lo = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)  # [S,2,4,32]
    hb = (qh >> (2 * torch.arange(4, device=b.device)).reshape(1, 1, 4, 1)) & 3
    q = ((lo | (hb << 4)) - 32).float().reshape(S, 8, 2, 16)  # 16-element groups, scale index per group
    ds = (d[:, None] * sc).reshape(S, 8, 2, 1)
    return (ds * q).reshape(S, QK_K)


# ---------------------------------------------------------------- Q3_K / Q2_K

def make_q3_quants(x: torch.Tensor, nmax: int):
    """make_q3_quants(n, nmax, x, L, do_rmse=true): x [n, B] -> (scale [B], L [n, B] int32, +nmax)."""
    if (cpu := cpu_kernels(x)) is not None:
        return cpu.make_q3_quants(x, nmax)
    n = x.shape[0]
    ax = x.abs()
    idx = torch.argmax(ax, dim=0, keepdim=True)
    zero = ax.gather(0, idx)[0] < GROUP_MAX_EPS
    iscale = fdiv(float(-nmax), x.gather(0, idx)[0])
    L = nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = L.float()
    sumlx = seqsum(wx * lf)
    suml2 = seqsum((w * lf) * lf)
    L, sumlx, suml2 = _greedy_refine(x, w, wx, L, sumlx, suml2, -nmax, nmax - 1, qp=False)
    scale = torch.where(suml2 > 0, fdiv(sumlx, suml2), torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L + nmax)
    return scale, L


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """[S, 256] 2-bit values -> [S, 64]: byte h*32+l holds L[h*128 + 32k + l] at bits 2k."""
    Lr = L.reshape(-1, 2, 4, 32)
    sh = (2 * torch.arange(4, device=L.device)).reshape(1, 1, 4, 1)
    return (Lr << sh).sum(2).reshape(-1, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    q = qs.int().reshape(-1, 2, 1, 32)
    sh = (2 * torch.arange(4, device=qs.device)).reshape(1, 1, 4, 1)
    return ((q >> sh) & 3).reshape(-1, QK_K)


def _pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """[S, 16] 6-bit values -> [S, 12] as quantize_row_q3_K packs them."""
    lo = l & 0xF
    hi = (l >> 4) & 3
    first = lo[:, :8] | (lo[:, 8:] << 4)
    sh = (2 * torch.arange(4, device=l.device)).reshape(1, 4, 1)
    top = (hi.reshape(-1, 4, 4).transpose(1, 2) << sh.transpose(1, 2)).sum(2)  # byte 8+j%4, bits 2*(j/4)
    return torch.cat([first, top], dim=1) & 0xFF


def _unpack_q3_scales(b: torch.Tensor) -> torch.Tensor:
    """[S, 12] -> [S, 16] signed scales (6-bit value - 32)."""
    b = b.int()
    lo = torch.cat([b[:, :8] & 0xF, b[:, :8] >> 4], dim=1)
    j = torch.arange(16, device=b.device)
    hi = (b[:, 8 + (j % 4)] >> (2 * (j // 4))) & 3
    return (lo | (hi << 4)) - 32


def quantize_q3_K(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    if (cpu := cpu_kernels(x)) is not None:
        return cpu.quantize_q3K(x, imatrix)
    rows = x.shape[0]
    S = x.numel() // QK_K
    xb = _sub_major(x, 16)  # [16, B], B = 16*S
    if imatrix is None:
        scales, L = make_q3_quants(xb, 4)
        sc = scales.reshape(S, 16)
        idx = torch.argmax(sc.abs(), dim=1, keepdim=True)
        max_scale = sc.gather(1, idx)[:, 0]
        iscale = fdiv(-32.0, max_scale)
        l = nearest_int(iscale[:, None] * sc)
        l = (((l + 128) & 0xFF) - 128).clamp_(-32, 31) + 32  # int8_t, then clamp
        packed = _pack_q3_scales(l)
        has = max_scale != 0
        packed = torch.where(has[:, None], packed, torch.zeros_like(packed))
        d_block = torch.where(has, fdiv(1.0, iscale), torch.zeros_like(iscale))
    else:
        xs = _sub_major(x, QK_K)
        sigma2 = fdiv(2 * seqsum(xs * xs), float(QK_K))
        qw = _imatrix_cols(imatrix, rows, 16)
        weights = qw * fsqrt(sigma2.repeat_interleave(16) + xb * xb)
        sw = seqsum(weights).reshape(S, 16).t().contiguous()
        scales, L = make_qx_quants(xb, 4, weights)
        d_block, Ls = make_qx_quants(scales.reshape(S, 16).t().contiguous(), 32, sw)
        packed = _pack_q3_scales(Ls.t())
    d16 = fp16_bytes(d_block)
    dq = (fp16_from(d16)[:, None] * _unpack_q3_scales(packed).float()).reshape(-1)
    newL = nearest_int(fdiv(xb, dq)).clamp_(-4, 3) + 4
    L = torch.where(dq != 0, newL, L).t().reshape(S, QK_K)
    hbits = (L > 3).int().reshape(S, 8, 32)
    hmask = (hbits << torch.arange(8, device=x.device).reshape(1, 8, 1)).sum(1)
    L = torch.where(L > 3, L - 4, L)
    out = torch.cat([hmask.to(torch.uint8), _pack_2bit(L).to(torch.uint8), packed.to(torch.uint8), d16], dim=1)
    return out.reshape(rows, -1)


def dequantize_q3_K(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 110)
    S = b.shape[0]
    hm = b[:, 0:32].int().reshape(S, 1, 32)
    hbit = ((hm >> torch.arange(8, device=b.device).reshape(1, 8, 1)) & 1).reshape(S, QK_K)
    q = _unpack_2bit(b[:, 32:96]) - torch.where(hbit == 1, 0, 4)
    dl = fp16_from(b[:, 108:110])[:, None] * _unpack_q3_scales(b[:, 96:108]).float()
    return (dl[:, :, None] * q.reshape(S, 16, 16).float()).reshape(S, QK_K)


def quantize_q2_K(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.shape[0]
    S = x.numel() // QK_K
    xb = _sub_major(x, 16)
    if imatrix is None:
        scales, mins, L = make_qkx_quants(xb, xb.abs(), 3, -0.5, 0.1, 15, use_mad=True)
        sc, mn = scales.reshape(S, 16), mins.reshape(S, 16)
        zero = torch.zeros_like(sc[:, 0])
        max_scale = sc.amax(1)
        max_scale = torch.where(max_scale > 0, max_scale, zero)
        max_min = mn.amax(1)
        max_min = torch.where(max_min > 0, max_min, zero)
        ls = torch.where((max_scale > 0)[:, None], nearest_int(fdiv(15.0, max_scale)[:, None] * sc), 0)
        lm = torch.where((max_min > 0)[:, None], nearest_int(fdiv(15.0, max_min)[:, None] * mn), 0)
        d_block = torch.where(max_scale > 0, fdiv(max_scale, 15.0), zero)
        m_block = torch.where(max_min > 0, fdiv(max_min, 15.0), zero)
    else:
        xs = _sub_major(x, QK_K)
        sigma2 = fdiv(seqsum(xs * xs), float(QK_K))
        qw = _imatrix_cols(imatrix, rows, 16)
        weights = qw * fsqrt(sigma2.repeat_interleave(16) + xb * xb)
        sw = seqsum(weights).reshape(S, 16).t().contiguous()
        scales, mins, L = make_qkx_quants(xb, weights, 3, -0.9, 0.05, 36)
        d_block, ls = make_qp_quants(scales.reshape(S, 16).t().contiguous(), 15, sw)
        m_block, lm = make_qp_quants(mins.reshape(S, 16).t().contiguous(), 15, sw)
        ls, lm = ls.t(), lm.t()
    packed = (ls | (lm << 4)) & 0xFF
    d16, dm16 = fp16_bytes(d_block), fp16_bytes(m_block)
    dq = (fp16_from(d16)[:, None] * (packed & 0xF).float()).reshape(-1)
    dmq = (fp16_from(dm16)[:, None] * (packed >> 4).float()).reshape(-1)
    newL = nearest_int(fdiv(xb + dmq, dq)).clamp_(0, 3)
    L = torch.where(dq != 0, newL, L).t().reshape(S, QK_K)
    out = torch.cat([packed.to(torch.uint8), _pack_2bit(L).to(torch.uint8), d16, dm16], dim=1)
    return out.reshape(rows, -1)


def dequantize_q2_K(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 84)
    S = b.shape[0]
    sc = b[:, 0:16].int()
    q = _unpack_2bit(b[:, 16:80]).reshape(S, 16, 16).float()
    dl = (fp16_from(b[:, 80:82])[:, None] * (sc & 0xF).float())[:, :, None]
    ml = (fp16_from(b[:, 82:84])[:, None] * (sc >> 4).float())[:, :, None]
    return (dl * q - ml).reshape(S, QK_K)

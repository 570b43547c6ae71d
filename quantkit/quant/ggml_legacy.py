"""ggml 32-element block quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): bit-exact torch ports of ggml-quants.c.

Without an imatrix ggml uses the *_ref round-to-grid quantizers; with one it searches the
scale (make_qx_quants / make_qkx3_quants) under weights qw * sqrt(sigma2 + x^2), where
sigma2 is the mean square of the whole row.  Q8_0 ignores the imatrix.
"""

from __future__ import annotations

import numpy as np
import torch

from quantkit.quant.kquants import (
    cpu_kernels, fdiv, fp16_bytes, fp16_from, fsqrt, make_qkx_quants, make_qx_quants, seqsum,
)

QK = 32


_HALF_MINUS = float(np.nextafter(np.float32(0.5), np.float32(0)))


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero; torch.round is half-to-even): trunc(v + copysign(0.49999997, v))
    is exact for every finite float32 (0.5 itself would round 0.49999997 up)."""
    return torch.trunc(torch.sign(v).mul_(_HALF_MINUS).add_(v))


def _signed_absmax(xb: torch.Tensor) -> torch.Tensor:
    """The value with the largest |x| in each row of [B, 32] (first one on ties, as ggml)."""
    idx = torch.argmax(xb.abs(), dim=1, keepdim=True)
    return xb.gather(1, idx)[:, 0]


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, fdiv(1.0, d), torch.zeros_like(d))


def _nibbles(L: torch.Tensor) -> torch.Tensor:
    """[B, 32] ints (0..15 used) -> [B, 16] uint8: low nibble j, high nibble j+16."""
    return ((L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)).to(torch.uint8)


def _qh_bytes(L: torch.Tensor) -> torch.Tensor:
    """[B, 32] 5-bit ints -> [B, 4] uint8: bit k of the little-endian uint32 = bit 4 of L[k]."""
    bits = ((L >> 4) & 1).reshape(-1, 4, 8)
    w = (1 << torch.arange(8, device=L.device, dtype=L.dtype))
    return (bits * w).sum(-1).to(torch.uint8)


def _row_weights(x: torch.Tensor, imatrix: torch.Tensor) -> torch.Tensor:
    """quant weights qw[j] * sqrt(sigma2 + x^2), laid out [32, B] for the scale searches."""
    rows, n = x.shape
    xt = x.t().contiguous()
    sigma2 = fdiv(seqsum(xt * xt), float(n))  # sequential over the whole row, as ggml
    xb = x.reshape(-1, QK)
    qw = imatrix.reshape(1, -1).expand(rows, -1).reshape(-1, QK)
    w = qw * fsqrt(sigma2.repeat_interleave(n // QK)[:, None] + xb * xb)
    return w.t().contiguous()


def quantize_q8_0(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    if (cpu := cpu_kernels(x)) is not None:
        return cpu.legacy_blocks(x, "q8_0")
    rows = x.shape[0]
    xb = x.reshape(-1, QK)
    d = fdiv(xb.abs().amax(1), 127.0)
    q = _roundf(xb * _inv(d)[:, None]).to(torch.int32)
    out = torch.cat([fp16_bytes(d), (q & 0xFF).to(torch.uint8)], dim=1)
    return out.reshape(rows, -1)


def _sym_ref(xb: torch.Tensor, nmax: int):
    """Q4_0/Q5_0 ref: d = max/-nmax, q = min(2nmax-1, (int)(x/d + nmax + 0.5))."""
    d = fdiv(_signed_absmax(xb), float(-nmax))
    v = xb * _inv(d)[:, None] + (nmax + 0.5)
    return d, torch.trunc(v).to(torch.int32).clamp_(max=2 * nmax - 1)


def _asym_ref(xb: torch.Tensor, nmax: int, clamp: bool):
    """Q4_1/Q5_1 ref: d = (max-min)/nmax, q = (int)((x-min)/d + 0.5)."""
    mn = xb.amin(1)
    d = fdiv(xb.amax(1) - mn, float(nmax))
    q = torch.trunc((xb - mn[:, None]) * _inv(d)[:, None] + 0.5).to(torch.int32)
    if clamp:
        q = q.clamp_(max=nmax)
    return d, mn, q & 0xFF


def _sym_imatrix(x: torch.Tensor, imatrix: torch.Tensor, nmax: int):
    w = _row_weights(x, imatrix)
    d, L = make_qx_quants(x.reshape(-1, QK).t().contiguous(), nmax, w)
    return d, L.t()


def _asym_imatrix(x: torch.Tensor, imatrix: torch.Tensor, nmax: int):
    w = _row_weights(x, imatrix)
    d, the_min, L = make_qkx_quants(x.reshape(-1, QK).t().contiguous(), w, nmax, -0.9, 0.05, 36)
    return d, -the_min, L.t()


def quantize_q4_0(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    if imatrix is None and (cpu := cpu_kernels(x)) is not None:
        return cpu.legacy_blocks(x, "q4_0")
    rows = x.shape[0]
    if imatrix is None:
        d, q = _sym_ref(x.reshape(-1, QK), 8)
    else:
        d, q = _sym_imatrix(x, imatrix, 8)
    return torch.cat([fp16_bytes(d), _nibbles(q)], dim=1).reshape(rows, -1)


def quantize_q5_0(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    if imatrix is None and (cpu := cpu_kernels(x)) is not None:
        return cpu.legacy_blocks(x, "q5_0")
    rows = x.shape[0]
    if imatrix is None:
        d, q = _sym_ref(x.reshape(-1, QK), 16)
    else:
        d, q = _sym_imatrix(x, imatrix, 16)
    return torch.cat([fp16_bytes(d), _qh_bytes(q), _nibbles(q)], dim=1).reshape(rows, -1)


def quantize_q4_1(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    if imatrix is None and (cpu := cpu_kernels(x)) is not None:
        return cpu.legacy_blocks(x, "q4_1")
    rows = x.shape[0]
    if imatrix is None:
        d, m, q = _asym_ref(x.reshape(-1, QK), 15, clamp=True)
    else:
        d, m, q = _asym_imatrix(x, imatrix, 15)
    return torch.cat([fp16_bytes(d), fp16_bytes(m), _nibbles(q)], dim=1).reshape(rows, -1)


def quantize_q5_1(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    if imatrix is None and (cpu := cpu_kernels(x)) is not None:
        return cpu.legacy_blocks(x, "q5_1")
    rows = x.shape[0]
    if imatrix is None:
        d, m, q = _asym_ref(x.reshape(-1, QK), 31, clamp=False)
    else:
        d, m, q = _asym_imatrix(x, imatrix, 31)
    return torch.cat([fp16_bytes(d), fp16_bytes(m), _qh_bytes(q), _nibbles(q)], dim=1).reshape(rows, -1)


# ---------------------------------------------------------------- dequantization

def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    q = qs.int()
    return torch.cat([q & 0xF, q >> 4], dim=1)


def _unqh(qh: torch.Tensor) -> torch.Tensor:
    b = qh.int()
    bits = (b[:, :, None] >> torch.arange(8, device=qh.device)) & 1
    return bits.reshape(-1, 32) << 4


def dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 34)
    q = b[:, 2:].contiguous().view(torch.int8).float()
    return q * fp16_from(b[:, 0:2])[:, None]


def dequantize_q4_0(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 18)
    return (_unnibble(b[:, 2:]) - 8).float() * fp16_from(b[:, 0:2])[:, None]


def dequantize_q4_1(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 20)
    q = _unnibble(b[:, 4:]).float()
    return q * fp16_from(b[:, 0:2])[:, None] + fp16_from(b[:, 2:4])[:, None]


def dequantize_q5_0(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 22)
    q = (_unnibble(b[:, 6:]) | _unqh(b[:, 2:6])) - 16
    return q.float() * fp16_from(b[:, 0:2])[:, None]


def dequantize_q5_1(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 24)
    q = (_unnibble(b[:, 8:]) | _unqh(b[:, 4:8])).float()
    return q * fp16_from(b[:, 0:2])[:, None] + fp16_from(b[:, 2:4])[:, None]

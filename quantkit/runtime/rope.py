"""Rotary position embedding frequencies for the scaling variants (none, linear, llama3, yarn), as HF computes them."""

from __future__ import annotations

import math

import torch

from ..graph import HParams


def inv_freq_and_scale(hp: HParams) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim/2] (float32) and the attention scaling applied to cos/sin."""
    dim, base, rs = hp.rotary_dim, hp.rope_theta, hp.rope_scaling
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rs.kind == "none":
        return inv, 1.0
    if rs.kind == "linear":
        return inv / rs.factor, 1.0
    if rs.kind == "llama3":
        low_wl = rs.original_context / rs.low_freq_factor
        high_wl = rs.original_context / rs.high_freq_factor
        wl = 2 * math.pi / inv
        out = torch.where(wl > low_wl, inv / rs.factor, inv)
        smooth = (rs.original_context / wl - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * out / rs.factor + smooth * out
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        return torch.where(medium, smoothed, out), 1.0
    if rs.kind == "yarn":
        return _yarn(hp)
    if rs.kind == "freq_factors":
        return inv / torch.tensor(rs.freq_factors, dtype=torch.float32), 1.0
    raise ValueError(f"unknown rope scaling {rs.kind}")


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _yarn(hp: HParams) -> tuple[torch.Tensor, float]:
    rs, dim, base = hp.rope_scaling, hp.rotary_dim, hp.rope_theta
    factor = rs.factor
    orig = rs.original_context or hp.context_length
    att = rs.attention_factor
    if att is None:
        att = _mscale(factor, rs.mscale) / _mscale(factor, rs.mscale_all_dim) if rs.mscale and rs.mscale_all_dim \
            else _mscale(factor)
    beta_fast, beta_slow = rs.beta_fast or 32, rs.beta_slow or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return inter * (1 - keep) + extra * keep, float(att)


def cos_sin(hp: HParams, positions: torch.Tensor, device=None, dtype=torch.float32):
    """cos/sin [T, rotary_dim] in the HF rotate-half layout (frequencies repeated twice)."""
    inv, scale = inv_freq_and_scale(hp)
    freqs = positions.to(torch.float32)[:, None] * inv.to(positions.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).to(device=device, dtype=dtype), (emb.sin() * scale).to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; rotates the first rotary_dim dims (partial rotary keeps the rest)."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rot = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = xr * cos + rot * sin
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out

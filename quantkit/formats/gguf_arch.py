"""GGUF tensor layout helpers: the q/k row permutation llama.cpp's "llama" arch expects, and the rope
frequency factors it stores for llama3 scaling. (Per-family metadata lives in each family's class.)"""

from __future__ import annotations

import math

import torch

from ..graph import HParams


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> interleaved pairs (what llama.cpp's 'llama' arch applies RoPE to)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(hp: HParams) -> torch.Tensor:
    """The rope_freqs.weight llama.cpp uses for llama3 scaling (it divides each frequency by its factor),
    computed as llama.cpp's converter does: in float32 tensor arithmetic (so the bytes are the same)."""
    rs = hp.rope_scaling
    dim = hp.rotary_dim
    freqs = 1.0 / (hp.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wl = rs.original_context / rs.low_freq_factor
    high_wl = rs.original_context / rs.high_freq_factor
    out = []
    for f in freqs:  # 0-d float32 tensors
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(rs.factor)
        else:
            smooth = (rs.original_context / wl - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
            out.append(float(1 / ((1 - smooth) / rs.factor + smooth)))
    return torch.tensor(out, dtype=torch.float32)

"""Causal softmax attention in float32 on the CPU as oneDNN products over query tiles.

torch's CPU flash attention runs its float32 products through MKL (AVX2 kernels on AMD CPUs); here each head's
scores and weighted values are two oneDNN GEMMs per tile of TILE queries, which read only the keys up to the
tile's last query (3/4 of the full square at 512 tokens): 5.2 ms vs SDPA's 8.5 ms for SmolLM2's 9 heads x 512
tokens on one Zen 5 core, the same error against a float64 reference. 256-query tiles beat 128 (6.6 ms; two
threads side by side 6.4 vs 7.8 ms a pair): a tile's ops cost more in dispatch than the keys they skip.
"""

from __future__ import annotations

import torch

from .. import gemm

TILE = 256


def usable(q: torch.Tensor) -> bool:
    """Whether causal() computes on oneDNN for q [B, H, T, d] (float32 on the CPU, no autograd)."""
    return q.dim() == 4 and gemm.onednn(q, q[0, 0])


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v for q [B, H, T, d], k / v [B, Hkv, T, d] (H a multiple of Hkv: grouped
    heads read their shared k / v in place). Returns [B, T, H, dv], the layout the output projection reads."""
    b_, h_, t, d = q.shape
    rep = h_ // k.shape[1]
    q = (q * (d ** -0.5 if scale is None else scale)).contiguous()
    k, v = k.contiguous(), v.contiguous()
    out = q.new_empty(b_, t, h_, v.shape[-1])
    mask = torch.full((min(t, TILE), min(t, TILE)), float("-inf")).triu_(1)
    for b in range(b_):
        for h in range(h_):
            qh, kh, vh = q[b, h], k[b, h // rep], v[b, h // rep]
            for i0 in range(0, t, TILE):
                i1 = min(t, i0 + TILE)
                s = gemm.linear(qh[i0:i1], kh[:i1])
                s[:, i0:] += mask[:i1 - i0, :i1 - i0]
                out[b, i0:i1, h] = gemm.linear(torch.softmax(s, -1), vh[:i1].T)
    return out

"""Lightning attention (MiniMax-Text-01 / M1): linear attention with a fixed per-head decay.

q, k, v = silu(attn_qkv(x)) (per head [q | k | v], head_dim each); head h of layer i decays its state by
exp(-s_h) per token, s_h = (2^(-8/H))^(h+1) * (1 - i / (L - 1) + 1e-5) (no parameters: computed, as
transformers and llama.cpp do); o_t = sum_{j<=t} exp(-s_h (t - j)) (q_t . k_j) v_j, computed as one masked
decay matrix in float32; out = attn_output(sigmoid(attn_gate(x)) * RMSNorm(o over all heads, eps 1e-6)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ATTN_OUT, HParams
from .base import Block

ATTN_QKV, ATTN_GATE, ATTN_NORM_2 = "attn_qkv", "attn_gate", "attn_norm_2"  # llama.cpp's minimax01 names


def slopes(hp: HParams, layer: int) -> torch.Tensor:
    h = hp.n_heads
    base = 1 / (2 ** (8 / h))
    return base ** (torch.arange(h, dtype=torch.float32) + 1) * (1 - layer / (hp.n_layers - 1 + 1e-5) + 1e-5)


class LightningAttention(Block):
    attr = "attn"

    def tensors(self, hp, layer):
        d, w = hp.hidden_size, hp.n_heads * hp.head_dim
        return {f"{ATTN_QKV}.weight": (3 * w, d), f"{ATTN_GATE}.weight": (w, d), f"{ATTN_NORM_2}.weight": (w,),
                f"{ATTN_OUT}.weight": (d, w)}

    def linears(self):
        return (ATTN_QKV, ATTN_GATE, ATTN_OUT)

    def input_groups(self):
        return ((ATTN_QKV, ATTN_GATE), (ATTN_OUT,))

    def build(self, hp, layer, get, has):
        return LightningModule(hp, layer, get)


class LightningModule(nn.Module):
    def __init__(self, hp: HParams, layer: int, get):
        super().__init__()
        self.h, self.d = hp.n_heads, hp.head_dim
        self.qkv = get(ATTN_QKV, linear=True)
        self.gate = get(ATTN_GATE, linear=True)
        self.o = get(ATTN_OUT, linear=True)
        self.norm = nn.Parameter(get(ATTN_NORM_2), requires_grad=False)
        self.register_buffer("slope", slopes(hp, layer), persistent=False)

    def linears(self) -> dict[str, nn.Module]:
        return {ATTN_QKV: self.qkv, ATTN_GATE: self.gate, ATTN_OUT: self.o}

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = F.silu(self.qkv(x)).view(b, t, self.h, 3 * self.d).transpose(1, 2).float().split(self.d, dim=-1)
        i = torch.arange(t, device=x.device, dtype=torch.float32)
        dist = i[:, None] - i[None, :]
        decay = torch.exp(-self.slope.to(x.device)[:, None, None] * dist.clamp(min=0))
        decay = decay.masked_fill(dist < 0, 0.0)  # [H, T, T]
        o = ((q @ k.transpose(-1, -2)) * decay) @ v
        o = o.transpose(1, 2).reshape(b, t, self.h * self.d)
        o = self.norm * (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return self.o(torch.sigmoid(self.gate(x)) * o)

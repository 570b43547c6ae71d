"""Attention blocks: multi-head / grouped-query attention with RoPE (or none), optional q/k/v/o biases,
q/k RMSNorm per head or over the whole projection (or weightless, Llama 4's L2 norm), sliding windows, chunked
attention (Llama 4), per-head sink logits, a query scale other than 1/sqrt(head_dim), position-dependent
query temperature (Llama 4's NoPE layers), logit soft-capping (Gemma 2) and q/k/v clipping (OLMo's
clip_qkv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ATTN_K, ATTN_K_NORM, ATTN_OUT, ATTN_Q, ATTN_Q_NORM, ATTN_V, HParams
from ..runtime.rope import apply_rope
from .base import Block, ScaleGroup
from .norms import RMSNorm

ATTN_SINKS = "attn_sinks"


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight, in float32 (Llama 4's L2Norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Attention(Block):
    """qk_norm: None, "head" (RMSNorm over head_dim, shared by heads: Qwen3), "full" (over the whole
    projection: OLMo 2, OLMoE) or "l2" (per head, no weight: Llama 4's L2 norm; a rotation-invariant norm, so
    applying it before RoPE equals Llama 4's after); qk_norm_kind "rms1p" for Gemma 3's (1 + w). chunk: a token
    attends only within its block of `chunk` positions (Llama 4's chunked attention). temperature:
    (floor_scale, scale): q at position p is multiplied by log1p(floor((p + 1) / floor_scale)) * scale + 1
    (Llama 4's attention temperature tuning; positions count from the start of the sequence). sinks: one learned logit per
    head joins every softmax (gpt-oss). scale: the q.k multiplier (None: head_dim ** -0.5). softcap:
    logits -> softcap * tanh(logits / softcap) before the mask (Gemma 2). clip: q, k and v clamped to
    [-clip, clip] after their projections and a "full" q/k norm (OLMo, OLMoE clip_qkv)."""

    attr = "attn"
    positional = True

    def __init__(self, bias: bool = False, out_bias: bool = False, qk_norm: str | None = None,
                 sinks: bool = False, rope: bool = True, qk_norm_kind: str = "rms", scale: float | None = None,
                 softcap: float | None = None, clip: float | None = None, chunk: int | None = None,
                 temperature: tuple[float, float] | None = None):
        self.bias, self.out_bias, self.qk_norm, self.sinks, self.rope = bias, out_bias, qk_norm, sinks, rope
        self.qk_norm_kind, self.scale, self.softcap, self.clip = qk_norm_kind, scale, softcap, clip
        self.chunk, self.temperature = chunk, temperature

    def tensors(self, hp: HParams, layer: int):
        d, hd = hp.hidden_size, hp.head_dim
        nq, nkv = hp.n_heads * hd, hp.n_kv_heads * hd
        s = {f"{ATTN_Q}.weight": (nq, d), f"{ATTN_K}.weight": (nkv, d), f"{ATTN_V}.weight": (nkv, d),
             f"{ATTN_OUT}.weight": (d, nq)}
        if self.bias:
            s.update({f"{ATTN_Q}.bias": (nq,), f"{ATTN_K}.bias": (nkv,), f"{ATTN_V}.bias": (nkv,)})
        if self.out_bias:
            s[f"{ATTN_OUT}.bias"] = (d,)
        if self.qk_norm == "head":
            s.update({f"{ATTN_Q_NORM}.weight": (hd,), f"{ATTN_K_NORM}.weight": (hd,)})
        elif self.qk_norm == "full":
            s.update({f"{ATTN_Q_NORM}.weight": (nq,), f"{ATTN_K_NORM}.weight": (nkv,)})
        if self.sinks:
            s[f"{ATTN_SINKS}.weight"] = (hp.n_heads,)
        return s

    def linears(self):
        return (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT)

    def input_groups(self):
        return ((ATTN_Q, ATTN_K, ATTN_V), (ATTN_OUT,))

    def scale_groups(self, hp, layer, prev_norm):
        groups = []
        # a norm over the whole q/k projection mixes columns' scales: the norm -> qkv fold still holds
        if prev_norm is not None:
            groups.append(ScaleGroup(prev_norm, "norm", (ATTN_Q, ATTN_K, ATTN_V), self.attr))
        # v -> o only when v's output feeds o column for column: under GQA each v row feeds several o columns
        if hp.n_kv_heads == hp.n_heads:
            groups.append(ScaleGroup(ATTN_V, "linear", (ATTN_OUT,), "linear"))
        return groups

    def no_clip(self):
        return frozenset({ATTN_Q, ATTN_K})  # the q.k product is hard to clip for

    def build(self, hp, layer, get, has):
        return AttentionModule(hp, layer, self, get)


class AttentionModule(nn.Module):
    def __init__(self, hp: HParams, layer: int, spec: Attention, get):
        super().__init__()
        self.hp, self.layer, self.spec = hp, layer, spec
        self.q = get(ATTN_Q, linear=True)
        self.k = get(ATTN_K, linear=True)
        self.v = get(ATTN_V, linear=True)
        self.o = get(ATTN_OUT, linear=True)
        off = 1.0 if spec.qk_norm_kind == "rms1p" else 0.0
        weighted = spec.qk_norm in ("head", "full")
        self.q_norm = RMSNorm(get(ATTN_Q_NORM), hp.norm_eps, off) if weighted else None
        self.k_norm = RMSNorm(get(ATTN_K_NORM), hp.norm_eps, off) if weighted else None
        self.scale = spec.scale if spec.scale is not None else hp.head_dim ** -0.5
        self.sinks = nn.Parameter(get(ATTN_SINKS), requires_grad=False) if spec.sinks else None
        self.window = hp.sliding_window if hp.is_sliding(layer) else None

    def linears(self) -> dict[str, nn.Linear]:
        return {ATTN_Q: self.q, ATTN_K: self.k, ATTN_V: self.v, ATTN_OUT: self.o}

    def forward(self, x, cos, sin):
        hp = self.hp
        b, t, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.spec.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.spec.clip is not None:
            c = self.spec.clip
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(b, t, hp.n_heads, hp.head_dim)
        k = k.view(b, t, hp.n_kv_heads, hp.head_dim)
        v = v.view(b, t, hp.n_kv_heads, hp.head_dim)
        if self.spec.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.spec.qk_norm == "l2":
            q, k = l2_norm(q, hp.norm_eps), l2_norm(k, hp.norm_eps)
        if self.spec.temperature is not None:
            floor_scale, scale = self.spec.temperature
            pos = torch.arange(t, device=q.device, dtype=torch.float32)
            q = (q * (torch.log1p(torch.floor((pos + 1.0) / floor_scale)) * scale + 1.0)[:, None, None]).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.spec.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = hp.n_heads // hp.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # SDPA's scale=None is its own head_dim ** -0.5: pass only a scale that differs
        scale = self.spec.scale
        if self.sinks is not None or self.spec.softcap is not None:
            y = self._eager_attention(q, k, v, t)
        elif (self.window is not None and self.window < t) or (self.spec.chunk is not None and self.spec.chunk < t):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._allowed(t, q.device), scale=scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return self.o(y.transpose(1, 2).reshape(b, t, hp.n_heads * hp.head_dim))

    def _allowed(self, t, device):
        i = torch.arange(t, device=device)
        allowed = i[None, :] <= i[:, None]
        if self.window is not None:
            allowed = allowed & (i[:, None] - i[None, :] < self.window)
        if self.spec.chunk is not None:
            allowed = allowed & (i[:, None] // self.spec.chunk == i[None, :] // self.spec.chunk)
        return allowed

    def _eager_attention(self, q, k, v, t):
        """Softmax over the causal (windowed), optionally soft-capped logits, plus (gpt-oss) one sink logit
        per head that takes no value."""
        b = q.shape[0]
        logits = (q @ k.transpose(-1, -2)) * self.scale
        if self.spec.softcap is not None:
            logits = torch.tanh(logits / self.spec.softcap) * self.spec.softcap
        logits = logits.masked_fill(~self._allowed(t, q.device), float("-inf"))
        if self.sinks is None:
            return torch.softmax(logits.float(), dim=-1).to(v.dtype) @ v
        sink = self.sinks.to(logits.dtype).view(1, -1, 1, 1).expand(b, -1, t, 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1).float(), dim=-1)[..., :-1].to(v.dtype)
        return probs @ v

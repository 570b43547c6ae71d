"""Attention blocks: multi-head / grouped-query attention with RoPE (or none), optional q/k/v/o biases,
q/k RMSNorm per head or over the whole projection (or weightless, Llama 4's L2 norm), sliding windows, chunked
attention (Llama 4), per-head sink logits, a query scale other than 1/sqrt(head_dim), position-dependent
query temperature (Llama 4's NoPE layers), logit soft-capping (Gemma 2), q/k/v clipping (OLMo's clip_qkv),
one fused q/k/v projection (BLOOM, Qwen v1) and ALiBi position biases instead of RoPE (BLOOM, Baichuan 13B)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ATTN_K, ATTN_K_NORM, ATTN_OUT, ATTN_Q, ATTN_Q_NORM, ATTN_QKV, ATTN_V, HParams
from ..runtime.rope import apply_rope
from . import causal_cpu
from .base import Block, ScaleGroup, rope_text
from .norms import NAMES, RMSNorm

ATTN_SINKS = "attn_sinks"


def alibi_slopes(n_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """Per-head ALiBi slopes as llama.cpp (ggml_soft_max_ext) and BLOOM compute them: geometric over the
    largest power of two <= n_heads, the remaining heads interleaved from the next power's sequence."""
    n2 = 2 ** math.floor(math.log2(n_heads))
    m0, m1 = 2.0 ** (-max_bias / n2), 2.0 ** (-(max_bias / 2.0) / n2)
    return torch.tensor([m0 ** (h + 1) if h < n2 else m1 ** (2 * (h - n2) + 1) for h in range(n_heads)],
                        dtype=torch.float64)


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
    [-clip, clip] after their projections and a "full" q/k norm (OLMo, OLMoE clip_qkv). fused: one attn_qkv
    linear whose rows are [q; k; v]. alibi: the ALiBi max bias (slopes per `alibi_slopes`; no RoPE then)."""

    attr = "attn"
    output_linear = ATTN_OUT
    positional = True

    def __init__(self, bias: bool = False, out_bias: bool = False, qk_norm: str | None = None,
                 sinks: bool = False, rope: bool = True, qk_norm_kind: str = "rms", scale: float | None = None,
                 softcap: float | None = None, clip: float | None = None, fused: bool = False,
                 alibi: float | None = None, chunk: int | None = None,
                 temperature: tuple[float, float] | None = None):
        self.bias, self.out_bias, self.qk_norm, self.sinks = bias, out_bias, qk_norm, sinks
        self.rope = rope and alibi is None
        self.qk_norm_kind, self.scale, self.softcap, self.clip = qk_norm_kind, scale, softcap, clip
        self.fused, self.alibi = fused, alibi
        self.chunk, self.temperature = chunk, temperature

    def tensors(self, hp: HParams, layer: int):
        d, hd = hp.hidden_size, hp.head_dim
        nq, nkv = hp.n_heads * hd, hp.n_kv_heads * hd
        rows = {ATTN_QKV: nq + 2 * nkv} if self.fused else {ATTN_Q: nq, ATTN_K: nkv, ATTN_V: nkv}
        s = {f"{n}.weight": (r, d) for n, r in rows.items()}
        s[f"{ATTN_OUT}.weight"] = (d, nq)
        if self.bias:
            s.update({f"{n}.bias": (r,) for n, r in rows.items()})
        if self.out_bias:
            s[f"{ATTN_OUT}.bias"] = (d,)
        if self.qk_norm == "head":
            s.update({f"{ATTN_Q_NORM}.weight": (hd,), f"{ATTN_K_NORM}.weight": (hd,)})
        elif self.qk_norm == "full":
            s.update({f"{ATTN_Q_NORM}.weight": (nq,), f"{ATTN_K_NORM}.weight": (nkv,)})
        if self.sinks:
            s[f"{ATTN_SINKS}.weight"] = (hp.n_heads,)
        return s

    def _qkv(self):
        return (ATTN_QKV,) if self.fused else (ATTN_Q, ATTN_K, ATTN_V)

    def linears(self):
        return (*self._qkv(), ATTN_OUT)

    def input_groups(self):
        return (self._qkv(), (ATTN_OUT,))

    def scale_groups(self, hp, layer, prev_norm):
        groups = []
        # a norm over the whole q/k projection mixes columns' scales: the norm -> qkv fold still holds
        if prev_norm is not None:
            groups.append(ScaleGroup(prev_norm, "norm", self._qkv(), self.attr))
        # v -> o only when v's output feeds o column for column: under GQA each v row feeds several o columns
        # (a fused qkv is one linear: its v rows cannot take a scale apart from q and k)
        if hp.n_kv_heads == hp.n_heads and not self.fused:
            groups.append(ScaleGroup(ATTN_V, "linear", (ATTN_OUT,), "linear"))
        return groups

    def no_clip(self):
        return frozenset({ATTN_QKV} if self.fused else {ATTN_Q, ATTN_K})  # the q.k product is hard to clip for

    def build(self, hp, layer, get, has):
        return AttentionModule(hp, layer, self, get)

    def describe(self, hp, layer, rope=None):
        nh, nkv = hp.n_heads, hp.n_kv_heads
        kind = "MHA" if nh == nkv else "MQA" if nkv == 1 else "GQA"
        heads = f"{nh} heads" + (f", {nkv} KV heads" if nkv != nh else "") + f", head dim {hp.head_dim}"
        alibi = bool(getattr(self, "alibi", False))
        position = "ALiBi" if alibi else rope_text(hp, rope) if self.rope else "no position encoding"
        window = hp.sliding_window if hp.is_sliding(layer) else None
        parts = [f"{kind} attention ({heads})", position, f"sliding window {window}" if window else "full context"]
        if self.qk_norm:
            parts.append(f"q/k {NAMES[self.qk_norm_kind]} " + ("per head" if self.qk_norm == "head" else "over the projection"))
        if self.bias or self.out_bias:
            parts.append(("q/k/v" if self.bias else "") + ("+o" if self.bias and self.out_bias else "o" if self.out_bias else "") + " bias")
        if self.softcap:
            parts.append(f"logit soft-cap {self.softcap:g}")
        if self.sinks:
            parts.append("attention sinks")
        if self.clip:
            parts.append(f"q/k/v clipped at ±{self.clip:g}")
        if self.scale is not None and abs(self.scale - hp.head_dim ** -0.5) > 1e-9:
            parts.append(f"query scale {self.scale:.4g}")
        return {"block": "attention", "kind": kind, "heads": nh, "kv_heads": nkv, "head_dim": hp.head_dim,
                "position": "alibi" if alibi else "rope" if self.rope else "none", "rope": rope if self.rope else None,
                "sliding_window": window, "qk_norm": self.qk_norm, "softcap": self.softcap, "sinks": self.sinks,
                "bias": self.bias, "clip": self.clip, "text": ", ".join(parts)}


class AttentionModule(nn.Module):
    def __init__(self, hp: HParams, layer: int, spec: Attention, get):
        super().__init__()
        self.hp, self.layer, self.spec = hp, layer, spec
        if spec.fused:
            self.qkv = get(ATTN_QKV, linear=True)
        else:
            self.q = get(ATTN_Q, linear=True)
            self.k = get(ATTN_K, linear=True)
            self.v = get(ATTN_V, linear=True)
        self.o = get(ATTN_OUT, linear=True)
        self.slopes = alibi_slopes(hp.n_heads, spec.alibi) if spec.alibi is not None else None
        off = 1.0 if spec.qk_norm_kind == "rms1p" else 0.0
        weighted = spec.qk_norm in ("head", "full")
        self.q_norm = RMSNorm(get(ATTN_Q_NORM), hp.norm_eps, off) if weighted else None
        self.k_norm = RMSNorm(get(ATTN_K_NORM), hp.norm_eps, off) if weighted else None
        self.scale = spec.scale if spec.scale is not None else hp.head_dim ** -0.5
        self.sinks = nn.Parameter(get(ATTN_SINKS), requires_grad=False) if spec.sinks else None
        self.window = hp.sliding_window if hp.is_sliding(layer) else None

    def linears(self) -> dict[str, nn.Linear]:
        if self.spec.fused:
            return {ATTN_QKV: self.qkv, ATTN_OUT: self.o}
        return {ATTN_Q: self.q, ATTN_K: self.k, ATTN_V: self.v, ATTN_OUT: self.o}

    def forward(self, x, cos, sin):
        hp = self.hp
        b, t, _ = x.shape
        q, k, v = self._project(x)
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
        # SDPA's scale=None is its own head_dim ** -0.5: pass only a scale that differs
        scale = self.spec.scale
        masked = (self.window is not None and self.window < t) or (self.spec.chunk is not None and self.spec.chunk < t)
        if self.slopes is None and self.sinks is None and self.spec.softcap is None and not masked:
            if causal_cpu.usable(q):
                return self.o(causal_cpu.causal(q, k, v, scale).reshape(b, t, hp.n_heads * hp.head_dim))
            # grouped heads read in place: the same bits as repeated k / v, without the copies
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=rep > 1)
            return self.o(y.transpose(1, 2).reshape(b, t, hp.n_heads * hp.head_dim))
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.slopes is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._alibi_mask(t, q), scale=scale)
        elif self.sinks is not None or self.spec.softcap is not None:
            y = self._eager_attention(q, k, v, t)
        else:  # a sliding window or chunk shorter than the sequence
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._allowed(t, q.device), scale=scale)
        return self.o(y.transpose(1, 2).reshape(b, t, hp.n_heads * hp.head_dim))

    def _project(self, x):
        """q, k, v projections of the layer input."""
        if self.spec.fused:
            nq, nkv = self.hp.n_heads * self.hp.head_dim, self.hp.n_kv_heads * self.hp.head_dim
            return self.qkv(x).split((nq, nkv, nkv), dim=-1)
        return self.q(x), self.k(x), self.v(x)

    def _allowed(self, t, device):
        i = torch.arange(t, device=device)
        allowed = i[None, :] <= i[:, None]
        if self.window is not None:
            allowed = allowed & (i[:, None] - i[None, :] < self.window)
        if self.spec.chunk is not None:
            allowed = allowed & (i[:, None] // self.spec.chunk == i[None, :] // self.spec.chunk)
        return allowed

    def _alibi_mask(self, t, q):
        """slope_h * (j - i) on allowed (causal, windowed) positions, -inf elsewhere: [heads, t, t]."""
        i = torch.arange(t, device=q.device)
        dist = (i[None, :] - i[:, None]).to(torch.float64)
        bias = (self.slopes.to(q.device)[:, None, None] * dist).to(q.dtype)
        return bias.masked_fill(~self._allowed(t, q.device), float("-inf"))

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

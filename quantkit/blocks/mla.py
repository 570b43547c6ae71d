"""Multi-head latent attention (DeepSeek V2/V3, Kimi-K2).

q: q_b(RMSNorm(q_a(x))) (or one q projection when q_lora_rank is None: V2-Lite), per head
[nope | rope]. kv_a_mqa(x) gives a latent [kv_lora_rank] (RMSNorm'd, then kv_b -> per head [k_nope | v])
and one rope key [qk_rope_head_dim] shared by all heads. RoPE rotates adjacent pairs of the rope dims
(the checkpoints' "interleaved" layout, llama.cpp's NORM rope) unless hp.extra["rope_interleave"] is False.
The softmax scale is qk_head_dim^-0.5 times YaRN's mscale(factor, mscale_all_dim)^2.

hp: head_dim = qk_nope + qk_rope, rope_dim = qk_rope; extra: q_lora_rank, kv_lora_rank, qk_nope_head_dim,
qk_rope_head_dim, v_head_dim. cos/sin come from the executor (runtime/rope.py over rope_dim, with YaRN's
attention factor already applied).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ATTN_OUT, ATTN_Q, HParams
from .base import Block, ScaleGroup, rope_text
from .norms import RMSNorm

ATTN_Q_A, ATTN_Q_A_NORM, ATTN_Q_B = "attn_q_a", "attn_q_a_norm", "attn_q_b"
ATTN_KV_A_MQA, ATTN_KV_A_NORM, ATTN_KV_B = "attn_kv_a_mqa", "attn_kv_a_norm", "attn_kv_b"


def mla_dims(hp: HParams) -> tuple[int | None, int, int, int, int]:
    x = hp.extra
    return (x.get("q_lora_rank"), int(x["kv_lora_rank"]), int(x["qk_nope_head_dim"]), int(x["qk_rope_head_dim"]),
            int(x["v_head_dim"]))


def softmax_scale(hp: HParams) -> float:
    """qk_head_dim^-0.5, times mscale^2 under YaRN with mscale_all_dim (as DeepSeek's reference)."""
    _, _, nope, rope, _ = mla_dims(hp)
    s = (nope + rope) ** -0.5
    rs = hp.rope_scaling
    if rs.kind == "yarn" and rs.mscale_all_dim and rs.factor > 1:
        m = 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0
        s *= m * m
    return s


class MLA(Block):
    attr = "attn"
    output_linear = ATTN_OUT
    positional = True

    def __init__(self, q_lora: bool = True):
        self.q_lora = q_lora

    def _q(self):
        return (ATTN_Q_A, ATTN_Q_B) if self.q_lora else (ATTN_Q,)

    def tensors(self, hp: HParams, layer: int):
        qr, kvr, nope, rope, v = mla_dims(hp)
        d, h = hp.hidden_size, hp.n_heads
        s = {f"{ATTN_KV_A_MQA}.weight": (kvr + rope, d), f"{ATTN_KV_A_NORM}.weight": (kvr,),
             f"{ATTN_KV_B}.weight": (h * (nope + v), kvr), f"{ATTN_OUT}.weight": (d, h * v)}
        if self.q_lora:
            s.update({f"{ATTN_Q_A}.weight": (qr, d), f"{ATTN_Q_A_NORM}.weight": (qr,),
                      f"{ATTN_Q_B}.weight": (h * (nope + rope), qr)})
        else:
            s[f"{ATTN_Q}.weight"] = (h * (nope + rope), d)
        return s

    def linears(self):
        return self._q() + (ATTN_KV_A_MQA, ATTN_KV_B, ATTN_OUT)

    def input_groups(self):
        first = (self._q()[0], ATTN_KV_A_MQA)
        rest = ((ATTN_Q_B,),) if self.q_lora else ()
        return (first,) + rest + ((ATTN_KV_B,), (ATTN_OUT,))

    def scale_groups(self, hp, layer, prev_norm):
        # the inner norms live inside this block's module, where AWQ's norm folding does not look
        return [ScaleGroup(prev_norm, "norm", (self._q()[0], ATTN_KV_A_MQA), self.attr)] if prev_norm else []

    def no_clip(self):
        return frozenset(self._q()[-1:] + (ATTN_KV_A_MQA,))

    def build(self, hp, layer, get, has):
        return MLAModule(hp, self, get)

    def describe(self, hp, layer, rope=None):
        qr, kvr, nope, rd, v = mla_dims(hp)
        q = f"q LoRA rank {qr}" if self.q_lora else "plain q projection"
        window = hp.sliding_window if hp.is_sliding(layer) else None
        return {"block": "attention", "kind": "MLA", "heads": hp.n_heads, "q_lora_rank": qr if self.q_lora else None,
                "kv_lora_rank": kvr, "nope_dim": nope, "rope_dim": rd, "v_dim": v, "position": "rope", "rope": rope,
                "sliding_window": window,
                "text": f"MLA attention ({hp.n_heads} heads, {q}, KV LoRA rank {kvr}, q/k {nope} + {rd} RoPE dims, "
                        f"v dim {v}), " + rope_text(hp, rope).replace(f" on {hp.rotary_dim} of {hp.head_dim} dims", "")
                        + (f", sliding window {window}" if window else "")}


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1), (x2, x3) ...; cos/sin [T, rd] in the rotate-half layout."""
    c, s = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)


class MLAModule(nn.Module):
    def __init__(self, hp: HParams, spec: MLA, get):
        super().__init__()
        self.hp, self.spec = hp, spec
        _, self.kv_rank, self.nope, self.rope, self.v_dim = mla_dims(hp)
        if spec.q_lora:
            self.q_a = get(ATTN_Q_A, linear=True)
            self.q_a_norm = RMSNorm(get(ATTN_Q_A_NORM), 1e-6)
            self.q_b = get(ATTN_Q_B, linear=True)
        else:
            self.q = get(ATTN_Q, linear=True)
        self.kv_a = get(ATTN_KV_A_MQA, linear=True)
        self.kv_a_norm = RMSNorm(get(ATTN_KV_A_NORM), 1e-6)
        self.kv_b = get(ATTN_KV_B, linear=True)
        self.o = get(ATTN_OUT, linear=True)
        self.scale = softmax_scale(hp)
        self.interleave = hp.extra.get("rope_interleave", True)

    def linears(self) -> dict[str, nn.Linear]:
        q = {ATTN_Q_A: self.q_a, ATTN_Q_B: self.q_b} if self.spec.q_lora else {ATTN_Q: self.q}
        return {**q, ATTN_KV_A_MQA: self.kv_a, ATTN_KV_B: self.kv_b, ATTN_OUT: self.o}

    def _rope(self, x, cos, sin):
        if self.interleave:
            return rope_pairs(x, cos, sin)
        from ..runtime.rope import apply_rope
        return apply_rope(x, cos, sin)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        h = self.hp.n_heads
        q = self.q_b(self.q_a_norm(self.q_a(x))) if self.spec.q_lora else self.q(x)
        q = q.view(b, t, h, self.nope + self.rope).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b(self.kv_a_norm(latent)).view(b, t, h, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q_pe = self._rope(q_pe, cos, sin)
        k_pe = self._rope(k_pe.view(b, 1, t, self.rope), cos, sin).expand(b, h, t, self.rope)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o(y.transpose(1, 2).reshape(b, t, h * self.v_dim))

"""Gated DeltaNet (Qwen3-Next's linear-attention mixer) and the output-gated softmax attention it is
interleaved with.

GatedDeltaNet, per token t and value head h (k/q heads shared by num_v/num_k value heads):
  [q k v z] = in_proj_qkvz(x) (HF's per-key-head grouping [q, k, v, z] * n_k_heads), [b a] = in_proj_ba(x);
  q, k, v <- silu(causal depthwise conv1d over time) of [q | k | v] (channels: all q, all k, all v);
  q, k <- l2-normalised, q scaled by 1/sqrt(d_k); beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias);
  S <- exp(g) S;  S <- S + k (beta (v - S^T k))^T;  o = S^T q;
  out_proj(w * rms(o) * silu(z)).
The recurrence runs token by token in float32 (calibration-size sequences); conv, A_log and dt_bias stay
float (only the three projections are linears).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ATTN_Q, HParams
from ..runtime.rope import apply_rope
from .attention import Attention, AttentionModule
from .base import Block, ScaleGroup

SSM_IN = "ssm_in"  # in_proj_qkvz, HF row order (llama.cpp's legacy fused name)
SSM_BA = "ssm_ba"  # in_proj_ba
SSM_CONV1D = "ssm_conv1d"  # [conv_dim, kernel]
SSM_DT = "ssm_dt"  # dt_bias (kind "bias")
SSM_A_LOG = "ssm_a_log"  # A_log as HF stores it (llama.cpp's ssm_a holds -exp(A_log))
SSM_NORM = "ssm_norm"  # the gated RMSNorm's weight [d_v] (plain w, not 1 + w)
SSM_OUT = "ssm_out"


def delta_dims(hp: HParams) -> tuple[int, int, int, int, int]:
    """(n_k_heads, n_v_heads, d_k, d_v, conv kernel) from hp.extra."""
    x = hp.extra
    return (int(x["linear_num_key_heads"]), int(x["linear_num_value_heads"]), int(x["linear_key_head_dim"]),
            int(x["linear_value_head_dim"]), int(x["linear_conv_kernel_dim"]))


class GatedDeltaNet(Block):
    attr = "linear_attn"

    def tensors(self, hp, layer):
        nk, nv, dk, dv, kern = delta_dims(hp)
        d, kd, vd = hp.hidden_size, nk * dk, nv * dv
        return {f"{SSM_IN}.weight": (2 * kd + 2 * vd, d), f"{SSM_BA}.weight": (2 * nv, d),
                f"{SSM_CONV1D}.weight": (2 * kd + vd, kern), f"{SSM_DT}.bias": (nv,), f"{SSM_A_LOG}.weight": (nv,),
                f"{SSM_NORM}.weight": (dv,), f"{SSM_OUT}.weight": (d, vd)}

    def linears(self):
        return (SSM_IN, SSM_BA, SSM_OUT)

    def input_groups(self):
        return ((SSM_IN, SSM_BA), (SSM_OUT,))

    def scale_groups(self, hp, layer, prev_norm):
        # the gated output norm's weight is shared by every value head: it cannot take out_proj's per-column
        # scale, so only the pre-norm -> in_proj_qkvz / in_proj_ba group is scaled
        return [ScaleGroup(prev_norm, "norm", (SSM_IN, SSM_BA), self.attr)] if prev_norm else []

    def build(self, hp, layer, get, has):
        return GatedDeltaNetModule(hp, get)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)  # FLA's (and transformers') form


def delta_rule(q, k, v, g, beta):
    """q, k [B, T, H, dk], v [B, T, H, dv], g / beta [B, T, H], all float32 -> o [B, T, H, dv]."""
    b, t, h, dk = k.shape
    s = q.new_zeros(b, h, dk, v.shape[-1])
    out = []
    for i in range(t):
        s = s * g[:, i].exp()[..., None, None]
        kt = k[:, i]
        delta = (v[:, i] - (s * kt[..., None]).sum(-2)) * beta[:, i, :, None]
        s = s + kt[..., None] * delta[..., None, :]
        out.append((s * q[:, i, :, :, None]).sum(-2))
    return torch.stack(out, dim=1)


class GatedDeltaNetModule(nn.Module):
    def __init__(self, hp: HParams, get):
        super().__init__()
        self.nk, self.nv, self.dk, self.dv, self.kernel = delta_dims(hp)
        self.eps = hp.norm_eps
        self.in_proj = get(SSM_IN, linear=True)
        self.ba = get(SSM_BA, linear=True)
        self.out_proj = get(SSM_OUT, linear=True)
        self.conv = nn.Parameter(get(SSM_CONV1D), requires_grad=False)
        self.dt_bias = nn.Parameter(get(SSM_DT, "bias"), requires_grad=False)
        self.a_log = nn.Parameter(get(SSM_A_LOG), requires_grad=False)
        self.norm = nn.Parameter(get(SSM_NORM), requires_grad=False)

    def linears(self) -> dict[str, nn.Module]:
        return {SSM_IN: self.in_proj, SSM_BA: self.ba, SSM_OUT: self.out_proj}

    def forward(self, x):
        b, t, _ = x.shape
        nk, nv, dk, dv = self.nk, self.nv, self.dk, self.dv
        r = nv // nk
        q, k, v, z = self.in_proj(x).view(b, t, nk, 2 * dk + 2 * r * dv).split([dk, dk, r * dv, r * dv], dim=-1)
        bb, a = self.ba(x).view(b, t, nk, 2 * r).split([r, r], dim=-1)
        mixed = torch.cat([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], dim=-1).transpose(1, 2)
        conv = F.conv1d(mixed, self.conv.unsqueeze(1).to(mixed.dtype), padding=self.kernel - 1,
                        groups=mixed.shape[1])[..., :t]
        q, k, v = F.silu(conv).transpose(1, 2).split([nk * dk, nk * dk, nv * dv], dim=-1)
        q = q.reshape(b, t, nk, dk).repeat_interleave(r, dim=2).float()
        k = k.reshape(b, t, nk, dk).repeat_interleave(r, dim=2).float()
        v = v.reshape(b, t, nv, dv).float()
        beta = torch.sigmoid(bb.reshape(b, t, nv)).float()
        g = -self.a_log.float().exp() * F.softplus(a.reshape(b, t, nv).float() + self.dt_bias.float())
        o = delta_rule(l2norm(q) * dk ** -0.5, l2norm(k), v, g, beta).to(x.dtype)
        # gated RMSNorm over each head's d_v: w * rms(o) * silu(z)
        of = o.float()
        o = self.norm * (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        o = (o * F.silu(z.reshape(b, t, nv, dv).float())).to(x.dtype)
        return self.out_proj(o.reshape(b, t, nv * dv))


class GatedAttention(Attention):
    """Softmax attention whose q projection also yields a per-channel output gate: per head [q | gate]
    rows; the attention output is multiplied by sigmoid(gate) before o_proj (Qwen3-Next)."""

    def tensors(self, hp, layer):
        s = super().tensors(hp, layer)
        s[f"{ATTN_Q}.weight"] = (2 * hp.n_heads * hp.head_dim, hp.hidden_size)
        return s

    def build(self, hp, layer, get, has):
        return GatedAttentionModule(hp, layer, self, get)


class GatedAttentionModule(AttentionModule):
    def forward(self, x, cos, sin):
        hp = self.hp
        b, t, _ = x.shape
        h, hd = hp.n_heads, hp.head_dim
        q, gate = self.q(x).view(b, t, h, 2 * hd).chunk(2, dim=-1)
        k = self.k(x).view(b, t, hp.n_kv_heads, hd)
        v = self.v(x).view(b, t, hp.n_kv_heads, hd)
        if self.spec.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = h // hp.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.spec.scale)
        y = y.transpose(1, 2).reshape(b, t, h * hd) * torch.sigmoid(gate.reshape(b, t, h * hd))
        return self.o(y)


"""Plain-torch executor of the canonical graph.

Layers are nn.Modules with nn.Linear projections so calibration can hook them; each layer can be built, run
and dropped on its own (`CausalLM.layer(i)`, `run_layer`) so quantizers stream one layer at a time.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import (ATTN_K, ATTN_K_NORM, ATTN_NORM, ATTN_OUT, ATTN_Q, ATTN_Q_NORM, ATTN_V, FFN_DOWN,
                     FFN_DOWN_EXPS, FFN_GATE, FFN_GATE_EXPS, FFN_NORM, FFN_ROUTER, FFN_UP, FFN_UP_EXPS, OUTPUT,
                     OUTPUT_NORM, TOKEN_EMBD, Graph, HParams)
from .rope import apply_rope, cos_sin


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


class PackedLinear(nn.Module):
    """A linear layer that keeps the stored quantized bytes and runs the dequant-matmul kernels
    (Triton on CUDA, the torch reference elsewhere) instead of a dense weight."""

    def __init__(self, packed, bias: torch.Tensor | None):
        super().__init__()
        self.packed = packed
        self.out_features, self.in_features = packed.shape[0], packed.shape[1]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x):
        from ..kernels import qlinear
        return qlinear(x, self.packed, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        from ..kernels import dequantize
        return dequantize(self.packed)


class Attention(nn.Module):
    def __init__(self, hp: HParams, layer: int, get: Callable):
        super().__init__()
        self.hp, self.layer = hp, layer
        self.q = get(ATTN_Q, linear=True)
        self.k = get(ATTN_K, linear=True)
        self.v = get(ATTN_V, linear=True)
        self.o = get(ATTN_OUT, linear=True)
        self.q_norm = RMSNorm(get(ATTN_Q_NORM), hp.norm_eps) if hp.qk_norm else None
        self.k_norm = RMSNorm(get(ATTN_K_NORM), hp.norm_eps) if hp.qk_norm else None
        self.window = hp.sliding_window if hp.is_sliding(layer) else None

    def forward(self, x, cos, sin):
        hp = self.hp
        b, t, _ = x.shape
        q = self.q(x).view(b, t, hp.n_heads, hp.head_dim)
        k = self.k(x).view(b, t, hp.n_kv_heads, hp.head_dim)
        v = self.v(x).view(b, t, hp.n_kv_heads, hp.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = hp.n_heads // hp.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.window is not None and self.window < t:
            i = torch.arange(t, device=x.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, hp.n_heads * hp.head_dim))


class MLP(nn.Module):
    def __init__(self, get: Callable):
        super().__init__()
        self.gate = get(FFN_GATE, linear=True)
        self.up = get(FFN_UP, linear=True)
        self.down = get(FFN_DOWN, linear=True)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """Softmax top-k router over stacked experts (Mixtral/Qwen-MoE style); families with other routers subclass."""

    def __init__(self, hp: HParams, get: Callable):
        super().__init__()
        self.hp = hp
        self.router = get(FFN_ROUTER, linear=True)
        self.gate_exps = nn.Parameter(get(FFN_GATE_EXPS), requires_grad=False)
        self.up_exps = nn.Parameter(get(FFN_UP_EXPS), requires_grad=False)
        self.down_exps = nn.Parameter(get(FFN_DOWN_EXPS), requires_grad=False)
        self.expert_hook: Callable | None = None  # called as hook(expert, tokens_in) for calibration

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(x).float(), dim=-1)
        w, idx = probs.topk(self.hp.n_experts_used, dim=-1)
        if self.hp.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.hp.n_experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            xe = x[tok]
            if self.expert_hook is not None:
                self.expert_hook(e, xe)
            h = F.silu(xe @ self.gate_exps[e].T) * (xe @ self.up_exps[e].T)
            out.index_add_(0, tok, (h @ self.down_exps[e].T) * w[tok, slot, None].to(x.dtype))
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, hp: HParams, layer: int, get: Callable):
        super().__init__()
        self.attn_norm = RMSNorm(get(ATTN_NORM), hp.norm_eps)
        self.attn = Attention(hp, layer, get)
        self.ffn_norm = RMSNorm(get(FFN_NORM), hp.norm_eps)
        self.mlp = MoE(hp, get) if hp.is_moe(layer) else MLP(get)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.ffn_norm(x))

    def linears(self) -> dict[str, nn.Linear]:
        """Canonical suffix -> projection, in execution order (what calibration hooks and replaces)."""
        out = {ATTN_Q: self.attn.q, ATTN_K: self.attn.k, ATTN_V: self.attn.v, ATTN_OUT: self.attn.o}
        if isinstance(self.mlp, MLP):
            out.update({FFN_GATE: self.mlp.gate, FFN_UP: self.mlp.up, FFN_DOWN: self.mlp.down})
        return out


class CausalLM:
    """Executor over a Graph. Layers are built on demand; `keep=True` caches them (evaluation),
    `keep=False` builds each when needed and lets it go (streaming)."""

    layer_factory = DecoderLayer

    def __init__(self, graph: Graph, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 keep: bool = True, packed: bool | None = None):
        self.graph, self.hp = graph, graph.hparams
        self.device, self.dtype, self.keep = torch.device(device), dtype, keep
        # packed=None: run quantized weights from their stored bytes on CUDA (no full dequantization)
        self.packed = (self.device.type == "cuda") if packed is None else packed
        self._layers: dict[int, nn.Module] = {}
        self._embed = None
        self._head = None

    def _tensor(self, name: str) -> torch.Tensor:
        return self.graph[name].load().to(device=self.device, dtype=self.dtype)

    def build_layer(self, i: int) -> nn.Module:
        def get(suffix, linear=False):
            name = f"blk.{i}.{suffix}.weight"
            bname = f"blk.{i}.{suffix}.bias"
            lt = self.graph[name]
            if linear and self.packed and lt.packed is not None and len(lt.shape) == 2:
                return PackedLinear(lt.packed().to(self.device),
                                    self._tensor(bname) if bname in self.graph else None)
            w = self._tensor(name)
            if not linear:
                return w
            return make_linear(w, self._tensor(bname) if bname in self.graph else None)
        return self.layer_factory(self.hp, i, get)

    def layer(self, i: int) -> nn.Module:
        if i in self._layers:
            return self._layers[i]
        m = self.build_layer(i)
        if self.keep:
            self._layers[i] = m
        return m

    def set_layer(self, i: int, module: nn.Module) -> None:
        self._layers[i] = module

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._embed is None:
            self._embed = self._tensor(TOKEN_EMBD)
        e = self._embed
        if not self.keep:
            self._embed = None
        return F.embedding(ids.to(self.device), e)

    def rope(self, t: int, offset: int = 0):
        pos = torch.arange(offset, offset + t)
        return cos_sin(self.hp, pos, device=self.device, dtype=self.dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self._head is None:
            norm = RMSNorm(self._tensor(OUTPUT_NORM), self.hp.norm_eps)
            w = self._tensor(TOKEN_EMBD if self.hp.tie_embeddings or OUTPUT not in self.graph else OUTPUT)
            self._head = (norm, w)
        norm, w = self._head
        if not self.keep:
            self._head = None
        return F.linear(norm(x), w)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, hook: Callable | None = None) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (float32). hook(i, x) sees each layer's input."""
        if ids.dim() == 1:
            ids = ids[None]
        x = self.embed(ids)
        cos, sin = self.rope(ids.shape[1])
        for i in range(self.hp.n_layers):
            if hook is not None:
                hook(i, x)
            x = self.layer(i)(x, cos, sin)
        return self.head(x).float()

    __call__ = forward

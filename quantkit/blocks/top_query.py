"""CodeGeeX's top query attention: the queries come from a learned per-position embedding (`top_query_embd`,
[max positions, hidden]) instead of the layer input; keys and values from the input as usual."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BadInput
from ..graph import ATTN_K, ATTN_OUT, ATTN_Q, ATTN_V, HParams
from .attention import Attention, AttentionModule
from .base import ScaleGroup

TOP_QUERY_EMBD = "top_query_embd"


class TopQueryAttention(Attention):
    """Biased q/k/v/o projections, no RoPE; q reads top_query_embd[position]."""

    def __init__(self, positions: int):
        super().__init__(bias=True, out_bias=True, rope=False)
        self.positions = positions

    def tensors(self, hp: HParams, layer: int):
        return {**super().tensors(hp, layer), f"{TOP_QUERY_EMBD}.weight": (self.positions, hp.hidden_size)}

    def input_groups(self):
        return ((ATTN_Q,), (ATTN_K, ATTN_V), (ATTN_OUT,))  # in execution order: q first

    def scale_groups(self, hp, layer, prev_norm):
        # q reads the embedding, not the norm: only k and v can take the norm's scale
        return [ScaleGroup(prev_norm, "norm", (ATTN_K, ATTN_V), self.attr)] if prev_norm is not None else []

    def build(self, hp, layer, get, has):
        return TopQueryModule(hp, layer, self, get)


class TopQueryModule(AttentionModule):
    def __init__(self, hp, layer, spec, get):
        super().__init__(hp, layer, spec, get)
        self.top = nn.Parameter(get(TOP_QUERY_EMBD), requires_grad=False)

    def _project(self, x: torch.Tensor):
        b, t, _ = x.shape
        if t > self.top.shape[0]:
            raise BadInput(f"{t} tokens exceed the top query embedding's {self.top.shape[0]} positions")
        q = self.q(self.top[:t].to(x.dtype).expand(b, t, -1))
        return q, self.k(x), self.v(x)

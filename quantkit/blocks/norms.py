"""Norm blocks: RMSNorm, RMSNorm with (1 + w) (Gemma), LayerNorm, non-parametric LayerNorm (OLMo)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import HParams
from .base import Block

KINDS = ("rms", "rms1p", "layer", "layer_np")
NAMES = {"rms": "RMSNorm", "rms1p": "RMSNorm (1 + w)", "layer": "LayerNorm", "layer_np": "LayerNorm (no weight)"}


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x):
        dt = x.dtype
        # x * rsqrt(mean(x^2) + eps) in float32 (HF's order of operations; rms_norm gives the same bits in
        # fewer passes over x)
        x = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        if self.offset:  # Gemma: (1 + w), computed in float32 as its reference does
            return (x * (self.offset + self.weight.float())).to(dt)
        return self.weight * x.to(dt)


class LayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, dim: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False) if weight is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.eps, self.dim = eps, dim

    def forward(self, x):
        dt = x.dtype
        y = F.layer_norm(x.float(), (self.dim,), None, None, self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dt)


class Norm(Block):
    """A norm over the last dimension. `suffix`: its canonical tensor; `dim`: None = hidden size."""

    def __init__(self, suffix: str, kind: str = "rms", dim: int | None = None, bias: bool = False,
                 eps: float | None = None):
        if kind not in KINDS:
            raise ValueError(f"norm kind {kind!r} (expected one of {KINDS})")
        self.suffix, self.kind, self.dim, self.bias, self.eps = suffix, kind, dim, bias, eps
        self.attr = suffix

    def _dim(self, hp: HParams) -> int:
        return self.dim or hp.hidden_size

    def tensors(self, hp, layer):
        if self.kind == "layer_np":
            return {}
        out = {f"{self.suffix}.weight": (self._dim(hp),)}
        if self.kind == "layer" and self.bias:
            out[f"{self.suffix}.bias"] = (self._dim(hp),)
        return out

    def describe(self, hp, layer, rope=None):
        text = NAMES[self.kind] + (" + bias" if self.kind == "layer" and self.bias else "")
        return {"block": "norm", "kind": self.kind, "text": text}

    def build(self, hp, layer, get, has):
        eps = self.eps if self.eps is not None else hp.norm_eps
        return make_norm(self.kind, eps, self._dim(hp), lambda k: get(self.suffix, k), has(self.suffix, "bias"))


def make_norm(kind: str, eps: float, dim: int, get, has_bias: bool = False) -> nn.Module:
    if kind == "rms":
        return RMSNorm(get("weight"), eps)
    if kind == "rms1p":
        return RMSNorm(get("weight"), eps, offset=1.0)
    if kind == "layer":
        return LayerNorm(get("weight"), get("bias") if has_bias else None, eps, dim)
    return LayerNorm(None, None, eps, dim)

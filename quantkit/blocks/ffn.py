"""Dense feed-forward blocks: gated (SwiGLU, GeGLU) and plain two-layer MLPs (GELU)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import FFN_DOWN, FFN_GATE, FFN_UP, HParams
from .base import Block, ScaleGroup


def activation(name: str):
    """HF hidden_act names -> functions."""
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(name)


def fast_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def glu_name(act: str) -> str:
    """SwiGLU for SiLU gates, GeGLU for GELU ones."""
    return "SwiGLU" if act in ("silu", "swish") else "GeGLU" if "gelu" in act else f"gated {act}"


class GatedMLP(Block):
    """down(act(gate(x)) * up(x)); the size defaults to hp.ffn_size."""

    attr = "mlp"
    output_linear = FFN_DOWN

    def __init__(self, act: str = "silu", bias: bool = False, size: int | None = None):
        activation(act)
        self.act, self.bias, self.size = act, bias, size

    def tensors(self, hp: HParams, layer: int):
        d, f = hp.hidden_size, self.size or hp.ffn_size
        s = {f"{FFN_GATE}.weight": (f, d), f"{FFN_UP}.weight": (f, d), f"{FFN_DOWN}.weight": (d, f)}
        if self.bias:
            s.update({f"{FFN_GATE}.bias": (f,), f"{FFN_UP}.bias": (f,), f"{FFN_DOWN}.bias": (d,)})
        return s

    def linears(self):
        return (FFN_GATE, FFN_UP, FFN_DOWN)

    def input_groups(self):
        return ((FFN_GATE, FFN_UP), (FFN_DOWN,))

    def scale_groups(self, hp, layer, prev_norm):
        groups = [ScaleGroup(prev_norm, "norm", (FFN_GATE, FFN_UP), self.attr)] if prev_norm else []
        return groups + [ScaleGroup(FFN_UP, "linear", (FFN_DOWN,), "linear")]

    def describe(self, hp, layer, rope=None):
        kind = glu_name(self.act)
        f = self.size or hp.ffn_size
        return {"block": "ffn", "kind": kind, "ffn_size": f,
                "text": f"{kind} MLP (ffn {f}" + (", biases)" if self.bias else ")")}

    def build(self, hp, layer, get, has):
        return GatedMLPModule(get(FFN_GATE, linear=True), get(FFN_UP, linear=True), get(FFN_DOWN, linear=True),
                              activation(self.act))


class GatedMLPModule(nn.Module):
    def __init__(self, gate, up, down, act):
        super().__init__()
        self.gate, self.up, self.down, self.act = gate, up, down, act

    def linears(self) -> dict[str, nn.Linear]:
        return {FFN_GATE: self.gate, FFN_UP: self.up, FFN_DOWN: self.down}

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class PlainMLP(Block):
    """down(act(up(x))) (BLOOM, GPT-2 style)."""

    attr = "mlp"
    output_linear = FFN_DOWN

    def __init__(self, act: str = "gelu", bias: bool = True):
        self.act, self.bias = act, bias

    def tensors(self, hp, layer):
        d, f = hp.hidden_size, hp.ffn_size
        s = {f"{FFN_UP}.weight": (f, d), f"{FFN_DOWN}.weight": (d, f)}
        if self.bias:
            s.update({f"{FFN_UP}.bias": (f,), f"{FFN_DOWN}.bias": (d,)})
        return s

    def linears(self):
        return (FFN_UP, FFN_DOWN)

    def scale_groups(self, hp, layer, prev_norm):
        return [ScaleGroup(prev_norm, "norm", (FFN_UP,), self.attr)] if prev_norm else []

    def describe(self, hp, layer, rope=None):
        return {"block": "ffn", "kind": "plain", "ffn_size": hp.ffn_size,
                "text": f"plain MLP ({self.act}, ffn {hp.ffn_size}" + (", biases)" if self.bias else ")")}

    def build(self, hp, layer, get, has):
        act = fast_gelu if self.act == "fast_gelu" else activation(self.act)
        up, down = get(FFN_UP, linear=True), get(FFN_DOWN, linear=True)
        return PlainMLPModule(up, down, act)


class PlainMLPModule(nn.Module):
    def __init__(self, up, down, act):
        super().__init__()
        self.up, self.down, self.act = up, down, act

    def linears(self) -> dict[str, nn.Linear]:
        return {FFN_UP: self.up, FFN_DOWN: self.down}

    def forward(self, x):
        return self.down(self.act(self.up(x)))

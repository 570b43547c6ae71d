"""Plain-torch executor of the canonical graph.

Each layer is built from its family's blocks (families/*, blocks/*): nn.Modules with nn.Linear projections
so calibration can hook them; a layer can be built, run and dropped on its own (`CausalLM.layer(i)`,
`run_layer`) so quantizers stream one layer at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.norms import RMSNorm, make_norm  # noqa: F401  (RMSNorm: re-exported for callers)
from ..gemm import Linear, linear
from ..graph import OUTPUT, TOKEN_EMBD, Graph
from .rope import cos_sin


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
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


class CausalLM:
    """Executor over a Graph. Layers are built on demand; `keep=True` caches them (evaluation),
    `keep=False` builds each when needed and lets it go (streaming)."""

    def __init__(self, graph: Graph, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 keep: bool = True, packed: bool | None = None):
        from ..families import family_of
        self.graph, self.hp = graph, graph.hparams
        self.family = family_of(self.hp.arch)
        self.device, self.dtype, self.keep = torch.device(device), dtype, keep
        # packed=None: run quantized weights from their stored bytes on CUDA (no full dequantization)
        self.packed = (self.device.type == "cuda") if packed is None else packed
        self._layers: dict[int, nn.Module] = {}
        self._embed = None
        self._head = None

    def _tensor(self, name: str) -> torch.Tensor:
        return self.graph[name].load().to(device=self.device, dtype=self.dtype)

    def build_layer(self, i: int) -> nn.Module:
        def has(suffix, kind="weight"):
            return f"blk.{i}.{suffix}.{kind}" in self.graph

        def get(suffix, kind="weight", linear=False):
            name = f"blk.{i}.{suffix}.{kind}"
            bname = f"blk.{i}.{suffix}.bias"
            lt = self.graph[name]
            if linear and self.packed and lt.packed is not None and len(lt.shape) == 2:
                return PackedLinear(lt.packed().to(self.device),
                                    self._tensor(bname) if bname in self.graph else None)
            w = self._tensor(name)
            if not linear:
                return w
            return make_linear(w, self._tensor(bname) if bname in self.graph else None)
        return self.family.layer(self.hp, i).build(self.hp, i, get, has)

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
        x = F.embedding(ids.to(self.device), e)
        scale = self.family.embed_scale(self.hp)
        if scale is not None:  # in the embedding's dtype, as Gemma's reference rounds it
            x = x * torch.tensor(scale, dtype=x.dtype, device=x.device)
        return self.family.embed_post(self.hp, x, self._tensor)

    def rope(self, t: int, offset: int = 0, layer: int | None = None):
        """cos/sin for layer `layer`'s RoPE (None: the full-attention layers' RoPE)."""
        kind = "full" if layer is None else self.family.rope_kind(self.hp, layer)
        return self._rope_of(kind, t, offset)

    def _rope_of(self, kind: str, t: int, offset: int):
        theta, scaling = self.family.rope_params(self.hp, kind)
        hp = self.hp
        if theta != hp.rope_theta or scaling != hp.rope_scaling:
            hp = dataclasses.replace(hp, rope_theta=theta, rope_scaling=scaling)
        return cos_sin(hp, torch.arange(offset, offset + t), device=self.device, dtype=self.dtype)

    def ropes(self, t: int, offset: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cos/sin, computed once per distinct RoPE kind."""
        by_kind: dict[str, tuple] = {}
        out = []
        for i in range(self.hp.n_layers):
            kind = self.family.rope_kind(self.hp, i)
            if kind not in by_kind:
                by_kind[kind] = self._rope_of(kind, t, offset)
            out.append(by_kind[kind])
        return out

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self._head is None:
            norm = self.head_norm()
            w = self._tensor(TOKEN_EMBD if self.hp.tie_embeddings or OUTPUT not in self.graph else OUTPUT)
            self._head = (norm, w)
        norm, w = self._head
        if not self.keep:
            self._head = None
        logits = linear(norm(x), w)
        cap = self.family.logit_softcap(self.hp)
        if cap is not None:  # Gemma 2's final soft-capping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def head_norm(self) -> nn.Module:
        """The final norm (what the output projection reads)."""
        if not self.family.output_norm(self.hp):
            return nn.Identity()
        return make_norm(self.hp.norm, self.hp.norm_eps, self.hp.hidden_size,
                         lambda k: self._tensor(f"output_norm.{k}"), "output_norm.bias" in self.graph)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, hook: Callable | None = None) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (float32). hook(i, x) sees each layer's input."""
        if ids.dim() == 1:
            ids = ids[None]
        x = self.embed(ids)
        ropes = self.ropes(ids.shape[1])
        for i in range(self.hp.n_layers):
            if hook is not None:
                hook(i, x)
            x = self.layer(i)(x, *ropes[i])
        return self.head(x).float()

    __call__ = forward

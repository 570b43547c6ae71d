"""Quantized experts in HF checkpoints: each expert's linear packed under its own module.

`Family.hf_quantized_experts(hp, fmt)` says where each expert goes (families with one HF linear per expert:
`hf_experts`; gpt-oss: the layouts of GPTQModel / llm-compressor). A module built from several stacked
weights (gpt-oss's gate_up) takes their rows interleaved, which is exact for GPTQ / RTN / AWQ grids: rows are
quantized independently, and gate and up of an expert share one Hessian (one g_idx).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import BadInput
from ..graph import Graph
from ..quant.grid import QuantizedLinear


def expert_modules(graph: Graph, fmt: str) -> list:
    """The graph's expert modules in a `fmt` checkpoint ([] for dense graphs)."""
    from ..families import hf_family
    if not any(len(t.shape) == 3 for t in graph.tensors.values()):
        return []
    mods = hf_family(graph).hf_quantized_experts(graph.hparams, fmt)
    if not mods:
        raise BadInput(f"{graph.source}: family '{graph.hparams.arch}' declares no per-expert HF modules; its "
                       f"stacked experts cannot be written as {fmt}")
    return [m for m in mods if all(w in graph.tensors for w in m.weights)]


def interleave_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """[a0, a1 ...], [b0, b1 ...] -> [a0, b0, a1, b1 ...] along dim 0 (one tensor: itself)."""
    if len(parts) == 1:
        return parts[0]
    return torch.stack(parts, dim=1).reshape(-1, *parts[0].shape[1:])


def merge_rows(qls: list[QuantizedLinear], name: str) -> QuantizedLinear:
    if len(qls) == 1:
        return qls[0]
    q0 = qls[0]
    if any(not torch.equal(q.g_idx, q0.g_idx) or (q.bits, q.group_size, q.sym) != (q0.bits, q0.group_size, q0.sym)
           for q in qls):
        raise BadInput(f"{name}: the fused projections were quantized on different grids / column orders")
    return QuantizedLinear(interleave_rows([q.codes for q in qls]), interleave_rows([q.scales for q in qls]),
                           interleave_rows([q.zeros for q in qls]), q0.g_idx, q0.bits, q0.group_size, q0.sym,
                           q0.desc_act, None)


def module_shapes(graph: Graph, m) -> tuple[int, int]:
    """(out, in) of one expert module."""
    shapes = [graph[w].shape for w in m.weights]
    return sum(s[1] for s in shapes), shapes[0][2]


class ExpertPacker:
    """Collects per-expert QuantizedLinears as the driver yields them (stacked name -> list per expert) and
    packs each module with `pack(ql, name)` once all of its weights arrived; `packed`: prefix -> tensors."""

    def __init__(self, modules: list, pack: Callable[[QuantizedLinear, str], dict]):
        self.modules, self.pack = modules, pack
        self.pending: dict[str, list] = {}
        self.packed: dict[str, dict[str, torch.Tensor]] = {}
        self.covered = {w for m in modules for w in m.weights + m.biases}
        self._todo = list(modules)

    def add(self, name: str, qls: list) -> None:
        if not any(name in m.weights for m in self.modules):
            raise BadInput(f"{name}: stacked expert weights have no module in this checkpoint layout")
        self.pending[name] = qls
        left = []
        for m in self._todo:
            if all(w in self.pending for w in m.weights):
                ql = merge_rows([self.pending[w][m.expert] for w in m.weights], m.prefix)
                self.packed[m.prefix] = self.pack(ql, m.prefix)
            else:
                left.append(m)
        self._todo = left
        still = {w for m in left for w in m.weights}
        self.pending = {k: v for k, v in self.pending.items() if k in still}

    def check_complete(self) -> None:
        if self._todo:
            raise BadInput(f"expert module '{self._todo[0].prefix}' never received its quantized weights")

    def bias_loader(self, graph: Graph, m, dtype: torch.dtype) -> Callable[[], torch.Tensor] | None:
        if not m.biases:
            return None
        return lambda: interleave_rows([graph[b].load()[m.expert] for b in m.biases]).to(dtype)

"""Torch executor of the canonical graph."""

from __future__ import annotations

import torch

from ..graph import Graph


def executor_for(graph: Graph, device: str = "cpu", dtype: torch.dtype = torch.float32, keep: bool = True,
                 packed: bool | None = None):
    """The executor for the graph (its layers are built from the family's blocks)."""
    from .model import CausalLM
    return CausalLM(graph, device=device, dtype=dtype, keep=keep, packed=packed)

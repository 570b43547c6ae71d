"""Torch executor of the canonical graph."""

from __future__ import annotations

import torch

from ..graph import Graph


def executor_for(graph: Graph, device: str = "cpu", dtype: torch.dtype = torch.float32, keep: bool = True,
                 packed: bool | None = None):
    """The executor class for the graph's architecture (families with their own blocks register one)."""
    from .model import CausalLM
    if graph.hparams.arch == "gpt-oss":
        from ..families.gpt_oss import GptOssCausalLM
        EXECUTORS.setdefault("gpt-oss", GptOssCausalLM)
    cls = EXECUTORS.get(graph.hparams.arch, CausalLM)
    return cls(graph, device=device, dtype=dtype, keep=keep, packed=packed)


EXECUTORS: dict[str, type] = {}

"""Blocks: the parts a decoder layer is composed of (norms, attention kinds, FFN kinds, MoE).

Each block declares its canonical tensors and shapes (graph validation comes from them), its linears in
execution order, the groups of linears that read one input (GPTQ Hessians, imatrix), its AWQ scale groups,
and builds the torch module the executor runs. Families compose blocks into a `LayerSpec`.
"""

from .attention import Attention
from .base import Block, ScaleGroup
from .ffn import GatedMLP, PlainMLP
from .layer import Branch, LayerSpec
from .mla import MLA
from .moe import MoE
from .norms import Norm

__all__ = ["Attention", "Block", "Branch", "GatedMLP", "LayerSpec", "MLA", "MoE", "Norm", "PlainMLP", "ScaleGroup"]

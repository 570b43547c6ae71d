"""Quantized HF modules built from canonical weights by a row rearrangement: Baichuan's W_pack = [q; k; v],
BLOOM's per-head interleaved query_key_value. Packed as one module (as published GPTQ / AWQ checkpoints of
these families hold them) from the parts' grids, rows concatenated then reordered. Exact for GPTQ / RTN / AWQ /
MXFP4: rows are quantized independently and the parts read one input (one Hessian, one g_idx, one AWQ scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BadInput
from ..graph import Graph
from ..quant.grid import QuantizedLinear


@dataclass
class FusedLinear:
    prefix: str  # HF module
    sources: tuple[str, ...]  # canonical weights, in the family's order
    rows: torch.Tensor  # int64: HF row r is row rows[r] of cat(sources)

    def weight(self, ws: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(ws)[self.rows]


def fused_linears(graph: Graph) -> list[FusedLinear]:
    """The graph's HF linears the family writes through a function of quantizable canonical weights."""
    from ..export import _hf_names, hf_export_plan
    from ..families.registry import quantizable
    fam, rev = _hf_names(graph)
    quant = quantizable(graph)
    out = []
    for hf, sources, fn in hf_export_plan(graph, fam):
        if fn is None or not hf.endswith(".weight") or not all(len(quant.get(s, ())) == 2 for s in sources):
            continue
        if len(sources) == 1 and sources[0] in rev:  # a renamed weight with rows reordered (Llama 4's q/k):
            continue  # quantized_writer.row_permutations
        if len({quant[s][1] for s in sources}) != 1:
            raise BadInput(f"{hf}: its parts {list(sources)} read inputs of different widths")
        sizes = [quant[s][0] for s in sources]
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        # the function on row numbers (one column) says where each row goes; anything else is not a row map
        try:
            r = fn(*[torch.arange(a, a + n, dtype=torch.float64)[:, None] for a, n in zip(starts, sizes)])
        except Exception:
            r = None
        total = sum(sizes)
        if r is None or tuple(r.shape) != (total, 1) or not torch.equal(r[:, 0].sort().values,
                                                                     torch.arange(total, dtype=torch.float64)):
            raise BadInput(f"{hf}: not a row rearrangement of {list(sources)}; it cannot be packed quantized")
        out.append(FusedLinear(hf[: -len(".weight")], tuple(sources), r[:, 0].long()))
    return out


def merge(f: FusedLinear, qls: list[QuantizedLinear]) -> QuantizedLinear:
    q0 = qls[0]
    if any(not torch.equal(q.g_idx, q0.g_idx) or (q.bits, q.group_size, q.sym) != (q0.bits, q0.group_size, q0.sym)
           for q in qls):
        raise BadInput(f"{f.prefix}: its parts were quantized on different grids / column orders")
    return QuantizedLinear(f.weight([q.codes for q in qls]), f.weight([q.scales for q in qls]),
                           f.weight([q.zeros for q in qls]), q0.g_idx, q0.bits, q0.group_size, q0.sym, q0.desc_act,
                           None)


class FusedPacker:
    """Holds the parts of each fused module as the driver yields them; packs the module into `packed[prefix]`
    with `pack(ql, prefix)` once all its parts arrived."""

    def __init__(self, fused: list[FusedLinear], pack: Callable[[QuantizedLinear, str], dict], packed: dict):
        self.by_source = {s: f for f in fused for s in f.sources}
        self.pack, self.packed, self.pending = pack, packed, {}

    def add(self, name: str, ql: QuantizedLinear) -> bool:
        """False when `name` is no part of a fused module."""
        f = self.by_source.get(name)
        if f is None:
            return False
        self.pending[name] = ql
        if all(s in self.pending for s in f.sources):
            self.packed[f.prefix] = self.pack(merge(f, [self.pending.pop(s) for s in f.sources]), f.prefix)
        return True

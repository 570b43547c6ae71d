"""Quantized HF linears a family's `hf_export` fn builds from canonical weights by moving rows only: Llama 4's
q/k (one renamed weight, rotate-half rows -> pairs), Baichuan's W_pack = [q; k; v], BLOOM's per-head
interleaved query_key_value (and its one-source attn_qkv, which has no plain HF rename). Packed as one module
(as published GPTQ / AWQ checkpoints of these families hold them) from the parts' grids, rows concatenated then
reordered. Exact for GPTQ / RTN / AWQ / MXFP4: rows are quantized independently and the parts read one input
(one Hessian, one g_idx, one AWQ scale).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BadInput
from ..graph import Graph


@dataclass
class RowMap:
    prefix: str  # HF module
    sources: tuple[str, ...]  # canonical weights, in the family's order
    rows: torch.Tensor  # int64: HF row r is row rows[r] of cat(sources)
    key: str  # the name its packed tensors are stored under: the source of a renamed weight, else `prefix`

    @property
    def module(self) -> bool:
        """A linear with no canonical weight of its own name (several parts, or no plain HF rename)."""
        return self.key == self.prefix

    def weight(self, ws: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(ws)[self.rows]


def row_order(fn, sizes: list[int], in_f: int) -> torch.Tensor | None:
    """The rows of cat(sources) `fn` puts in order, found by running it on position codes of a few columns (not
    the whole weights: a real q_proj is large); None when fn does anything else than move whole rows."""
    cols = min(in_f, 3)
    codes = torch.arange(sum(sizes) * cols, dtype=torch.float64).reshape(-1, cols)
    try:
        r = fn(*codes.split(sizes))
    except Exception:  # noqa: BLE001 - an fn that does not take plain 2-D tensors moves no rows
        return None
    if not isinstance(r, torch.Tensor) or tuple(r.shape) != tuple(codes.shape) or \
            not torch.equal(r % cols, codes % cols):
        return None
    rows = (r[:, 0] // cols).long()
    if not torch.equal(r // cols, rows[:, None].double().expand_as(r)) or \
            not torch.equal(rows.sort().values, torch.arange(len(rows))):
        return None
    return rows


def row_maps(graph: Graph) -> list[RowMap]:
    """The graph's HF linears the family writes through a row-moving function of quantizable canonical weights."""
    from ..export import _hf_names, hf_export_plan
    from ..families.registry import quantizable
    fam, rev = _hf_names(graph)
    quant = quantizable(graph)
    out = []
    for hf, sources, fn in hf_export_plan(graph, fam):
        if fn is None or not hf.endswith(".weight") or not all(len(quant.get(s, ())) == 2 for s in sources):
            continue
        prefix = hf[: -len(".weight")]
        renamed = len(sources) == 1 and sources[0] in rev
        if len({quant[s][1] for s in sources}) != 1:
            raise BadInput(f"{hf}: its parts {list(sources)} read inputs of different widths")
        rows = row_order(fn, [quant[s][0] for s in sources], quant[sources[0]][1])
        if renamed:  # anything else than a row order of its own HF tensor: the writer's one-line refusal
            if rows is not None and rev[sources[0]] == hf:
                out.append(RowMap(prefix, tuple(sources), rows, sources[0]))
            continue
        if rows is None:
            raise BadInput(f"{hf}: not a row rearrangement of {list(sources)}; it cannot be packed quantized")
        out.append(RowMap(prefix, tuple(sources), rows, prefix))
    return out


def merge(f: RowMap, qls: list):
    """One QuantizedLinear (or AWQLinear, its float16 side columns moved alike) from its parts, rows moved."""
    from ..quant.grid import AWQLinear
    if isinstance(qls[0], AWQLinear):
        a0, ql = qls[0], merge(f, [a.ql for a in qls])
        cols = None if a0.fp16_cols is None else f.weight([a.fp16_cols for a in qls])
        return dataclasses.replace(a0, ql=ql, fp16_cols=cols)
    q0 = qls[0]
    if any(not torch.equal(q.g_idx, q0.g_idx) or (q.bits, q.group_size, q.sym) != (q0.bits, q0.group_size, q0.sym)
           for q in qls):
        raise BadInput(f"{f.prefix}: its parts were quantized on different grids / column orders")
    bias = None if any(q.bias is None for q in qls) else f.weight([q.bias for q in qls])
    return dataclasses.replace(q0, codes=f.weight([q.codes for q in qls]), scales=f.weight([q.scales for q in qls]),
                               zeros=f.weight([q.zeros for q in qls]), bias=bias)


class RowMapPacker:
    """Holds the parts of each row-mapped linear as the driver yields them; packs it into `packed[key]` with
    `pack(merged, key)` once all its parts arrived."""

    def __init__(self, maps: list[RowMap], pack: Callable[[object, str], dict], packed: dict):
        self.by_source = {s: f for f in maps for s in f.sources}
        self.pack, self.packed, self.pending = pack, packed, {}

    def add(self, name: str, ql) -> bool:
        """False when `name` is no part of a row-mapped linear."""
        f = self.by_source.get(name)
        if f is None:
            return False
        self.pending[name] = ql
        if all(s in self.pending for s in f.sources):
            self.packed[f.key] = self.pack(merge(f, [self.pending.pop(s) for s in f.sources]), f.key)
        return True

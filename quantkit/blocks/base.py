"""What every block declares, and the record AWQ scale groups are described by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..graph import HParams


@dataclass(frozen=True)
class ScaleGroup:
    """The linears in `linears` read the output of `prev` (a norm, or a linear whose output rows feed them
    column for column): scaling their input columns by s and dividing `prev`'s output by s keeps the float
    function. The scale search measures its error at the output of the block whose module attribute is
    `block` ("linear": at the first linear of the group). Stacked-expert linears ([E, out, in]) take one
    scale for all experts when `per_expert` is False, one per expert (prev is then stacked too) when True.
    `floats`: unquantized tensors that also read `prev`'s output (a router, a shared-expert gate vector):
    their input columns take the scale too, and they stay float."""
    prev: str
    prev_kind: str  # "norm" | "linear"
    linears: tuple[str, ...]
    block: str
    per_expert: bool = False
    floats: tuple[str, ...] = ()
    prev_offset: float = 0.0  # a norm computing (offset + w) (Gemma's 1 + w): w' = (offset + w) / s - offset


# get(suffix, kind="weight", linear=False) -> tensor or linear module; `has(suffix, kind)` -> bool
Getter = Callable[..., object]


class Block:
    """One part of a layer. `attr` is the module attribute the layer keeps it under."""

    attr: str = ""
    positional: bool = False  # the module's forward takes (x, cos, sin): attention kinds
    # the linear whose output is the block's output, unchanged (calibration caches that linear's input and
    # recomputes only it once it is quantized); None: some op follows the last linear, or there is none
    output_linear: str | None = None

    def tensors(self, hp: HParams, layer: int) -> dict[str, tuple[int, ...]]:
        """'suffix.kind' -> shape of every canonical tensor this block owns."""
        return {}

    def linears(self) -> tuple[str, ...]:
        """2-D projections (nn.Linear in the module), in execution order."""
        return ()

    def expert_linears(self) -> tuple[str, ...]:
        """Stacked-expert projections [E, out, in], in execution order."""
        return ()

    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears that read one input (they share a Hessian), in execution order."""
        return tuple((s,) for s in self.linears())

    def scale_groups(self, hp: HParams, layer: int, prev_norm: str | None) -> list[ScaleGroup]:
        """AWQ groups; `prev_norm` is the canonical suffix of the norm right before this block (None: none)."""
        return []

    def no_clip(self) -> frozenset[str]:
        """Linears AWQ's clip search skips."""
        return frozenset()

    def build(self, hp: HParams, layer: int, get: Getter, has: Callable[[str, str], bool]) -> nn.Module:
        raise NotImplementedError(type(self).__name__)

    def describe(self, hp: HParams, layer: int, rope: dict | None = None) -> dict:
        """The block in words people recognise (`quantkit inspect`): {"block": its role, "text": a short
        phrase, ...details}. `rope`: the layer's RoPE ({"theta", "scaling", "factor"}) for attention kinds."""
        return {"block": self.attr or type(self).__name__, "text": type(self).__name__}


def rope_text(hp: HParams, rope: dict | None) -> str:
    """"RoPE θ=10000 (yarn ×4)", "RoPE θ=1e+06 on 32 of 64 dims" ... (just "RoPE" without the layer's RoPE)."""
    if not rope:
        return "RoPE"
    t = float(rope["theta"])
    s = f"RoPE θ={int(t)}" if t.is_integer() else f"RoPE θ={t:g}"
    if rope.get("scaling") not in (None, "none"):
        s += f" ({rope['scaling']}" + (f" ×{rope['factor']:g})" if rope.get("factor") else ")")
    if hp.rotary_dim < hp.head_dim:
        s += f" on {hp.rotary_dim} of {hp.head_dim} dims"
    return s

"""A decoder layer as residual branches: x = x + post_norm(mixer(norm(x))) for each branch in order (a branch
with residual=False replaces x instead; one with `from_norm`, MiniMax's post-norm residual, computes
x = alpha * norm(x) + beta * mixer(norm(x)))."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from ..graph import HParams
from .base import Block, ScaleGroup
from .norms import Norm


@dataclass
class Branch:
    mixer: Block
    norm: Norm | None = None  # before the mixer
    post_norm: Norm | None = None  # on the mixer's output, before the residual add (OLMo 2, Gemma 2)
    residual: bool = True  # False: the output replaces the stream (CodeGeeX's final LayerNorm as a mixer)
    from_norm: bool = False  # the residual is the normed input, scaled by alpha; the mixer's output by beta
    alpha: float = 1.0
    beta: float = 1.0


@dataclass
class LayerSpec:
    branches: list[Branch] = field(default_factory=list)

    def blocks(self) -> list[Block]:
        out = []
        for b in self.branches:
            out += [x for x in (b.norm, b.mixer, b.post_norm) if x is not None]
        return out

    def tensors(self, hp: HParams, layer: int) -> dict[str, tuple[int, ...]]:
        s: dict[str, tuple[int, ...]] = {}
        for b in self.blocks():
            s.update(b.tensors(hp, layer))
        return s

    def linears(self) -> tuple[str, ...]:
        return tuple(s for b in self.branches for s in b.mixer.linears())

    def expert_linears(self) -> tuple[str, ...]:
        return tuple(s for b in self.branches for s in b.mixer.expert_linears())

    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        return tuple(g for b in self.branches for g in b.mixer.input_groups())

    def scale_groups(self, hp: HParams, layer: int) -> list[ScaleGroup]:
        """AWQ: a branch's pre-norm takes the scale of its mixer's input linears (a non-parametric norm has
        no weight to take it; nor does one whose output is also the residual, `from_norm`: those linears get no
        input scaling)."""
        out = []
        for b in self.branches:
            prev = b.norm.suffix if b.norm is not None and b.norm.kind != "layer_np" and not b.from_norm else None
            groups = b.mixer.scale_groups(hp, layer, prev)
            if prev is not None and b.norm.kind == "rms1p":  # Gemma: the scale folds into 1 + w
                groups = [replace(g, prev_offset=1.0) if g.prev == prev else g for g in groups]
            out += groups
        return out

    def unscaled_norms(self) -> list[str]:
        """Pre-norms without a weight (non-parametric LayerNorm): AWQ cannot scale the linears they feed."""
        return [b.norm.suffix for b in self.branches if b.norm is not None and b.norm.kind == "layer_np"]

    def no_clip(self) -> frozenset[str]:
        return frozenset().union(*(b.mixer.no_clip() for b in self.branches))

    def describe(self, hp: HParams, layer: int, rope: dict | None = None) -> dict:
        """Each residual branch in words: {"branches": [{"role", "norm", "mixer", "post_norm", "text"}]}."""
        out = []
        for b in self.branches:
            d = {"norm": b.norm.describe(hp, layer) if b.norm else None,
                 "mixer": b.mixer.describe(hp, layer, rope if b.mixer.positional else None),
                 "post_norm": b.post_norm.describe(hp, layer) if b.post_norm else None}
            d["role"] = d["mixer"]["block"]
            d["text"] = " -> ".join(x["text"] for x in (d["norm"], d["mixer"], d["post_norm"]) if x)
            out.append(d)
        return {"branches": out}

    def build(self, hp: HParams, layer: int, get, has) -> "DecoderLayer":
        return DecoderLayer(self, [(b, b.norm.build(hp, layer, get, has) if b.norm else None,
                                    b.mixer.build(hp, layer, get, has),
                                    b.post_norm.build(hp, layer, get, has) if b.post_norm else None)
                                   for b in self.branches])


class DecoderLayer(nn.Module):
    """Modules are kept under their blocks' attributes (attn_norm, attn, ffn_norm, mlp ...), which AWQ and
    calibration address by canonical suffix."""

    def __init__(self, spec: LayerSpec, parts):
        super().__init__()
        self.spec = spec
        self._order = []
        self._residual = []
        for b, norm, mixer, post in parts:
            names = []
            for blockspec, mod in ((b.norm, norm), (b.mixer, mixer), (b.post_norm, post)):
                if mod is None:
                    names.append(None)
                    continue
                setattr(self, blockspec.attr, mod)
                names.append(blockspec.attr)
            self._order.append((names, b.mixer.positional, b.residual))
            self._residual.append((b.from_norm, b.alpha, b.beta))

    def forward(self, x, cos, sin):
        for k in range(len(self._order)):
            x = self.branch(k, x, cos, sin)
        return x

    @property
    def n_branches(self) -> int:
        return len(self._order)

    def mixer(self, k: int) -> nn.Module:
        return getattr(self, self._order[k][0][1])

    def has_norm(self, k: int) -> bool:
        """Whether branch k starts with a norm (the mixer's input is then norm(x), not x)."""
        return self._order[k][0][0] is not None

    def branch(self, k: int, x, cos, sin, mixer_out=None, normed=None):
        """Branch k (see the module doc); `mixer_out` given: the mixer's output for this x (calibration
        recomputes only the last projection when the earlier ones did not change); `normed`: the branch norm's
        output for this x, kept by calibration from an earlier pass (the mixer's input)."""
        (norm, mixer, post), attention, residual = self._order[k]
        from_norm, alpha, beta = self._residual[k]
        if normed is not None:
            n = normed
        else:
            n = getattr(self, norm)(x) if norm and (mixer_out is None or from_norm) else x
        if mixer_out is None:
            h = getattr(self, mixer)(n, cos, sin) if attention else getattr(self, mixer)(n)
        else:
            h = mixer_out
        if post:
            h = getattr(self, post)(h)
        if from_norm:
            return n * alpha + h * beta
        return x + h if residual else h

    def linears(self) -> dict[str, nn.Linear]:
        """Canonical suffix -> 2-D projection, in execution order (what calibration hooks and replaces)."""
        out = {}
        for (_, mixer, _), _a, _r in self._order:
            out.update(getattr(getattr(self, mixer), "linears", dict)())  # a norm as mixer has none
        return out

    def moe(self):
        """The MoE module of this layer, or None."""
        from .moe import MoEModule
        for (_, mixer, _), _a, _r in self._order:
            if isinstance(getattr(self, mixer), MoEModule):
                return getattr(self, mixer)
        return None

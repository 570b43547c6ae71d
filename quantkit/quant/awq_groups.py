"""AWQ's view of a layer: its scale groups and the linears whose clip search is skipped, as the family's
blocks declare them (blocks.ScaleGroup). awq.py only reads these records."""

from __future__ import annotations

from dataclasses import dataclass

from ..blocks import ScaleGroup
from ..graph import HParams

__all__ = ["LayerRule", "ScaleGroup", "rule_for"]


@dataclass(frozen=True)
class LayerRule:
    groups: tuple[ScaleGroup, ...]
    no_clip: frozenset[str]
    inputs: tuple[tuple[str, ...], ...] = ()  # linears reading one input (the block's input_groups)


def rule_for(hp: HParams, layer: int) -> LayerRule:
    from ..families import family_of
    spec = family_of(hp.arch).layer(hp, layer)
    return LayerRule(tuple(spec.scale_groups(hp, layer)), spec.no_clip(), spec.input_groups())

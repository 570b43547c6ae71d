"""Which op's output AWQ scales fold into, and which linears take the scales on their inputs, per architecture.

A group says: the linears in `linears` read the output of `prev` (a norm, or a linear whose output rows feed
them); scaling their input columns by s and dividing `prev`'s output by s keeps the float function exactly.
The error of a candidate s is measured at the output of `block` ("attn": the whole attention block, "mlp":
the whole MLP, "linear": the first linear of the group). New families (MoE experts, MLA, fused qkv) register
their own rule with `register_rule(arch, fn)`; awq.py only reads these records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..graph import (ATTN_K, ATTN_NORM, ATTN_OUT, ATTN_Q, ATTN_V, FFN_DOWN, FFN_GATE, FFN_NORM, FFN_UP,
                     HParams)


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # canonical suffix of the op whose output is divided by s
    prev_kind: str  # "norm" (weight [and bias] / s) | "linear" (output rows [and bias] / s)
    linears: tuple[str, ...]  # canonical suffixes whose input columns are multiplied by s
    block: str  # "attn" | "mlp" | "linear": where the scale search measures the output error


@dataclass(frozen=True)
class LayerRule:
    groups: tuple[ScaleGroup, ...]
    no_clip: frozenset[str]  # linears whose clip search is skipped (q/k: the q.k product is hard to clip for)


def dense_rule(hp: HParams, layer: int) -> LayerRule:
    """llama-style block, as AutoAWQ's llama/qwen/mistral models define it."""
    groups = [ScaleGroup(ATTN_NORM, "norm", (ATTN_Q, ATTN_K, ATTN_V), "attn")]
    # v -> o only when v's output feeds o column for column: under GQA each v row feeds several o columns
    if hp.n_kv_heads == hp.n_heads:
        groups.append(ScaleGroup(ATTN_V, "linear", (ATTN_OUT,), "linear"))
    if not hp.is_moe(layer):
        groups.append(ScaleGroup(FFN_NORM, "norm", (FFN_GATE, FFN_UP), "mlp"))
        groups.append(ScaleGroup(FFN_UP, "linear", (FFN_DOWN,), "linear"))
    return LayerRule(tuple(groups), frozenset({ATTN_Q, ATTN_K}))


RULES: dict[str, Callable[[HParams, int], LayerRule]] = {}


def register_rule(arch: str, fn: Callable[[HParams, int], LayerRule]) -> None:
    RULES[arch] = fn


def rule_for(hp: HParams, layer: int) -> LayerRule:
    return RULES.get(hp.arch, dense_rule)(hp, layer)

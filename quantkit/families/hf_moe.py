"""What the HF MoE decoders with one linear per expert (Mixtral, Qwen2/3-MoE, OLMoE) share: which layers are
sparse, per-expert HF names <-> stacked canonical experts, and the refusals for configs a GGUF arch can't hold."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadInput, UnsupportedArchitecture
from ..graph import FFN_DOWN, FFN_DOWN_EXPS, FFN_GATE, FFN_GATE_EXPS, FFN_ROUTER, FFN_UP, FFN_UP_EXPS, HParams, blk
from .base import Family, need, stack_experts, unstack
from .hf_decoder import cfg_get, decoder_name_map


@dataclass(frozen=True)
class ExpertLayout:
    """HF names inside `model.layers.{i}.`: router `{block}.{router}.weight`, expert e's projection
    `{block}.experts.{e}.{proj}.weight`."""
    block: str = "mlp"
    router: str = "gate"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def projections(self):
        return ((FFN_GATE_EXPS, self.gate), (FFN_UP_EXPS, self.up), (FFN_DOWN_EXPS, self.down))

    def expert(self, i: int, e: int, proj: str) -> str:
        return f"model.layers.{i}.{self.block}.experts.{e}.{proj}.weight"


def moe_layers(cfg: dict, n_layers: int) -> list[int] | None:
    """Sparse layers per Qwen-MoE's `mlp_only_layers` / `decoder_sparse_step` (None: every layer)."""
    dense = set(cfg_get(cfg, "mlp_only_layers", []))
    step = int(cfg_get(cfg, "decoder_sparse_step", 1))
    if step < 1:
        raise BadInput(f"config.json: decoder_sparse_step {step} (expected >= 1)")
    sparse = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    return None if len(sparse) == n_layers else sparse


def expert_count(cfg: dict) -> int:
    """transformers writes Qwen3-MoE's count as num_local_experts, the hub's configs as num_experts."""
    n = cfg_get(cfg, "num_experts", cfg_get(cfg, "num_local_experts"))
    if not n:
        raise BadInput("config.json: missing 'num_experts' / 'num_local_experts'")
    return int(n)


def name_map(hp: HParams, lay: ExpertLayout) -> dict[str, str]:
    """1:1 HF -> canonical names: the standard decoder's, with a router instead of the dense MLP on MoE layers."""
    sparse = [i for i in range(hp.n_layers) if hp.is_moe(i)]
    dense_ffn = {blk(i, c, k) for i in sparse for c in (FFN_GATE, FFN_UP, FFN_DOWN) for k in ("weight", "bias")}
    m = {h: c for h, c in decoder_name_map(hp).items() if c not in dense_ffn}
    for i in sparse:
        m[f"model.layers.{i}.{lay.block}.{lay.router}.weight"] = blk(i, FFN_ROUTER)
    return m


def stacked_tensors(hp: HParams, src, source: str, lay: ExpertLayout) -> dict:
    """Per-expert HF weights -> canonical [E, out, in], read lazily."""
    out = {}
    e, f, d = hp.n_experts, hp.expert_ffn_size or hp.ffn_size, hp.hidden_size
    for i in range(hp.n_layers):
        if not hp.is_moe(i):
            continue
        for canon, proj in lay.projections():
            shape = (e, d, f) if canon == FFN_DOWN_EXPS else (e, f, d)
            out[blk(i, canon)] = stack_experts([need(src, lay.expert(i, x, proj), source) for x in range(e)],
                                               shape, source)
    return out


def expert_names(hp: HParams, lay: ExpertLayout) -> dict[str, list[str]]:
    return {blk(i, canon): [lay.expert(i, x, proj) for x in range(hp.n_experts)]
            for i in range(hp.n_layers) if hp.is_moe(i) for canon, proj in lay.projections()}


def expert_export(hp: HParams, lay: ExpertLayout) -> list:
    return [(name, (canon,), unstack(x))
            for canon, names in expert_names(hp, lay).items() for x, name in enumerate(names)]


def refuse(arch: str, problems: list[str]) -> None:
    """GGUF writers: fail with every reason llama.cpp's `arch` graph would compute something else."""
    if problems:
        raise UnsupportedArchitecture(f"cannot write this model as GGUF arch '{arch}': " + "; ".join(problems))


class PerExpertFamily(Family):
    """A family whose HF checkpoints keep one linear per expert (`hf_layout`), stacked into canonical
    [E, out, in] tensors on load and split back on export."""

    hf_layout = ExpertLayout()

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        return name_map(hp, cls.hf_layout)

    @classmethod
    def hf_tensors(cls, hp, src, source):
        return {**super().hf_tensors(hp, src, source), **stacked_tensors(hp, src, source, cls.hf_layout)}

    @classmethod
    def hf_export(cls, hp: HParams):
        return super().hf_export(hp) + expert_export(hp, cls.hf_layout)

    @classmethod
    def hf_experts(cls, hp: HParams) -> dict[str, list[str]]:
        return expert_names(hp, cls.hf_layout)

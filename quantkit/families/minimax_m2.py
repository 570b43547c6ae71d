"""MiniMax-M2 (MiniMaxM2ForCausalLM): full attention in every layer + a sparse MoE FFN in every layer.

Attention: GQA without biases, q/k RMSNorm over the whole projection (q_norm [n_heads * head_dim], k_norm
[n_kv_heads * head_dim], before the heads are split), RoPE (rotate-half) on the first `rotary_dim` dims of
each head (transformers: partial_rotary_factor = rotary_dim / head_dim). MoE `block_sparse_moe`: a sigmoid
router whose selection bias `e_score_correction_bias` (canonical blk.{i}.exp_probs_b.bias) shifts which experts
are picked, top-k weights always renormalised; experts `experts.{e}.w1/w3/w2` = gate/up/down
(intermediate_size), stacked canonically; no shared expert.
GGUF: llama.cpp's "minimax-m2" (NEOX rope: q/k rows as HF has them; it always renormalises), with
expert_gating_func 2 (sigmoid) written always: llama.cpp has no default for it.
"""

from __future__ import annotations

from ..blocks import Attention, Branch, LayerSpec, MoE, Norm
from ..blocks.moe import EXP_PROBS_B
from ..errors import BadInput
from ..graph import ATTN_NORM, FFN_NORM, HParams, blk
from . import hf_moe
from .base import by_layer
from .glm4moe import SIGMOID, partial_rotary_factor, rope_dim_of
from .hf_decoder import cfg_get, decoder_config, decoder_hparams
from .registry import register

LAYOUT = hf_moe.ExpertLayout(block="block_sparse_moe", router="gate", gate="w1", up="w3", down="w2")


def rotary_factor(cfg: dict, head_dim: int) -> float:
    """transformers' rule: partial_rotary_factor, else the released configs' rotary_dim."""
    rot = cfg.get("rotary_dim")
    return partial_rotary_factor(cfg, 1.0 if rot is None else int(rot) / head_dim)


@register
class MiniMaxM2(hf_moe.PerExpertFamily):
    hf_layout = LAYOUT
    arch = "minimax-m2"
    hf_architectures = ("MiniMaxM2ForCausalLM",)
    hf_model_type = "minimax_m2"
    gguf_arch = "minimax-m2"

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        attn = Attention(qk_norm="full")
        ffn = MoE(router="sigmoid", norm_topk=True, select_bias=True)
        return LayerSpec([Branch(attn, Norm(ATTN_NORM)), Branch(ffn, Norm(FFN_NORM))])

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = decoder_hparams(cfg, cls.arch, qk_norm=True, attn_bias=False, attn_out_bias=False, mlp_bias=False)
        hp.rope_dim = rope_dim_of(hp.head_dim, rotary_factor(cfg, hp.head_dim))
        hp.n_experts = hf_moe.expert_count(cfg)
        hp.n_experts_used = int(cfg_get(cfg, "num_experts_per_tok", required=True))
        hp.expert_ffn_size = hp.ffn_size
        hp.norm_topk_prob = True
        if cfg.get("scoring_func", "sigmoid") != "sigmoid":
            raise BadInput(f"config.json: scoring_func '{cfg['scoring_func']}' (MiniMax-M2 routes with sigmoid)")
        return hp

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        m = hf_moe.name_map(hp, LAYOUT)
        for i in range(hp.n_layers):
            m[f"model.layers.{i}.block_sparse_moe.e_score_correction_bias"] = blk(i, EXP_PROBS_B, "bias")
        return by_layer(m)

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return decoder_config(hp, "MiniMaxM2ForCausalLM", "minimax_m2", num_local_experts=hp.n_experts,
                              num_experts_per_tok=hp.n_experts_used, rotary_dim=hp.rotary_dim,
                              partial_rotary_factor=hp.rotary_dim / hp.head_dim, scoring_func="sigmoid",
                              use_routing_bias=True)

    @classmethod
    def gguf_kv(cls, hp: HParams):
        from gguf import GGUFValueType as VT
        return super().gguf_kv(hp) + [(f"{cls.gguf_arch}.expert_gating_func", SIGMOID, VT.UINT32)]

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        a = kv["general.architecture"]
        hp = super().hparams_from_gguf(kv, path, names)
        if not hp.n_experts:
            raise BadInput(f"{path}: GGUF metadata key '{a}.expert_count' is missing")
        gating = int(kv.get(f"{a}.expert_gating_func", SIGMOID))
        if gating != SIGMOID:
            raise BadInput(f"{path}: minimax-m2 expert_gating_func {gating} (only sigmoid, 2, is supported)")
        hp.qk_norm, hp.norm_topk_prob = True, True  # what llama.cpp computes
        return hp

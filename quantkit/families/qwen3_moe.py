"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 attention (per-head q/k RMSNorm, explicit head_dim, no bias by
default) + MoE without a shared expert.

Router `mlp.gate`: softmax over all experts, top-k, renormalised when `norm_topk_prob` (the released
models set it; the config class defaults to False). Experts `mlp.experts.{e}.{gate,up,down}_proj`
(moe_intermediate_size); `mlp_only_layers` / `decoder_sparse_step` layers are dense (intermediate_size).
The expert count is `num_experts` on the hub and `num_local_experts` in configs transformers 5 writes.
GGUF (llama.cpp arch "qwen3moe", NEOX rope): llama.cpp's qwen3moe graph always renormalises the top-k
weights, needs experts in every layer, loads no attention output bias and has no sliding window: other
configs are refused.
"""

from __future__ import annotations

from ..blocks import Attention, Branch, GatedMLP, LayerSpec, MoE, Norm
from ..errors import BadInput
from ..graph import ATTN_NORM, FFN_NORM, HParams
from . import hf_moe
from .hf_decoder import cfg_get, decoder_config, decoder_hparams
from .registry import register

LAYOUT = hf_moe.ExpertLayout()


@register
class Qwen3Moe(hf_moe.PerExpertFamily):
    hf_layout = LAYOUT
    arch = "qwen3moe"
    hf_architectures = ("Qwen3MoeForCausalLM",)
    hf_model_type = "qwen3_moe"
    gguf_arch = "qwen3moe"

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        attn = Attention(bias=hp.attn_bias, out_bias=hp.attn_out_bias, qk_norm="head")
        ffn = MoE() if hp.is_moe(i) else GatedMLP(hp.act)
        return LayerSpec([Branch(attn, Norm(ATTN_NORM)), Branch(ffn, Norm(FFN_NORM))])

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = decoder_hparams(cfg, cls.arch, qk_norm=True, mlp_bias=False)  # attention_bias: q/k/v and o
        hp.n_experts = hf_moe.expert_count(cfg)
        hp.n_experts_used = int(cfg_get(cfg, "num_experts_per_tok", required=True))
        hp.expert_ffn_size = int(cfg_get(cfg, "moe_intermediate_size", required=True))
        hp.norm_topk_prob = bool(cfg_get(cfg, "norm_topk_prob", False))
        hp.moe_layers = hf_moe.moe_layers(cfg, hp.n_layers)
        if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            hp.sliding_window = int(cfg["sliding_window"])  # every layer (transformers' Qwen3-MoE mask)
        return hp

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        sw = {"use_sliding_window": True, "sliding_window": hp.sliding_window} if hp.sliding_window else \
            {"use_sliding_window": False}
        return decoder_config(hp, "Qwen3MoeForCausalLM", "qwen3_moe", num_experts=hp.n_experts,
                              num_experts_per_tok=hp.n_experts_used, moe_intermediate_size=hp.expert_ffn_size,
                              norm_topk_prob=hp.norm_topk_prob, decoder_sparse_step=1,
                              mlp_only_layers=[i for i in range(hp.n_layers) if not hp.is_moe(i)],
                              attention_bias=hp.attn_bias, **sw)

    @classmethod
    def gguf_kv(cls, hp: HParams):
        problems = []
        if not hp.norm_topk_prob:
            problems.append("norm_topk_prob=False (llama.cpp's qwen3moe graph always renormalises the top-k "
                            "weights)")
        if hp.moe_layers is not None:
            problems.append(f"dense layers {[i for i in range(hp.n_layers) if not hp.is_moe(i)]} "
                            "(llama.cpp's qwen3moe graph needs experts in every layer)")
        if hp.attn_out_bias:
            problems.append("attention output bias (llama.cpp's qwen3moe loads none)")
        if hp.sliding_window:
            problems.append("sliding window (llama.cpp's qwen3moe graph has none)")
        hf_moe.refuse(cls.gguf_arch, problems)
        return super().gguf_kv(hp)

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        hp = super().hparams_from_gguf(kv, path, names)
        if not hp.n_experts:
            raise BadInput(f"{path}: GGUF metadata key 'qwen3moe.expert_count' is missing")
        if "qwen3moe.expert_feed_forward_length" not in kv:  # llama.cpp's fallback
            hp.expert_ffn_size = hp.ffn_size // hp.n_experts_used
        hp.qk_norm = True
        hp.norm_topk_prob = True  # what llama.cpp computes
        return hp

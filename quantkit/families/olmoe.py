"""OLMoE (OlmoeForCausalLM): attention with RMSNorm over the whole q and k projections (before RoPE),
optional clamping of q/k/v (`clip_qkv`), and a MoE FFN in every layer (no shared expert, no dense layers).

Router `mlp.gate`: softmax over all experts, top-k, renormalised when `norm_topk_prob` (default False).
Experts `mlp.experts.{e}.{gate,up,down}_proj` of `intermediate_size`. head_dim is hidden/heads (k_norm
spans (hidden/heads) * kv_heads). `attention_bias` gives q/k/v/o biases.
GGUF (llama.cpp arch "olmoe", NEOX rope): feed_forward_length is the expert size; llama.cpp's olmoe graph
never renormalises the top-k weights, does not clip, sizes k_norm as the hidden size (so kv heads = heads),
loads no attention output bias and needs output.weight: other configs are refused.
"""

from __future__ import annotations

from ..blocks import Attention, Branch, LayerSpec, MoE, Norm
from ..errors import BadInput
from ..graph import ATTN_NORM, FFN_NORM, HParams
from . import hf_moe
from .hf_decoder import cfg_get, decoder_config, decoder_hparams
from .registry import register

LAYOUT = hf_moe.ExpertLayout()


@register
class Olmoe(hf_moe.PerExpertFamily):
    hf_layout = LAYOUT
    arch = "olmoe"
    hf_architectures = ("OlmoeForCausalLM",)
    gguf_arch = "olmoe"

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        attn = Attention(bias=hp.attn_bias, out_bias=hp.attn_out_bias, qk_norm="full",
                         clip=hp.extra.get("clip_qkv"))
        return LayerSpec([Branch(attn, Norm(ATTN_NORM)), Branch(MoE(), Norm(FFN_NORM))])

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = decoder_hparams(cfg, cls.arch, qk_norm=True, mlp_bias=False)  # attention_bias: q/k/v and o
        hp.head_dim = hp.hidden_size // hp.n_heads  # OLMoE's attention ignores a head_dim key
        hp.n_experts = hf_moe.expert_count(cfg)
        hp.n_experts_used = int(cfg_get(cfg, "num_experts_per_tok", required=True))
        hp.expert_ffn_size = hp.ffn_size
        hp.norm_topk_prob = bool(cfg_get(cfg, "norm_topk_prob", False))
        if cfg.get("clip_qkv") is not None:
            hp.extra = {**hp.extra, "clip_qkv": float(cfg["clip_qkv"])}
        return hp

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        cfg = decoder_config(hp, "OlmoeForCausalLM", "olmoe", num_experts=hp.n_experts,
                             num_experts_per_tok=hp.n_experts_used, norm_topk_prob=hp.norm_topk_prob,
                             attention_bias=hp.attn_bias, clip_qkv=hp.extra.get("clip_qkv"))
        del cfg["head_dim"]
        return cfg

    @classmethod
    def gguf_kv(cls, hp: HParams):
        problems = []
        if hp.norm_topk_prob:
            problems.append("norm_topk_prob=True (llama.cpp's olmoe graph never renormalises the top-k weights)")
        if hp.extra.get("clip_qkv") is not None:
            problems.append(f"clip_qkv={hp.extra['clip_qkv']} (llama.cpp's olmoe graph does not clip q/k/v)")
        if hp.n_kv_heads != hp.n_heads:
            problems.append(f"{hp.n_kv_heads} kv heads for {hp.n_heads} heads (llama.cpp's olmoe sizes k_norm as "
                            "the hidden size)")
        if hp.attn_out_bias:
            problems.append("attention output bias (llama.cpp's olmoe loads none)")
        if hp.tie_embeddings:
            problems.append("tied embeddings (llama.cpp's olmoe needs output.weight)")
        hf_moe.refuse(cls.gguf_arch, problems)
        return super().gguf_kv(hp)

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        hp = super().hparams_from_gguf(kv, path, names)
        if not hp.n_experts:
            raise BadInput(f"{path}: GGUF metadata key 'olmoe.expert_count' is missing")
        hp.qk_norm = True
        hp.expert_ffn_size = hp.ffn_size  # llama.cpp's olmoe reads the expert size from feed_forward_length
        hp.norm_topk_prob = False  # what llama.cpp computes
        return hp

"""Mixtral (MixtralForCausalLM): Llama attention (GQA, sliding window when set) + a sparse MoE FFN.

Router `block_sparse_moe.gate`: softmax over all experts, top-k (2), renormalised over those k (always: the
config has no switch). Experts `block_sparse_moe.experts.{e}.w1/w3/w2` = gate/up/down, stacked canonically.
GGUF: llama.cpp's converter writes Mixtral as arch "llama" (q/k permuted, expert_count/expert_used_count,
feed_forward_length = the expert size, no expert_feed_forward_length); llama.cpp's llama graph always
renormalises the top-k weights (as Mixtral does) and has no sliding window, so a window shorter than the
context is refused. Such files are read back by the Llama family as arch "mixtral".
"""

from __future__ import annotations

from ..graph import HParams
from . import hf_moe
from .hf_decoder import cfg_get, decoder_config, decoder_hparams
from .registry import register

LAYOUT = hf_moe.ExpertLayout(block="block_sparse_moe", router="gate", gate="w1", up="w3", down="w2")


@register
class Mixtral(hf_moe.PerExpertFamily):
    hf_layout = LAYOUT
    arch = "mixtral"
    hf_architectures = ("MixtralForCausalLM",)
    gguf_arch = "llama"
    gguf_permute_qk = True
    gguf_reader = False  # the Llama family reads "llama" GGUFs and returns arch "mixtral" when they have experts

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = decoder_hparams(cfg, cls.arch, attn_bias=False, attn_out_bias=False, mlp_bias=False)
        hp.n_experts = int(cfg_get(cfg, "num_local_experts", 8))
        hp.n_experts_used = int(cfg_get(cfg, "num_experts_per_tok", 2))
        hp.expert_ffn_size = hp.ffn_size
        hp.norm_topk_prob = True
        hp.sliding_window = cfg.get("sliding_window") or None
        return hp

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return decoder_config(hp, "MixtralForCausalLM", "mixtral", num_local_experts=hp.n_experts,
                              num_experts_per_tok=hp.n_experts_used, sliding_window=hp.sliding_window)

    @classmethod
    def gguf_kv(cls, hp: HParams):
        problems = []
        if hp.sliding_window and hp.sliding_window < hp.context_length:
            problems.append(f"sliding_window {hp.sliding_window} < context {hp.context_length} (llama.cpp's llama "
                            "graph attends to the whole context)")
        if not hp.norm_topk_prob:
            problems.append("top-k weights not renormalised (llama.cpp's llama graph always renormalises)")
        if hp.moe_layers is not None:
            problems.append("dense layers among the MoE layers (llama.cpp's llama graph has experts in all or none)")
        if (hp.expert_ffn_size or hp.ffn_size) != hp.ffn_size:
            problems.append("expert FFN size differs from feed_forward_length (the llama graph reads one size)")
        hf_moe.refuse("llama", problems)
        return [kv for kv in super().gguf_kv(hp) if not kv[0].endswith(".expert_feed_forward_length")]

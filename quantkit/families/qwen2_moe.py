"""Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM): Qwen2 attention (q/k/v bias) + MoE with a shared expert.

Router `mlp.gate`: softmax over all experts, top-k, renormalised only when `norm_topk_prob` (default False).
Experts `mlp.experts.{e}.{gate,up,down}_proj` (moe_intermediate_size); the shared expert
`mlp.shared_expert.*` (shared_expert_intermediate_size) runs on every token scaled by
sigmoid(x . shared_expert_gate) (HF [1, d] -> canonical ffn_gate_inp_shexp [d]). Layers listed in
`mlp_only_layers`, or not hit by `decoder_sparse_step`, are dense SwiGLU MLPs of `intermediate_size`.
GGUF (llama.cpp arch "qwen2moe", NEOX rope, no q/k permutation): expert_feed_forward_length and
expert_shared_feed_forward_length keys. llama.cpp's qwen2moe graph never renormalises the top-k weights,
needs experts in every layer and output.weight, and has no sliding window: other configs are refused.
"""

from __future__ import annotations

from ..blocks import Attention, Branch, GatedMLP, LayerSpec, MoE, Norm
from ..errors import BadInput
from ..graph import ATTN_NORM, FFN_GATE_INP_SHEXP, FFN_NORM, HParams, blk
from . import hf_moe
from .base import gguf_get, lazy, need
from .hf_decoder import cfg_get, decoder_config, decoder_hparams
from .registry import register

LAYOUT = hf_moe.ExpertLayout()
SHARED_SIZE = "shared_expert_ffn_size"  # hp.extra key
_SHEXP = {"gate_proj": "ffn_gate_shexp", "up_proj": "ffn_up_shexp", "down_proj": "ffn_down_shexp"}


def _shared_gate(i: int) -> str:
    return f"model.layers.{i}.mlp.shared_expert_gate.weight"


@register
class Qwen2Moe(hf_moe.PerExpertFamily):
    hf_layout = LAYOUT
    arch = "qwen2moe"
    hf_architectures = ("Qwen2MoeForCausalLM",)
    hf_model_type = "qwen2_moe"
    gguf_arch = "qwen2moe"

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        attn = Attention(bias=hp.attn_bias)
        ffn = MoE(shared_size=hp.extra[SHARED_SIZE], shared_gate=True) if hp.is_moe(i) else GatedMLP(hp.act)
        return LayerSpec([Branch(attn, Norm(ATTN_NORM)), Branch(ffn, Norm(FFN_NORM))])

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = decoder_hparams(cfg, cls.arch, attn_bias=bool(cfg_get(cfg, "qkv_bias", True)), attn_out_bias=False,
                             mlp_bias=False)
        hp.n_experts = hf_moe.expert_count(cfg)
        hp.n_experts_used = int(cfg_get(cfg, "num_experts_per_tok", required=True))
        hp.expert_ffn_size = int(cfg_get(cfg, "moe_intermediate_size", required=True))
        hp.norm_topk_prob = bool(cfg_get(cfg, "norm_topk_prob", False))
        hp.moe_layers = hf_moe.moe_layers(cfg, hp.n_layers)
        hp.extra = {**hp.extra, SHARED_SIZE: int(cfg_get(cfg, "shared_expert_intermediate_size", required=True))}
        if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            hp.sliding_window = int(cfg["sliding_window"])
            mwl = cfg_get(cfg, "max_window_layers", hp.n_layers)
            # transformers' Qwen2MoeConfig: odd-numbered (1st, 3rd ...) layers below max_window_layers slide
            types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention"
                                               for i in range(hp.n_layers)]
            hp.layer_types = ["sliding" if t == "sliding_attention" else "full" for t in types]
        return hp

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        m = super().hf_name_map(hp)
        for i in range(hp.n_layers):
            if hp.is_moe(i):
                for hf, c in _SHEXP.items():
                    m[f"model.layers.{i}.mlp.shared_expert.{hf}.weight"] = blk(i, c)
        return m

    @classmethod
    def hf_tensors(cls, hp, src, source):
        out = super().hf_tensors(hp, src, source)
        for i in range(hp.n_layers):
            if hp.is_moe(i):
                out[blk(i, FFN_GATE_INP_SHEXP)] = lazy(need(src, _shared_gate(i), source), lambda w: w.reshape(-1),
                                                       (hp.hidden_size,))
        return out

    @classmethod
    def hf_export(cls, hp: HParams):
        gates = [(_shared_gate(i), (blk(i, FFN_GATE_INP_SHEXP),), lambda w: w.reshape(1, -1))
                 for i in range(hp.n_layers) if hp.is_moe(i)]
        return super().hf_export(hp) + gates

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        sw = {"use_sliding_window": False}
        if hp.sliding_window:
            types = hp.layer_types or ["sliding"] * hp.n_layers
            sw = {"use_sliding_window": True, "sliding_window": hp.sliding_window, "max_window_layers": hp.n_layers,
                  "layer_types": [("sliding_attention" if t == "sliding" else "full_attention") for t in types]}
        dense = [i for i in range(hp.n_layers) if not hp.is_moe(i)]
        return decoder_config(hp, "Qwen2MoeForCausalLM", "qwen2_moe", num_experts=hp.n_experts,
                              num_experts_per_tok=hp.n_experts_used, moe_intermediate_size=hp.expert_ffn_size,
                              shared_expert_intermediate_size=hp.extra[SHARED_SIZE],
                              norm_topk_prob=hp.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=dense,
                              qkv_bias=hp.attn_bias, **sw)

    @classmethod
    def gguf_kv(cls, hp: HParams):
        from gguf import GGUFValueType as VT
        problems = []
        if hp.norm_topk_prob:
            problems.append("norm_topk_prob=True (llama.cpp's qwen2moe graph never renormalises the top-k weights)")
        if hp.moe_layers is not None:
            problems.append(f"dense layers {[i for i in range(hp.n_layers) if not hp.is_moe(i)]} "
                            "(llama.cpp's qwen2moe graph needs experts in every layer)")
        if hp.tie_embeddings:
            problems.append("tied embeddings (llama.cpp's qwen2moe needs output.weight)")
        if hp.sliding_window:
            problems.append("sliding window (llama.cpp's qwen2moe graph has none)")
        hf_moe.refuse(cls.gguf_arch, problems)
        return super().gguf_kv(hp) + [(f"{cls.gguf_arch}.expert_shared_feed_forward_length", hp.extra[SHARED_SIZE],
                                       VT.UINT32)]

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        hp = super().hparams_from_gguf(kv, path, names)
        if not hp.n_experts:
            raise BadInput(f"{path}: GGUF metadata key 'qwen2moe.expert_count' is missing")
        hp.norm_topk_prob = False  # what llama.cpp computes
        if "qwen2moe.expert_feed_forward_length" not in kv:  # llama.cpp's fallback
            hp.expert_ffn_size = hp.ffn_size // hp.n_experts_used
        hp.extra = {**hp.extra, SHARED_SIZE: int(gguf_get(kv, "qwen2moe.expert_shared_feed_forward_length", path,
                                                          hp.ffn_size))}
        return hp

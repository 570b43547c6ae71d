"""MiniMax-Text-01 / MiniMax-M1 (transformers' MiniMaxForCausalLM): lightning-attention layers
(blocks/lightning.py) interleaved with softmax-attention layers (`layer_types`: "linear_attention" /
"full_attention"), each followed by a Mixtral-style MoE (`block_sparse_moe`, softmax top-k renormalised).

Residuals are post-norm: x <- alpha * norm(x) + beta * mixer(norm(x)), with per-kind factors
(linear_attn_*, full_attn_*, mlp_* alpha / beta; Branch.from_norm). The lightning layers' decay buffers
(slope_rate, query/key/diagonal_decay) are functions of the layer index, recomputed rather than read.
GGUF: llama.cpp does have an arch for it ("minimax01", read from the original remote-code checkpoints), but
quantkit does not write it: writing refuses (see gguf_kv).
"""

from __future__ import annotations

from ..blocks import Attention, Branch, LayerSpec, MoE, Norm
from ..blocks.lightning import ATTN_GATE, ATTN_NORM_2, ATTN_QKV, LightningAttention
from ..errors import BadInput, UnsupportedArchitecture
from ..graph import ATTN_K, ATTN_NORM, ATTN_OUT, ATTN_Q, ATTN_V, FFN_NORM, HParams, blk, parse_name
from . import hf_moe
from .hf_decoder import cfg_get, decoder_config, decoder_hparams
from .registry import register

LAYOUT = hf_moe.ExpertLayout(block="block_sparse_moe", router="gate", gate="w1", up="w3", down="w2")
LINEAR = "linear_layers"
FACTORS = ("full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor", "linear_attn_beta_factor",
           "mlp_alpha_factor", "mlp_beta_factor")
_LIGHTNING = {"qkv_proj": ATTN_QKV, "output_gate": ATTN_GATE, "norm": ATTN_NORM_2, "out_proj": ATTN_OUT}


@register
class MiniMax(hf_moe.PerExpertFamily):
    hf_layout = LAYOUT
    arch = "minimax"
    hf_architectures = ("MiniMaxForCausalLM",)
    hf_model_type = "minimax"
    gguf_arch = None

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        x = hp.extra
        kind = "linear_attn" if i in x[LINEAR] else "full_attn"
        mixer = LightningAttention() if i in x[LINEAR] else Attention()
        return LayerSpec([
            Branch(mixer, Norm(ATTN_NORM), from_norm=True, alpha=x[f"{kind}_alpha_factor"],
                   beta=x[f"{kind}_beta_factor"]),
            Branch(MoE(), Norm(FFN_NORM), from_norm=True, alpha=x["mlp_alpha_factor"], beta=x["mlp_beta_factor"])])

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = decoder_hparams(cfg, cls.arch, attn_bias=False, attn_out_bias=False, mlp_bias=False)
        if cfg.get("sliding_window"):
            raise UnsupportedArchitecture(f"minimax: sliding_window {cfg['sliding_window']} is not supported")
        hp.n_experts = int(cfg_get(cfg, "num_local_experts", required=True))
        hp.n_experts_used = int(cfg_get(cfg, "num_experts_per_tok", required=True))
        hp.expert_ffn_size = hp.ffn_size
        hp.norm_topk_prob = True  # Mixtral's router always renormalises
        types = cfg.get("layer_types") or ["full_attention" if (i + 1) % 2 else "linear_attention"
                                           for i in range(hp.n_layers)]
        if len(types) != hp.n_layers or set(types) - {"full_attention", "linear_attention"}:
            raise BadInput(f"config.json: layer_types {types} (expected {hp.n_layers} of full_attention / "
                           "linear_attention)")
        hp.extra = {**hp.extra, LINEAR: [i for i, t in enumerate(types) if t == "linear_attention"],
                    **{k: float(cfg_get(cfg, k, 1.0)) for k in FACTORS}}
        return hp

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        lin = set(hp.extra[LINEAR])
        m = {h: c for h, c in super().hf_name_map(hp).items()
             if not (parse_name(c)[0] in lin and parse_name(c)[1] in (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT))}
        for i in sorted(lin):
            m.update({f"model.layers.{i}.self_attn.{hf}.weight": blk(i, c) for hf, c in _LIGHTNING.items()})
        return m

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        lin = set(hp.extra[LINEAR])
        return decoder_config(hp, "MiniMaxForCausalLM", "minimax", num_local_experts=hp.n_experts,
                              num_experts_per_tok=hp.n_experts_used,
                              layer_types=["linear_attention" if i in lin else "full_attention"
                                           for i in range(hp.n_layers)],
                              **{k: hp.extra[k] for k in FACTORS})

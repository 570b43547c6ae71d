"""MiniMax-Text-01 / MiniMax-M1 (transformers' MiniMaxForCausalLM): lightning-attention layers
(blocks/lightning.py) interleaved with softmax-attention layers (`layer_types`: "linear_attention" /
"full_attention"), each followed by a Mixtral-style MoE (`block_sparse_moe`, softmax top-k renormalised).

Residuals are post-norm: x <- alpha * norm(x) + beta * mixer(norm(x)), with per-kind factors
(linear_attn_*, full_attn_*, mlp_* alpha / beta; Branch.from_norm). The lightning layers' decay buffers
(slope_rate, query/key/diagonal_decay) are functions of the layer index, recomputed rather than read.
GGUF: llama.cpp's "minimax-01" (its converter reads the original remote-code checkpoints; the tensor names
are our canonical ones, NEOX rope): one `residual_scale` for every alpha and no betas, so models whose alphas
differ or whose betas are not 1 are refused; the lightning layers as attention.recurrent_layers.
"""

from __future__ import annotations

import logging

from ..blocks import Attention, Branch, LayerSpec, MoE, Norm
from ..blocks.lightning import ATTN_GATE, ATTN_NORM_2, ATTN_QKV, LightningAttention
from ..errors import BadInput, UnsupportedArchitecture
from ..graph import ATTN_K, ATTN_NORM, ATTN_OUT, ATTN_Q, ATTN_V, FFN_NORM, HParams, blk, parse_name
from . import hf_moe
from .base import gguf_get
from .glm4moe import partial_rotary_factor
from .hf_decoder import cfg_get, decoder_config, decoder_hparams
from .registry import register

log = logging.getLogger("quantkit")

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
    gguf_arch = "minimax-01"

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
        partial = partial_rotary_factor(cfg, 1.0)
        rot = cfg.get("rotary_dim")
        if float(partial) != 1.0 or (rot is not None and int(rot) != hp.head_dim):
            # transformers' MiniMax rotates the whole head (its apply_rotary_pos_emb has no partial form)
            raise UnsupportedArchitecture(f"minimax: partial rotary (partial_rotary_factor {partial}, rotary_dim "
                                          f"{rot}) is not supported")
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

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def gguf_kv(cls, hp: HParams):
        from gguf import GGUFValueType as VT
        x, a = hp.extra, cls.gguf_arch
        alphas = {x[k] for k in FACTORS if "alpha" in k}
        betas = {k: x[k] for k in FACTORS if "beta" in k and x[k] != 1.0}
        problems = []
        if len(alphas) > 1:
            problems.append(f"residual alphas {sorted(alphas)} differ (llama.cpp's minimax-01 has one residual_scale)")
        if betas:
            problems.append(f"{betas} (llama.cpp's minimax-01 adds the mixers' outputs unscaled)")
        hf_moe.refuse(a, problems)
        if abs(hp.norm_eps - 1e-6) > 1e-12:
            log.warning("minimax-01: llama.cpp normalises the lightning output with eps %g, transformers with 1e-6",
                        hp.norm_eps)
        lin = set(x[LINEAR])
        return super().gguf_kv(hp) + [
            (f"{a}.residual_scale", float(alphas.pop()), VT.FLOAT32),
            (f"{a}.attention.recurrent_layers", [i in lin for i in range(hp.n_layers)], [VT.ARRAY, VT.BOOL])]

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        a = kv["general.architecture"]
        hp = super().hparams_from_gguf(kv, path, names)
        if not hp.n_experts:
            raise BadInput(f"{path}: GGUF metadata key '{a}.expert_count' is missing")
        hp.expert_ffn_size, hp.norm_topk_prob = hp.ffn_size, True  # what llama.cpp computes
        rec = kv.get(f"{a}.attention.recurrent_layers")
        if rec is None:  # llama.cpp's default: every 8th layer (or full_attention_interval) is softmax attention
            every = int(kv.get(f"{a}.full_attention_interval", 8))
            rec = [(i + 1) % every != 0 for i in range(hp.n_layers)]
        scale = float(gguf_get(kv, f"{a}.residual_scale", path))
        hp.extra = {**hp.extra, LINEAR: [i for i in range(hp.n_layers) if rec[i]],
                    **{k: (scale if "alpha" in k else 1.0) for k in FACTORS}}
        return hp

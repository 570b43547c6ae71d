"""Seed-OSS (SeedOssForCausalLM, ByteDance-Seed/Seed-OSS-36B): a Llama-style decoder with q/k/v biases
(attention_bias), an optional output-projection bias (attention_out_bias) and head_dim independent of
hidden / heads. llama.cpp arch "seed_oss" (NEOX rope: q/k keep HF's row order); it keeps the MLP's
pre-norm under blk.N.post_attention_norm and has no output-projection or MLP bias.
"""

from __future__ import annotations

from ..errors import UnsupportedArchitecture
from ..graph import FFN_NORM, HParams
from .base import Family
from .hf_decoder import decoder_config, decoder_hparams
from .registry import register


@register
class SeedOss(Family):
    arch = "seed_oss"
    hf_architectures = ("SeedOssForCausalLM",)
    gguf_arch = "seed_oss"
    gguf_renames = {FFN_NORM: "post_attention_norm"}

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        # SeedOssConfig's defaults: q/k/v biases on, output bias off
        hp = decoder_hparams(cfg, cls.arch)
        hp.attn_bias = bool(cfg.get("attention_bias", True))
        hp.attn_out_bias = bool(cfg.get("attention_out_bias", False))
        return hp

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return decoder_config(hp, "SeedOssForCausalLM", "seed_oss", attention_bias=hp.attn_bias,
                              attention_out_bias=hp.attn_out_bias, mlp_bias=hp.mlp_bias)

    @classmethod
    def gguf_kv(cls, hp: HParams):
        if hp.attn_out_bias or hp.mlp_bias:
            raise UnsupportedArchitecture("seed_oss with attention_out_bias or mlp_bias: llama.cpp's seed_oss "
                                          "loads neither bias, so GGUF cannot hold this model")
        return super().gguf_kv(hp)

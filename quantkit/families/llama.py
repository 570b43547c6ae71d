"""Llama 1/2/3.x (MHA, GQA, llama3 rope scaling, tied embeddings) and Mistral (sliding window)."""

from __future__ import annotations

from ..graph import HParams
from .base import Family
from .hf_decoder import decoder_config, decoder_hparams
from .registry import register


@register
class Llama(Family):
    arch = "llama"
    hf_architectures = ("LlamaForCausalLM",)
    gguf_arch = "llama"
    gguf_permute_qk = True

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return decoder_config(hp, "LlamaForCausalLM", "llama", attention_bias=hp.attn_bias, mlp_bias=hp.mlp_bias)

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        hp = super().hparams_from_gguf(kv, path, names)
        if hp.n_experts:  # llama.cpp's converter writes Mixtral as "llama" with stacked experts
            hp.arch = "mixtral"
        return hp


@register
class Mistral(Llama):
    """Written to GGUF as llama.cpp's converter does: arch "llama" (read back as Llama)."""
    arch = "mistral"
    hf_architectures = ("MistralForCausalLM",)
    gguf_reader = False

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = decoder_hparams(cfg, cls.arch)
        hp.sliding_window = cfg.get("sliding_window")
        hp.attn_bias = hp.attn_out_bias = hp.mlp_bias = False
        return hp

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return decoder_config(hp, "MistralForCausalLM", "mistral", sliding_window=hp.sliding_window)

"""Llama 1/2/3.x (MHA, GQA, llama3 rope scaling, tied embeddings) and Mistral."""

from __future__ import annotations

from ..graph import HParams
from .hf_decoder import decoder_config, decoder_hparams, decoder_name_map

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def hparams(cfg: dict) -> HParams:
    arch = "mistral" if cfg.get("model_type") == "mistral" or "MistralForCausalLM" in cfg.get("architectures", []) \
        else "llama"
    hp = decoder_hparams(cfg, arch)
    if arch == "mistral":
        hp.sliding_window = cfg.get("sliding_window")
        hp.attn_bias = hp.attn_out_bias = hp.mlp_bias = False
    return hp


def name_map(hp: HParams) -> dict[str, str]:
    return decoder_name_map(hp)


def hf_config(hp: HParams) -> dict:
    if hp.arch == "mistral":
        return decoder_config(hp, "MistralForCausalLM", "mistral", sliding_window=hp.sliding_window)
    return decoder_config(hp, "LlamaForCausalLM", "llama", attention_bias=hp.attn_bias, mlp_bias=hp.mlp_bias)

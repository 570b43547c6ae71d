"""Qwen2 / Qwen2.5 (q/k/v bias, tied embeddings for the small ones) and Qwen3 (q/k RMSNorm, explicit head_dim)."""

from __future__ import annotations

from ..graph import HParams
from .hf_decoder import decoder_config, decoder_hparams, decoder_name_map

HF_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")


def hparams(cfg: dict) -> HParams:
    if cfg.get("model_type") == "qwen3" or "Qwen3ForCausalLM" in cfg.get("architectures", []):
        hp = decoder_hparams(cfg, "qwen3", qk_norm=True)
        hp.attn_out_bias = False
        hp.attn_bias = bool(cfg.get("attention_bias", False))
    else:
        hp = decoder_hparams(cfg, "qwen2", attn_bias=True, attn_out_bias=False, mlp_bias=False)
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        hp.sliding_window = cfg["sliding_window"]
        mwl = cfg.get("max_window_layers", hp.n_layers)
        hp.layer_types = cfg.get("layer_types") or ["full" if i < mwl else "sliding" for i in range(hp.n_layers)]
        hp.layer_types = ["sliding" if t == "sliding_attention" or t == "sliding" else "full" for t in hp.layer_types]
    return hp


def name_map(hp: HParams) -> dict[str, str]:
    return decoder_name_map(hp)


def hf_config(hp: HParams) -> dict:
    if hp.arch == "qwen3":
        return decoder_config(hp, "Qwen3ForCausalLM", "qwen3", attention_bias=hp.attn_bias)
    return decoder_config(hp, "Qwen2ForCausalLM", "qwen2")

"""Qwen2 / Qwen2.5 (q/k/v bias, tied embeddings for the small ones) and Qwen3 (q/k RMSNorm, explicit head_dim)."""

from __future__ import annotations

from ..graph import HParams
from .base import Family
from .hf_decoder import decoder_config, decoder_hparams
from .registry import register


def sliding_layers(cfg: dict, hp: HParams) -> None:
    """Qwen's use_sliding_window / max_window_layers (or explicit layer_types)."""
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        hp.sliding_window = cfg["sliding_window"]
        mwl = cfg.get("max_window_layers", hp.n_layers)
        types = cfg.get("layer_types") or ["full" if i < mwl else "sliding" for i in range(hp.n_layers)]
        hp.layer_types = ["sliding" if t in ("sliding_attention", "sliding") else "full" for t in types]


@register
class Qwen2(Family):
    arch = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    gguf_arch = "qwen2"

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = decoder_hparams(cfg, cls.arch, attn_bias=True, attn_out_bias=False, mlp_bias=False)
        sliding_layers(cfg, hp)
        return hp


@register
class Qwen3(Family):
    arch = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    gguf_arch = "qwen3"

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = decoder_hparams(cfg, cls.arch, qk_norm=True)
        hp.attn_out_bias = False
        hp.attn_bias = bool(cfg.get("attention_bias", False))
        sliding_layers(cfg, hp)
        return hp

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        hp = super().hparams_from_gguf(kv, path, names)
        hp.qk_norm = True
        return hp

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return decoder_config(hp, "Qwen3ForCausalLM", "qwen3", attention_bias=hp.attn_bias)

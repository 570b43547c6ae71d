"""Gemma (GemmaForCausalLM), Gemma 2 (Gemma2ForCausalLM) and Gemma 3 text (Gemma3ForCausalLM).

All: GeGLU MLP (tanh GELU), token embeddings times sqrt(hidden) rounded to the embedding's dtype, RMSNorm
computed as x * (1 + w) (canonical tensors keep HF's w), tied head by default.
Gemma 2: sandwich norms (pre and post norm around attention and around the MLP), attention logits scaled
by query_pre_attn_scalar ** -0.5 and soft-capped, final logits soft-capped, alternating sliding (even) /
full layers.
Gemma 3: Gemma 2's layout without attention soft-capping (transformers ignores the config key; final
capping optional), q/k RMSNorm (1 + w) per head, sliding layers every layer but each 6th by default, with
their own RoPE base (rope_local_base_freq) and no RoPE scaling.
GGUF (llama.cpp "gemma", "gemma2", "gemma3"): llama.cpp's graph uses plain RMSNorm, so its converter
stores every norm weight as 1 + w (our `gguf_transform`; reading subtracts it). Post norms are
post_attention_norm / post_ffw_norm. llama.cpp fixes the attention scale at 1/sqrt(head_dim) (27B:
1/sqrt(hidden / heads)) and gemma/gemma2 always use token_embd as the head: other values refuse.
"""

from __future__ import annotations

import torch

from ..blocks import Attention, Branch, GatedMLP, LayerSpec, Norm
from ..errors import BadInput, UnsupportedArchitecture
from ..graph import ATTN_NORM, FFN_NORM, HParams, blk, parse_name
from .base import Family, by_layer, _vt, sliding_from_kv, sliding_window_kv
from .hf_decoder import decoder_config, decoder_hparams, decoder_name_map, layer_types_of, sliding_rope
from .olmo import ATTN_POST_NORM, FFN_POST_NORM
from .registry import register

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")
# llama.cpp's gemma2 / gemma3 take the 27B model's attention scale from its layer count
SCALE_BY_HIDDEN_LAYERS = {"gemma2": 46, "gemma3": 62}


def _plus_one(w: torch.Tensor) -> torch.Tensor:
    return (w.double() + 1).float()


def _minus_one(w: torch.Tensor) -> torch.Tensor:
    return (w.double() - 1).float()


def _is_norm(name: str) -> bool:
    return parse_name(name)[1].endswith("norm")


def _qpas(hp: HParams):
    q = float(hp.extra.get("query_pre_attn_scalar", hp.head_dim))
    return int(q) if q.is_integer() else q  # transformers' config checks it is an int


def gemma_hparams(cfg: dict, arch: str, defaults: dict) -> HParams:
    c = {**defaults, **{k: v for k, v in cfg.items() if v is not None}}
    # Gemma's legacy hidden_act "gelu" means the tanh approximation (transformers rewrites it so)
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    c["hidden_act"] = "gelu_pytorch_tanh" if act == "gelu" else act
    if c.get("use_bidirectional_attention"):
        raise BadInput(f"config.json: {arch} with use_bidirectional_attention is an embedding model, not a "
                       "causal LM")
    hp = decoder_hparams(c, arch, acts=GELU_TANH, norm="rms1p")
    hp.attn_bias = hp.attn_out_bias = bool(c.get("attention_bias", False))
    hp.mlp_bias = False
    return hp


class _Gemma(Family):
    """What the three Gemma generations share."""

    @classmethod
    def embed_scale(cls, hp: HParams) -> float:
        return hp.hidden_size ** 0.5

    @classmethod
    def gguf_transform(cls, name):
        return _plus_one if _is_norm(name) else None

    @classmethod
    def gguf_untransform(cls, name):
        return _minus_one if _is_norm(name) else None

    @classmethod
    def attn_scale(cls, hp: HParams) -> float:
        return float(hp.extra.get("query_pre_attn_scalar", hp.head_dim)) ** -0.5

    @classmethod
    def llamacpp_scalar(cls, hp: HParams) -> float:
        """query_pre_attn_scalar as llama.cpp's graph assumes it."""
        if hp.n_layers == SCALE_BY_HIDDEN_LAYERS.get(cls.gguf_arch):
            return hp.hidden_size / hp.n_heads
        return float(hp.head_dim)

    @classmethod
    def check_gguf(cls, hp: HParams) -> None:
        a = cls.gguf_arch
        if hp.attn_bias:
            raise UnsupportedArchitecture(f"{cls.arch} with attention_bias: llama.cpp's {a} graph has no "
                                          "attention output bias")
        qpas = float(hp.extra.get("query_pre_attn_scalar", hp.head_dim))
        if abs(qpas - cls.llamacpp_scalar(hp)) > 1e-6:
            raise UnsupportedArchitecture(
                f"{cls.arch} query_pre_attn_scalar {qpas:g}: llama.cpp's {a} scales attention by "
                f"1/sqrt({cls.llamacpp_scalar(hp):g}) for this shape, so GGUF cannot hold it")

    @classmethod
    def gguf_hparams(cls, hp: HParams) -> HParams:
        hp.norm = "rms1p"
        hp.attn_out_bias = hp.attn_bias = hp.mlp_bias = False
        hp.act = "gelu_pytorch_tanh"
        hp.extra = {**hp.extra, "query_pre_attn_scalar": cls.llamacpp_scalar(hp)}
        return hp


@register
class Gemma(_Gemma):
    arch = "gemma"
    hf_architectures = ("GemmaForCausalLM",)
    gguf_arch = "gemma"

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        attn = Attention(bias=hp.attn_bias, out_bias=hp.attn_out_bias)
        return LayerSpec([Branch(attn, Norm(ATTN_NORM, "rms1p")),
                          Branch(GatedMLP(hp.act), Norm(FFN_NORM, "rms1p"))])

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        return gemma_hparams(cfg, cls.arch, {"head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True})

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return decoder_config(hp, "GemmaForCausalLM", "gemma", attention_bias=hp.attn_bias)

    @classmethod
    def gguf_kv(cls, hp: HParams):
        cls.check_gguf(hp)
        if not hp.tie_embeddings:
            raise UnsupportedArchitecture("gemma with an untied lm_head: llama.cpp's gemma always uses "
                                          "token_embd as the output projection")
        return super().gguf_kv(hp)

    @classmethod
    def hparams_from_gguf(cls, kv, path, names):
        return cls.gguf_hparams(super().hparams_from_gguf(kv, path, names))


def _sandwich_names(hp: HParams) -> dict[str, str]:
    """Gemma 2/3's HF norm names: post_attention_layernorm is the attention output's norm."""
    m = {h: c for h, c in decoder_name_map(hp).items() if not h.endswith("post_attention_layernorm.weight")}
    for i in range(hp.n_layers):
        p = f"model.layers.{i}."
        m[p + "post_attention_layernorm.weight"] = blk(i, ATTN_POST_NORM)
        m[p + "pre_feedforward_layernorm.weight"] = blk(i, FFN_NORM)
        m[p + "post_feedforward_layernorm.weight"] = blk(i, FFN_POST_NORM)
    return by_layer(m)


def _sandwich_layer(hp: HParams, attn: Attention) -> LayerSpec:
    return LayerSpec([Branch(attn, Norm(ATTN_NORM, "rms1p"), Norm(ATTN_POST_NORM, "rms1p")),
                      Branch(GatedMLP(hp.act), Norm(FFN_NORM, "rms1p"), Norm(FFN_POST_NORM, "rms1p"))])


def _types_config(hp: HParams) -> dict:
    return {"sliding_window": hp.sliding_window,
            "layer_types": [("sliding_attention" if hp.is_sliding(i) else "full_attention")
                            for i in range(hp.n_layers)]}


@register
class Gemma2(_Gemma):
    arch = "gemma2"
    hf_architectures = ("Gemma2ForCausalLM",)
    gguf_arch = "gemma2"
    DEFAULTS = {"head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        return _sandwich_layer(hp, Attention(bias=hp.attn_bias, out_bias=hp.attn_out_bias, scale=cls.attn_scale(hp),
                                             softcap=hp.extra.get("attn_logit_softcapping")))

    @classmethod
    def logit_softcap(cls, hp: HParams):
        return hp.extra.get("final_logit_softcapping")

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = gemma_hparams(cfg, cls.arch, cls.DEFAULTS)
        c = {**cls.DEFAULTS, **cfg}
        hp.sliding_window = c["sliding_window"]
        hp.layer_types = layer_types_of(cfg, hp.n_layers, lambda i: (i + 1) % 2 != 0)
        hp.extra = {**hp.extra, "query_pre_attn_scalar": float(c["query_pre_attn_scalar"])}
        for k in ("attn_logit_softcapping", "final_logit_softcapping"):
            if c.get(k) is not None:
                hp.extra[k] = float(c[k])
        return hp

    @classmethod
    def hf_name_map(cls, hp):
        return _sandwich_names(hp)

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return decoder_config(hp, "Gemma2ForCausalLM", "gemma2", hidden_activation=hp.act,
                              attention_bias=hp.attn_bias, query_pre_attn_scalar=_qpas(hp),
                              attn_logit_softcapping=hp.extra.get("attn_logit_softcapping"),
                              final_logit_softcapping=hp.extra.get("final_logit_softcapping"), **_types_config(hp))

    @classmethod
    def gguf_kv(cls, hp: HParams):
        VT = _vt()
        cls.check_gguf(hp)
        if not hp.tie_embeddings:
            raise UnsupportedArchitecture("gemma2 with an untied lm_head: llama.cpp's gemma2 always uses "
                                          "token_embd as the output projection")
        for k in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hp.extra.get(k) is None:  # llama.cpp's gemma2 graph always caps (defaults 50 / 30)
                raise UnsupportedArchitecture(f"gemma2 without {k}: llama.cpp's gemma2 always soft-caps")
        return super().gguf_kv(hp) + sliding_window_kv("gemma2", hp) + [
            ("gemma2.attn_logit_softcapping", hp.extra["attn_logit_softcapping"], VT.FLOAT32),
            ("gemma2.final_logit_softcapping", hp.extra["final_logit_softcapping"], VT.FLOAT32)]

    @classmethod
    def hparams_from_gguf(cls, kv, path, names):
        hp = super().hparams_from_gguf(kv, path, names)
        # llama.cpp's gemma2 defaults: window 4096, even layers sliding, caps 50 / 30
        sliding_from_kv({"gemma2.attention.sliding_window": 4096, **kv}, "gemma2", hp, 2, path)
        hp.extra = {**hp.extra,
                    "attn_logit_softcapping": float(kv.get("gemma2.attn_logit_softcapping", 50.0)),
                    "final_logit_softcapping": float(kv.get("gemma2.final_logit_softcapping", 30.0))}
        return cls.gguf_hparams(hp)


MULTIMODAL_PREFIXES = ("language_model.model.", "model.language_model.")  # Hub layout, transformers-5 layout


@register
class Gemma3(_Gemma):
    """Gemma3ForConditionalGeneration (the 4B/12B/27B checkpoints) is read for its text model only."""
    arch = "gemma3"
    hf_architectures = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    hf_model_type = "gemma3_text"
    gguf_arch = "gemma3"
    # Gemma3TextConfig's defaults, for config.json files that leave them out
    DEFAULTS = {"head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                "sliding_window": 4096, "num_key_value_heads": 4, "max_position_embeddings": 131072,
                "rope_theta": 1_000_000.0}

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        attn = Attention(bias=hp.attn_bias, out_bias=hp.attn_out_bias, qk_norm="head", qk_norm_kind="rms1p",
                         scale=cls.attn_scale(hp))
        return _sandwich_layer(hp, attn)

    @classmethod
    def logit_softcap(cls, hp: HParams):
        return hp.extra.get("final_logit_softcapping")

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        multimodal = "text_config" in cfg
        if multimodal:  # the text model's config; the head is tied at the top level
            cfg = {"tie_word_embeddings": cfg.get("tie_word_embeddings", True), **(cfg["text_config"] or {})}
        hp = cls._text_hparams(cfg)
        if multimodal:
            hp.extra["multimodal"] = True
        return hp

    @classmethod
    def hf_tensors(cls, hp, src, source):
        if hp.extra.get("multimodal"):
            pre = next((p for p in MULTIMODAL_PREFIXES if f"{p}embed_tokens.weight" in src), None)
            if pre is None:
                raise BadInput(f"{source}: no language model tensors (expected names under "
                               f"{' or '.join(MULTIMODAL_PREFIXES)})")
            head = "language_model.lm_head.weight" if pre.startswith("language_model") else "lm_head.weight"
            src = {("lm_head.weight" if k == head else "model." + k[len(pre):] if k.startswith(pre) else k): v
                   for k, v in src.items()}
        return super().hf_tensors(hp, src, source)

    @classmethod
    def hf_export(cls, hp: HParams):
        if hp.extra.get("multimodal"):
            raise UnsupportedArchitecture("gemma3: writing HF safetensors from a Gemma3ForConditionalGeneration "
                                          "checkpoint would drop its vision tower; write GGUF (the text model) instead")
        return super().hf_export(hp)

    @classmethod
    def _text_hparams(cls, cfg: dict) -> HParams:
        c = {**cls.DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        hp = gemma_hparams(c, cls.arch, {})
        hp.qk_norm = True
        hp.sliding_window = c["sliding_window"]
        period = int(cfg.get("sliding_window_pattern") or 6)
        hp.layer_types = layer_types_of(cfg, hp.n_layers, lambda i: (i + 1) % period != 0)
        hp.extra = {**hp.extra, "query_pre_attn_scalar": float(c["query_pre_attn_scalar"]),
                    "rope_swa_theta": sliding_rope(cfg, 10000.0, "rope_local_base_freq")}
        # attn_logit_softcapping may be in the config, but Gemma 3's attention never applies it
        if cfg.get("final_logit_softcapping") is not None:
            hp.extra["final_logit_softcapping"] = float(cfg["final_logit_softcapping"])
        return hp

    @classmethod
    def hf_name_map(cls, hp):
        return _sandwich_names(hp)

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        cfg = decoder_config(hp, "Gemma3ForCausalLM", "gemma3_text", hidden_activation=hp.act,
                             attention_bias=hp.attn_bias, query_pre_attn_scalar=_qpas(hp),
                             final_logit_softcapping=hp.extra.get("final_logit_softcapping"), **_types_config(hp))
        full = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
        full.update(cfg.pop("rope_scaling", None) or {})
        cfg["rope_parameters"] = {"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": float(hp.extra.get("rope_swa_theta", 10000.0))}}
        return cfg

    @classmethod
    def gguf_kv(cls, hp: HParams):
        VT = _vt()
        cls.check_gguf(hp)
        kv = super().gguf_kv(hp) + sliding_window_kv("gemma3", hp)
        kv.append(("gemma3.rope.freq_base_swa", float(hp.extra.get("rope_swa_theta", 10000.0)), VT.FLOAT32))
        if hp.extra.get("final_logit_softcapping"):
            kv.append(("gemma3.final_logit_softcapping", hp.extra["final_logit_softcapping"], VT.FLOAT32))
        return kv

    @classmethod
    def hparams_from_gguf(cls, kv, path, names):
        hp = super().hparams_from_gguf(kv, path, names)
        hp.qk_norm = True
        if kv.get("gemma3.attention.sliding_window"):  # absent: llama.cpp runs every layer full
            sliding_from_kv(kv, "gemma3", hp, 6, path)
        # llama.cpp's default swa base is 10000, Gemma 3's rope_local_base_freq
        hp.extra = {**hp.extra, "rope_swa_theta": float(kv.get("gemma3.rope.freq_base_swa", 10000.0))}
        if kv.get("gemma3.final_logit_softcapping"):
            hp.extra["final_logit_softcapping"] = float(kv["gemma3.final_logit_softcapping"])
        return cls.gguf_hparams(hp)

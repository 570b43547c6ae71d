"""OLMo (OlmoForCausalLM), OLMo 2 (Olmo2ForCausalLM) and OLMo 3 (Olmo3ForCausalLM).

OLMo: non-parametric LayerNorm (eps 1e-5, no weight or bias, final norm included), optional clip_qkv
(q, k, v clamped after their projections); llama.cpp arch "olmo" (q/k rows permuted for its NORM rope,
clamp as attention.clamp_kqv).
OLMo 2: no pre-norms; RMSNorm on the attention and MLP outputs before each residual add, q/k RMSNorm over
the whole projection; llama.cpp arch "olmo2" (NEOX rope, post norms as post_attention_norm / post_ffw_norm).
OLMo 3: OLMo 2 plus sliding-window layers (layer_types; by default every 4th layer is full), whose RoPE
is never scaled. llama.cpp 0c1e570 has no "olmo3": its converter writes OLMo 3 as "olmo2" with
attention.sliding_window(_pattern) and rope.freq_base_swa, and its olmo2 graph runs sliding layers unscaled
but with the full layers' base (freq_base_swa is read, never used): a different sliding base refuses.
"""

from __future__ import annotations

from ..blocks import Attention, Branch, GatedMLP, LayerSpec, Norm
from ..errors import BadInput, UnsupportedArchitecture
from ..graph import ATTN_NORM, FFN_NORM, OUTPUT_NORM, HParams, blk
from .base import Family, by_layer, gguf_get, sliding_from_kv, sliding_window_kv, _vt
from .hf_decoder import decoder_config, decoder_hparams, decoder_name_map, layer_types_of, sliding_rope
from .registry import register

ATTN_POST_NORM, FFN_POST_NORM = "post_attention_norm", "post_ffw_norm"  # llama.cpp's names, canonical too


def _biases(cfg: dict, hp: HParams) -> HParams:
    b = bool(cfg.get("attention_bias", False))
    hp.attn_bias = hp.attn_out_bias = b  # OLMo's attention_bias covers q, k, v and o
    hp.mlp_bias = False
    return hp


def _no_out_bias(hp: HParams, arch: str) -> None:
    if hp.attn_out_bias:
        raise UnsupportedArchitecture(f"{arch} with attention_bias: llama.cpp's {arch} graph has no output "
                                      "projection bias, so GGUF cannot hold this model")


@register
class Olmo(Family):
    arch = "olmo"
    hf_architectures = ("OlmoForCausalLM",)
    gguf_arch = "olmo"
    gguf_permute_qk = True

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        attn = Attention(bias=hp.attn_bias, out_bias=hp.attn_out_bias, clip=hp.extra.get("clip_qkv"))
        return LayerSpec([Branch(attn, Norm(ATTN_NORM, "layer_np")),
                          Branch(GatedMLP(hp.act), Norm(FFN_NORM, "layer_np"))])

    @classmethod
    def global_tensors(cls, hp: HParams):
        s = super().global_tensors(hp)
        del s[OUTPUT_NORM]  # the final norm is non-parametric too
        return s

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = _biases(cfg, decoder_hparams(cfg, cls.arch, norm="layer_np", norm_eps=1e-5))
        if cfg.get("clip_qkv") is not None:
            hp.extra = {**hp.extra, "clip_qkv": float(cfg["clip_qkv"])}
        return hp

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        norms = (ATTN_NORM, FFN_NORM)
        return {h: c for h, c in decoder_name_map(hp).items()
                if c != OUTPUT_NORM and not any(c.endswith(f".{n}.weight") for n in norms)}

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return decoder_config(hp, "OlmoForCausalLM", "olmo", attention_bias=hp.attn_bias,
                              clip_qkv=hp.extra.get("clip_qkv"))

    @classmethod
    def gguf_kv(cls, hp: HParams):
        VT = _vt()
        _no_out_bias(hp, "olmo")
        kv = [e for e in super().gguf_kv(hp) if not e[0].endswith(".layer_norm_rms_epsilon")]
        kv.append(("olmo.attention.layer_norm_epsilon", float(hp.norm_eps), VT.FLOAT32))
        if hp.extra.get("clip_qkv") is not None:
            kv.append(("olmo.attention.clamp_kqv", float(hp.extra["clip_qkv"]), VT.FLOAT32))
        return kv

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        eps = float(gguf_get(kv, "olmo.attention.layer_norm_epsilon", path))
        hp = super().hparams_from_gguf({**kv, "olmo.attention.layer_norm_rms_epsilon": eps}, path, names)
        hp.norm = "layer_np"
        if kv.get("olmo.attention.clamp_kqv"):
            hp.extra = {**hp.extra, "clip_qkv": float(kv["olmo.attention.clamp_kqv"])}
        return hp


@register
class Olmo2(Family):
    arch = "olmo2"
    hf_architectures = ("Olmo2ForCausalLM",)
    gguf_arch = "olmo2"

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        attn = Attention(bias=hp.attn_bias, out_bias=hp.attn_out_bias, qk_norm="full")
        return LayerSpec([Branch(attn, None, Norm(ATTN_POST_NORM)),
                          Branch(GatedMLP(hp.act), None, Norm(FFN_POST_NORM))])

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        return _biases(cfg, decoder_hparams(cfg, cls.arch, qk_norm=True))

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        m = {h: c for h, c in decoder_name_map(hp).items()
             if not h.endswith(("input_layernorm.weight", "post_attention_layernorm.weight"))}
        for i in range(hp.n_layers):
            p = f"model.layers.{i}."
            m[p + "post_attention_layernorm.weight"] = blk(i, ATTN_POST_NORM)
            m[p + "post_feedforward_layernorm.weight"] = blk(i, FFN_POST_NORM)
        return by_layer(m)

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return decoder_config(hp, cls.hf_architectures[0], cls.arch, attention_bias=hp.attn_bias)

    @classmethod
    def gguf_kv(cls, hp: HParams):
        _no_out_bias(hp, "olmo2")
        if hp.tie_embeddings:
            raise UnsupportedArchitecture(f"{cls.arch} with tied embeddings: llama.cpp's olmo2 requires a "
                                          "separate output.weight")
        if hp.n_heads * hp.head_dim != hp.hidden_size:
            raise UnsupportedArchitecture(f"{cls.arch} with head_dim {hp.head_dim} x {hp.n_heads} heads != hidden "
                                          f"{hp.hidden_size}: llama.cpp's olmo2 derives head_dim from hidden")
        return super().gguf_kv(hp)

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        hp = super().hparams_from_gguf(kv, path, names)
        hp.qk_norm = True
        if kv.get("olmo2.attention.sliding_window"):  # OLMo 3 as llama.cpp's converter writes it
            hp.arch = Olmo3.arch
            sliding_from_kv(kv, "olmo2", hp, 4, path)
            hp.extra = {**hp.extra, "rope_swa_theta": hp.rope_theta}  # what llama.cpp's olmo2 graph uses
        return hp


@register
class Olmo3(Olmo2):
    arch = "olmo3"
    hf_architectures = ("Olmo3ForCausalLM",)
    gguf_reader = False  # GGUF "olmo2" files with a sliding window are read as OLMo 3 by Olmo2

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = super().hparams_from_hf(cfg)
        hp.sliding_window = cfg.get("sliding_window", 4096)
        if not hp.sliding_window:
            raise BadInput("config.json: Olmo3ForCausalLM needs a sliding_window")
        hp.layer_types = layer_types_of(cfg, hp.n_layers, lambda i: (i + 1) % 4 != 0)
        # Olmo3Config's default base is 500000 for both layer kinds
        hp.extra = {**hp.extra, "rope_swa_theta": sliding_rope(cfg, cfg.get("rope_theta") or 500000.0)}
        return hp

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        cfg = super().hf_config(hp)
        full = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
        if cfg.get("rope_scaling"):
            full.update(cfg["rope_scaling"])
        cfg.pop("rope_scaling", None)
        cfg["rope_parameters"] = {"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": float(hp.extra.get("rope_swa_theta", hp.rope_theta))}}
        cfg["sliding_window"] = hp.sliding_window
        cfg["layer_types"] = [("sliding_attention" if hp.is_sliding(i) else "full_attention")
                              for i in range(hp.n_layers)]
        return cfg

    @classmethod
    def gguf_kv(cls, hp: HParams):
        VT = _vt()
        swa = float(hp.extra.get("rope_swa_theta", hp.rope_theta))
        if swa != hp.rope_theta:
            raise UnsupportedArchitecture(f"olmo3 with sliding-layer rope_theta {swa:g} != {hp.rope_theta:g}: "
                                          "llama.cpp's olmo2 graph uses one RoPE base for every layer")
        kv = super().gguf_kv(hp) + sliding_window_kv("olmo2", hp)
        return kv + [("olmo2.rope.freq_base_swa", swa, VT.FLOAT32)]  # as llama.cpp's converter writes it

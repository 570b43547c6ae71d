"""Qwen (v1: QWenLMHeadModel, remote code; llama.cpp "qwen"). Read from the published tensor names and
config keys only; its modeling code is never run.

transformer.wte / transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1, mlp.w2, mlp.c_proj} /
transformer.ln_f / lm_head. RMSNorm (layer_norm_epsilon), rotate-half RoPE over kv_channels * rotary_pct dims
with base rotary_emb_base, one fused c_attn [q; k; v] with a bias (canonical attn_qkv, as llama.cpp loads
it), the MLP c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection (llama.cpp's mapping too).
config.json's intermediate_size is twice the MLP width. no_bias (default true) drops the c_proj / w1 / w2
biases. use_dynamic_ntk and use_logn_attn only act past seq_length tokens: quantkit computes the model up to
seq_length (context_length), as llama.cpp does.
"""

from __future__ import annotations

from ..blocks import Attention, Branch, GatedMLP, LayerSpec, Norm
from ..errors import BadInput, UnsupportedArchitecture
from ..graph import (ATTN_NORM, ATTN_OUT, ATTN_QKV, FFN_DOWN, FFN_GATE, FFN_NORM, FFN_UP, OUTPUT, OUTPUT_NORM,
                     TOKEN_EMBD, HParams, blk)
from .base import Family, _vt
from .hf_decoder import cfg_get
from .registry import register

_LAYER = {"ln_1": ATTN_NORM, "attn.c_attn": ATTN_QKV, "attn.c_proj": ATTN_OUT, "ln_2": FFN_NORM,
          "mlp.w1": FFN_UP, "mlp.w2": FFN_GATE, "mlp.c_proj": FFN_DOWN}


@register
class QwenV1(Family):
    arch = "qwen"
    hf_architectures = ("QWenLMHeadModel",)
    hf_model_type = "qwen"
    gguf_arch = "qwen"

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        scale = None if hp.extra.get("scale_attn_weights", True) else 1.0
        attn = Attention(bias=True, out_bias=hp.attn_out_bias, fused=True, scale=scale)
        return LayerSpec([Branch(attn, Norm(ATTN_NORM)), Branch(GatedMLP("silu", bias=hp.mlp_bias), Norm(FFN_NORM))])

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        heads = cfg_get(cfg, "num_attention_heads", required=True)
        hidden = cfg_get(cfg, "hidden_size", required=True)
        inter = cfg_get(cfg, "intermediate_size", required=True)
        if inter % 2:
            raise BadInput(f"config.json: Qwen intermediate_size {inter} is not even (it is twice the MLP width)")
        head_dim = cfg_get(cfg, "kv_channels", hidden // heads)
        pct = float(cfg_get(cfg, "rotary_pct", 1.0))
        rot = int(head_dim * pct)
        if not 0 < rot <= head_dim or rot % 2:
            raise BadInput(f"config.json: rotary_pct {pct} gives {rot} rotary dims of kv_channels {head_dim}")
        biased = not cfg_get(cfg, "no_bias", True)
        hp = HParams(
            arch=cls.arch, vocab_size=cfg_get(cfg, "vocab_size", required=True), hidden_size=hidden,
            n_layers=cfg_get(cfg, "num_hidden_layers", required=True), n_heads=heads, n_kv_heads=heads,
            head_dim=head_dim, ffn_size=inter // 2, norm_eps=float(cfg_get(cfg, "layer_norm_epsilon", 1e-6)),
            rope_theta=float(cfg_get(cfg, "rotary_emb_base", 10000.0)), rope_dim=rot if rot != head_dim else None,
            context_length=int(cfg_get(cfg, "max_position_embeddings") or cfg_get(cfg, "seq_length", 2048)),
            tie_embeddings=bool(cfg_get(cfg, "tie_word_embeddings", False)), attn_bias=True, attn_out_bias=biased,
            mlp_bias=biased, name=cfg_get(cfg, "_name_or_path", ""))
        if not cfg_get(cfg, "scale_attn_weights", True):
            hp.extra = {"scale_attn_weights": False}
        return hp

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        m = {"transformer.wte.weight": TOKEN_EMBD}
        for i in range(hp.n_layers):
            for hf, c in _LAYER.items():
                m[f"transformer.h.{i}.{hf}.weight"] = blk(i, c)
                if c == ATTN_QKV or (c == ATTN_OUT and hp.attn_out_bias) or (c in (FFN_UP, FFN_GATE, FFN_DOWN)
                                                                            and hp.mlp_bias):
                    m[f"transformer.h.{i}.{hf}.bias"] = blk(i, c, "bias")
        m["transformer.ln_f.weight"] = OUTPUT_NORM
        if not hp.tie_embeddings:
            m["lm_head.weight"] = OUTPUT
        return m

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": hp.vocab_size,
                "hidden_size": hp.hidden_size, "num_hidden_layers": hp.n_layers,
                "num_attention_heads": hp.n_heads, "kv_channels": hp.head_dim, "intermediate_size": 2 * hp.ffn_size,
                "layer_norm_epsilon": hp.norm_eps, "rotary_emb_base": hp.rope_theta,
                "rotary_pct": hp.rotary_dim / hp.head_dim, "max_position_embeddings": hp.context_length,
                "seq_length": hp.context_length, "no_bias": not hp.mlp_bias,
                "scale_attn_weights": hp.extra.get("scale_attn_weights", True),
                "tie_word_embeddings": hp.tie_embeddings, "torch_dtype": "bfloat16"}

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def gguf_kv(cls, hp: HParams):
        VT = _vt()
        why = None
        if hp.n_heads * hp.head_dim != hp.hidden_size:
            why = f"kv_channels {hp.head_dim} x {hp.n_heads} heads != hidden {hp.hidden_size}"
        elif hp.mlp_bias or hp.attn_out_bias:
            why = "no_bias false (c_proj / w1 / w2 biases), which llama.cpp's qwen does not load"
        elif hp.tie_embeddings:
            why = "tied embeddings (llama.cpp's qwen requires a separate output.weight)"
        elif not hp.extra.get("scale_attn_weights", True):
            why = "scale_attn_weights false (llama.cpp scales attention by 1/sqrt(head_dim))"
        if why:
            raise UnsupportedArchitecture(f"qwen with {why}: GGUF cannot hold this model")
        kv = [(k, v, t) for k, v, t in super().gguf_kv(hp) if not k.endswith(".feed_forward_length")]
        # llama.cpp's qwen reads feed_forward_length as config.json's intermediate_size (twice the width)
        return kv + [("qwen.feed_forward_length", 2 * hp.ffn_size, VT.UINT32)]

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        hp = super().hparams_from_gguf(kv, path, names)
        hp.ffn_size //= 2
        hp.attn_bias = True
        return hp
